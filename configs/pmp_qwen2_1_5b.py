"""CodePMP pretraining of Qwen2-1.5B (the paper's setup; see `common.paper_pmp`).

Needs a converted checkpoint and prepared code pairs:
  python -m codepmp_jax.convert --from_hf=Qwen2-1.5B --output=ckpt/qwen2_1_5b
  python -m codepmp_jax.data.prepare --input='pairs/*.jsonl.gz' --format=pairs \
      --tokenizer=ckpt/qwen2_1_5b --seq_len=1024 --out=prepared/codepmp
  python -m codepmp_jax.train --config=configs/pmp_qwen2_1_5b.py --workdir=runs/pmp_1_5b \
      --config.init_from=ckpt/qwen2_1_5b --config.data.path=prepared/codepmp
"""
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  return common.paper_pmp("qwen2_1_5b", microbatches=2)
