"""CodePMP pretraining of Qwen2-7B (the paper's setup; see `paper_pmp_config`).

  python -m codepmp_jax.convert --from_hf=Qwen2-7B --output=ckpt/qwen2_7b
  python -m codepmp_jax.train --config=configs/pmp_qwen2_7b.py --workdir=runs/pmp_7b \
      --config.init_from=ckpt/qwen2_7b --config.data.path=prepared/codepmp
Plan the memory first: python -m codepmp_jax.plan --config=configs/pmp_qwen2_7b.py --devices=64
"""
from codepmp_jax.config import paper_pmp_config


def get_config(arg=None):
  del arg
  return paper_pmp_config("qwen2_7b", microbatches=16)
