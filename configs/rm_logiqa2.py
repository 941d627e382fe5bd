"""RM fine-tuning on LogiQA 2.0 pairs (gold option vs each wrong one), from a PMP checkpoint.

  python -m codepmp_jax.data.prepare --input=../shared/data/logiqa2/dev.jsonl --format=logiqa2 \
      --tokenizer=runs/pmp_1_5b --seq_len=1024 --out=prepared/logiqa2
  python -m codepmp_jax.train --config=configs/rm_logiqa2.py --workdir=runs/rm_logiqa2 \
      --config.init_from=runs/pmp_1_5b
Arg: `preset=NAME` (or just NAME), the model shape (default qwen2_1_5b); params come from init_from.
"""
from configs import common


def get_config(arg=None):
  return common.logic_rm("logiqa2", common.parse_arg(arg, preset="qwen2_1_5b").preset)
