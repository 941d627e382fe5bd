"""RM fine-tuning on LogiQA 2.0 pairs (gold option vs each wrong one), from a PMP checkpoint.

  python -m codepmp_jax.data.prepare --input=../shared/data/logiqa2/dev.jsonl --format=logiqa2 \
      --tokenizer=runs/pmp_1_5b --seq_len=1024 --out=prepared/logiqa2
  python -m codepmp_jax.train --config=configs/rm_logiqa2.py --workdir=runs/rm_logiqa2 \
      --config.init_from=runs/pmp_1_5b
Arg: a model preset for the shape (default qwen2_1_5b); the params come from init_from.
"""
from codepmp_jax.config import paper_logic_rm_config


def get_config(arg=None):
  return paper_logic_rm_config("logiqa2", arg or "qwen2_1_5b")
