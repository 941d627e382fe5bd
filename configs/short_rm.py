"""A short RM fine-tuning of another config's model shape (the CPU experiments' `common.short_rm`).

  python -m codepmp_jax.train --config=configs/short_rm.py:base=tiny,steps=80,lr=0.001 \
      --workdir=runs/rm --config.init_from=runs/tiny --config.tokenizer=runs/tiny \
      --config.data.path=prepared/gsm8k_pairs
Arg: `base` (a config name under configs/, default tiny), `steps` and `lr` of the fine-tuning.
"""
from codepmp_jax.config import load_config
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, base="tiny", steps=80, lr=1e-3)
  return common.short_rm(load_config(arg.base), arg.steps, arg.lr)
