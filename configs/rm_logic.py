"""RM fine-tuning on logical-reasoning pairs (gold option vs each wrong one), from a PMP checkpoint.

  python -m codepmp_jax.data.prepare --input=../shared/data/logiqa2/dev.jsonl --format=logiqa2 \
      --tokenizer=runs/pmp_1_5b --seq_len=1024 --out=prepared/logiqa2
  python -m codepmp_jax.train --config=configs/rm_logic.py:logiqa2 --workdir=runs/rm_logiqa2 \
      --config.init_from=runs/pmp_1_5b
ReClor the same way: `--format=reclor --out=prepared/reclor`, `--config=configs/rm_logic.py:reclor`.
Arg: `dataset` (logiqa2 or reclor; its prepared/DATASET is data.path) and `preset` (the model
shape, default qwen2_1_5b; the params come from init_from): `rm_logic.py:dataset=reclor,preset=qwen2_7b`.
"""
from configs import common

DATASETS = ("logiqa2", "reclor")


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="logiqa2", preset="qwen2_1_5b")
  if arg.dataset not in DATASETS:
    raise ValueError(f"dataset {arg.dataset!r} is not one of {DATASETS}")
  return common.logic_rm(arg.dataset, arg.preset)
