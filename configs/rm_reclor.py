"""RM fine-tuning on ReClor pairs (gold option vs each wrong one), from a PMP checkpoint.

  python -m codepmp_jax.data.prepare --input=reclor/train.json --format=reclor \
      --tokenizer=runs/pmp_1_5b --seq_len=1024 --out=prepared/reclor
  python -m codepmp_jax.train --config=configs/rm_reclor.py --workdir=runs/rm_reclor \
      --config.init_from=runs/pmp_1_5b
Arg: `preset=NAME` (or just NAME), the model shape (default qwen2_1_5b); params come from init_from.
"""
from configs import common


def get_config(arg=None):
  return common.logic_rm("reclor", common.parse_arg(arg, preset="qwen2_1_5b").preset)
