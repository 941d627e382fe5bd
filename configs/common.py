"""The paper's recipes, shared by the config files (as big_vision's `configs/common.py`).

Every config file is `get_config(arg)` returning a whole `codepmp_jax.config.default_config()`
with only what differs changed; the recipes below hold what several files share, so each file is
a few lines. `arg` (after the `:` of `--config=configs/x.py:arg`) is read by `parse_arg`, one way
for every file: `preset=qwen2_7b,runlocal` or a bare value for the first field.

The published (Yu et al. 2024) and released (github.com/FAMOR-FY/CodePMP) hyperparameters:
  PMP: BT + LM (1.0 each), AdamW lr 1e-6, weight decay 0.1, 3% warmup, warmup-stable-decay (the
    last 10% decaying), ~1024 pairs per step of 1024 tokens, bf16, gradient checkpointing, one epoch.
  RM fine-tuning: BT only, cosine schedule, weight decay 0, gradient clipping 1.0, one epoch;
    Math-Shepherd lr 3e-7 with 3% warmup, ReClor / LogiQA 2.0 lr 3e-6 with 25% warmup.
Both bucket the pairs by length (`data.bucket`), so short pairs are not padded to 1024 tokens;
PMP packs them (`data.pack`: several pairs per row of 2 x 1024 tokens, every step of one shape,
`PAPER_PACK_ROWS` rows; about `global_batch` pairs a step with the rest carried to the next;
`--config.data.pack=False` falls back to the buckets, and then needs 4x the microbatches: a packed
row holds the tokens of one padded pair, and 256 rows hold about 1024 pairs).
"""
from __future__ import annotations

from typing import Any

import ml_collections

from codepmp_jax.config import default_config, model_fields

# Fields of the paper's models that make a 1.5B-7B model fit: bf16 compute, full remat, scanned.
PAPER_NUMERICS = dict(dtype="bfloat16", remat_policy="full", scan_layers=True)
# Gradient checkpointing that keeps the matmul outputs: the SmolLM2-135M configs' trade-off.
SMALL_NUMERICS = dict(remat_policy="dots_with_no_batch_dims")

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _to_bool(text: str) -> bool:
  if text.lower() in _TRUE:
    return True
  if text.lower() in _FALSE:
    return False
  raise ValueError(f"expected a boolean (true/false), got {text!r}")


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """The `get_config(arg)` string as typed fields, each defaulting to its value in `spec`.

  `arg` is `key=value,key=value`; a bare `key` is `key=True` (`runlocal`); a lone bare value that
  names no field is the value of the first field (`configs/rm_math_shepherd.py:qwen2_7b`). Values take
  the type of their default (bools from true/false/1/0). An unknown key is an error naming it.
  """
  arg = arg or ""
  if arg and "," not in arg and "=" not in arg and arg not in spec:
    if not spec:
      raise ValueError(f"this config takes no argument, got {arg!r}")
    arg = f"{next(iter(spec))}={arg}"
  given = {}
  for item in filter(None, arg.split(",")):
    key, sep, value = item.partition("=")
    given[key.strip()] = value.strip() if sep else "True"
  unknown = sorted(set(given) - set(spec))
  if unknown:
    raise ValueError(f"unknown config argument(s) {unknown} in {arg!r}; known: {sorted(spec)}")
  result = ml_collections.ConfigDict()
  for key, default in spec.items():
    if key not in given:
      result[key] = default
    elif isinstance(default, bool):
      result[key] = _to_bool(given[key])
    else:
      result[key] = type(default)(given[key])
  return result


# Packed rows of a PMP step of 1024 pairs: synthesized code pairs (stdlib, `mutate`, SmolLM2's
# tokenizer, seq_len 1024) average 422 tokens with their prompt laid out once, so 1024 pairs fill
# 211 rows of 2048 tokens; 256 rows leave room for packing's gaps and divide over 64 devices x 4
# microbatches (docs/pipeline.md, "One shape per run").
PAPER_PACK_ROWS = 256


def paper_pmp(preset: str, microbatches: int) -> ml_collections.ConfigDict:
  """CodePMP pretraining as published (the module docstring), for a model preset; `microbatches`
  split the `PAPER_PACK_ROWS` packed rows of a step."""
  config = default_config()
  config.model = model_fields(preset, **PAPER_NUMERICS)
  config.data.path = "prepared/codepmp"
  config.data.bucket = True
  config.data.pack = True
  config.data.pack_rows = PAPER_PACK_ROWS
  config.loss.update(rm_coef=1.0, lm_coef=1.0)
  config.optimizer.update(lr=1e-6, schedule="wsd", warmup_ratio=0.03, decay_ratio=0.1,
                          weight_decay=0.1)
  config.train.update(global_batch=1024, microbatches=microbatches, seq_len=1024, epochs=1.0,
                      log_every=10, eval_every=500, eval_batches=20)
  config.mesh_shape = (1, -1, 1)
  config.checkpoint.save_every = 1000
  return config


def released_rm(model: ml_collections.ConfigDict, data_path: str, lr: float, warmup_ratio: float,
                global_batch: int, microbatches: int, seq_len: int, eval_every: int,
                eval_batches: int = 20) -> ml_collections.ConfigDict:
  """RM fine-tuning as released: BT only, cosine, weight decay 0, clipping 1.0, one epoch.

  `init_from` is a required placeholder: the trainer stops unless the command line names the
  checkpoint (`--config.init_from=runs/pmp`) or says `--config.init_from=scratch`, so forgetting it
  never fine-tunes a random model.
  """
  config = default_config()
  config.model = model
  config.init_from = ml_collections.config_dict.placeholder(str)
  config.data.path = data_path
  config.data.bucket = True
  config.loss.update(rm_coef=1.0, lm_coef=0.0)
  config.optimizer.update(lr=lr, schedule="cosine", warmup_ratio=warmup_ratio, weight_decay=0.0,
                          grad_clip=1.0)
  config.train.update(global_batch=global_batch, microbatches=microbatches, seq_len=seq_len,
                      epochs=1.0, log_every=10, eval_every=eval_every, eval_batches=eval_batches)
  return config


def math_rm(preset: str) -> ml_collections.ConfigDict:
  """Math-Shepherd RM fine-tuning as released: lr 3e-7, warmup 3%, 512 pairs per step."""
  return released_rm(model_fields(preset, **PAPER_NUMERICS), "prepared/math_shepherd", lr=3e-7,
                     warmup_ratio=0.03, global_batch=512, microbatches=8, seq_len=1024,
                     eval_every=200)


def logic_rm(dataset: str, preset: str) -> ml_collections.ConfigDict:
  """ReClor / LogiQA 2.0 RM fine-tuning as released: lr 3e-6, warmup 25%, 128 pairs per step."""
  return released_rm(model_fields(preset, **PAPER_NUMERICS), f"prepared/{dataset}", lr=3e-6,
                     warmup_ratio=0.25, global_batch=128, microbatches=4, seq_len=1024,
                     eval_every=50)


def short_rm(config: ml_collections.ConfigDict, steps: int, lr: float) -> ml_collections.ConfigDict:
  """A short RM fine-tuning (BT only) of `config`'s model shape, for the CPU experiments.

  Both arms of a comparison get the same data, seed, schedule and shape; the experiment sets
  `init_from` (empty: from scratch), `tokenizer` and `data.path` on the result.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.builtin.name = ""
  config.loss.update(rm_coef=1.0, lm_coef=0.0)
  config.optimizer.update(lr=lr, schedule="wsd", warmup_ratio=0.1, decay_ratio=0.2)
  config.train.update(total_steps=steps, log_every=max(1, steps // 10), eval_every=steps,
                      eval_batches=4)
  config.checkpoint.update(save_every=steps, keep=1)
  return config
