"""CodePMP pretraining of Qwen2-7B (the paper's setup; see `common.paper_pmp`).

  python -m codepmp_jax.convert --from_hf=Qwen2-7B --output=ckpt/qwen2_7b
  python -m codepmp_jax.train --config=configs/pmp_qwen2_7b.py --workdir=runs/pmp_7b \
      --config.init_from=ckpt/qwen2_7b --config.data.path=prepared/codepmp
Plan the memory first: python -m codepmp_jax.plan --config=configs/pmp_qwen2_7b.py --devices=64
"""
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  return common.paper_pmp("qwen2_7b", microbatches=4)
