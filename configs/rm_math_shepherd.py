"""RM fine-tuning on Math-Shepherd pairs from a PMP checkpoint (BT loss only; `common.math_rm`).

  python -m codepmp_jax.data.prepare --input=math_shepherd.jsonl --format=math_shepherd \
      --tokenizer=runs/pmp_1_5b --seq_len=1024 --out=prepared/math_shepherd
  python -m codepmp_jax.train --config=configs/rm_math_shepherd.py --workdir=runs/rm_math \
      --config.init_from=runs/pmp_1_5b
Arg: `preset=NAME` (or just NAME), the model shape (default qwen2_1_5b); params come from init_from.
"""
from configs import common


def get_config(arg=None):
  return common.math_rm(common.parse_arg(arg, preset="qwen2_1_5b").preset)
