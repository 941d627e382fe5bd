"""RM fine-tuning on ReClor pairs (gold option vs each wrong one), from a PMP checkpoint.

  python -m codepmp_jax.data.prepare --input=reclor/train.json --format=reclor \
      --tokenizer=runs/pmp_1_5b --seq_len=1024 --out=prepared/reclor
  python -m codepmp_jax.train --config=configs/rm_reclor.py --workdir=runs/rm_reclor \
      --config.init_from=runs/pmp_1_5b
Arg: a model preset for the shape (default qwen2_1_5b); the params come from init_from.
"""
from codepmp_jax.config import paper_logic_rm_config


def get_config(arg=None):
  return paper_logic_rm_config("reclor", arg or "qwen2_1_5b")
