"""The built-in default: PMP of the tiny model from scratch on CPU, in a few minutes.

Its data needs no input: code-preference pairs synthesized from this Python's standard library by
the offline `mutate` strategy, and a sentencepiece tokenizer trained on the same code, built once
into data_cache/stdlib_mutate by the first command (see codepmp_jax/data/builtin.py; `make demo`
builds it too); the trainer only reads it.

  python -m codepmp_jax.data.builtin --config=configs/tiny.py
  python -m codepmp_jax.train --config=configs/tiny.py --workdir=runs/tiny
"""
from codepmp_jax.config import default_config, model_fields
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  config = default_config()
  config.model = model_fields("tiny", vocab_size=0, hidden_size=128, intermediate_size=384,
                              num_layers=4, num_heads=4, num_kv_heads=2)
  config.data.builtin.name = "stdlib_mutate"
  config.data.path = "data_cache/stdlib_mutate"
  config.loss.lm_coef = 1.0
  config.optimizer.lr = 1e-3
  config.optimizer.weight_decay = 0.01
  config.optimizer.warmup_ratio = 0.05
  config.train.update(global_batch=16, seq_len=256, total_steps=250, log_every=10,
                      eval_every=50, eval_batch=32, eval_batches=4)
  config.mesh_shape = (-1, 1, 1)
  config.checkpoint.save_every = 50
  return config
