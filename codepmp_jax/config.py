"""Every training setting with its default; config files under configs/ change only what differs.

The paper's recipes live in configs/common.py (library code never imports configs/; programs load
a config by name with `load_config`).

Configs are ml_collections ConfigDicts, locked by the command line (an unknown key is an error):
  python -m codepmp_jax.train --config=configs/x.py[:arg] --workdir=DIR --config.optimizer.lr=3e-6
"""
from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from codepmp_jax import losses
from codepmp_jax.data import builtin, pipeline
from codepmp_jax.model.config import get_preset
from codepmp_jax.optim import default_optimizer_config


def model_fields(preset: str, **overrides) -> ml_collections.ConfigDict:
  """A model preset as config fields, so every model field can be overridden from the command line."""
  return ml_collections.ConfigDict(get_preset(preset, **overrides).to_dict())


def default_config() -> ml_collections.ConfigDict:
  """The full set of training fields.

  model: ModelConfig fields (vocab_size 0 = the tokenizer's). With `init_from` only the numerics
    (`train.NUMERICS_FIELDS`: dtype, param_dtype, remat_policy, scan_layers, attention,
    causal_block, lora) are taken from here, the rest from the checkpoint. `model.lora`: LoRA
    adapters (`model.config.LoraConfig`: rank 0 = off, alpha, targets: projection names), e.g.
    `--config.model.lora.rank=8 --config.model.lora.targets=q_proj,v_proj`; a model field, not a
    training one, so a checkpoint's model config says its params hold adapters.
  init_from: a model checkpoint or training workdir to take params from (not the optimizer state),
    cast to model.param_dtype; "" or "scratch" = fresh params. A recipe that must start from a
    checkpoint sets it to `config_dict.placeholder(str)` (None): the run then refuses to start.
  decay_from: `WORKDIR[:STEP]` of a warmup-stable-decay run: continue its full train state and
    data position from that stable-phase step through a decay of `train.decay_steps` steps (the
    scaling-curve recipe; keep those steps with `checkpoint.keep_steps`).
  tokenizer: a tokenizer file or directory; empty = init_from's, else the prepared data's
    (synthetic / in-memory data may run without one when model.vocab_size is set).
  data: the input pipeline (`data.pipeline`), plus `data.builtin` (`data.builtin`): data that
    `python -m codepmp_jax.data.builtin` builds with no input (train only reads it), and `data.prompt_format`: the template the data's prompts are
    rendered in, recorded with the model (`templates.FORMATS`; "" = from the data,
    `train.resolve_prompt_format`), and `data.truncation`: how sequences longer than seq_len are
    cut (`encode.TRUNCATION`; "" = the prepared data's, else keep_end; `train.resolve_truncation`).
  loss: `rm_coef * BT + lm_coef * LM + center_coef * centering`; loss_type sigmoid | logexp.
  train: global_batch pairs per step, split into `microbatches`; total_steps 0 = `epochs` over the
    data (the full batches of each epoch); eval_microbatches 0 = microbatches; lm_chunk: the LM
    loss runs the head this many positions at a time (0 = full logits); trainable: which
    parameters train (`optim.trainable_mask`): `all` (with LoRA: adapters + score head),
    `top:N` (the top N layers + score; needs model.scan_layers=False) or `regex:PATTERN` over
    parameter paths such as `layers_11/mlp/up_proj/kernel`; frozen ones get no optimizer state.
  mesh_shape: (data, fsdp, tensor) sizes, one may be -1; logical_rules: None = sharding.DEFAULT_RULES.
  dcn_mesh_shape: slices along each mesh axis for a multi-slice pod (product = number of slices,
    e.g. (2, 1, 1): data parallel across 2 slices, FSDP inside each); (1, 1, 1) = one slice.
  compilation_cache_dir: JAX's persistent compilation cache; "auto" = <workdir>/compile_cache on
    accelerators and multi-process runs (off on one CPU process), "" = off.
  checkpoint.keep_steps: steps kept beyond the newest `keep` (stable-phase checkpoints).
  distributed: `initialize` = jax.distributed.initialize() with auto-detection (TPU, Slurm, ...).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_fields("tiny")
  config.init_from = ""
  config.decay_from = ""
  config.tokenizer = ""
  config.data = pipeline.default_data_config()
  config.data.builtin = builtin.default_builtin_config()
  config.data.prompt_format = ""
  config.data.truncation = ""
  config.loss = losses.default_loss_config()
  config.optimizer = default_optimizer_config()
  config.train = ml_collections.ConfigDict(dict(
      global_batch=1024, microbatches=1, seq_len=1024, total_steps=0, epochs=1.0,
      log_every=10, eval_every=100, eval_batch=0, eval_batches=0, eval_microbatches=0,
      decay_steps=0, lm_chunk=256, trainable="all"))
  config.mesh_shape = (1, -1, 1)
  config.dcn_mesh_shape = (1, 1, 1)
  config.compilation_cache_dir = "auto"
  config.logical_rules = ml_collections.FieldReference(None, field_type=list)
  config.checkpoint = ml_collections.ConfigDict(dict(save_every=500, keep=3, keep_steps=()))
  config.distributed = ml_collections.ConfigDict(dict(
      initialize=False, coordinator_address="", num_processes=1, process_id=0))
  return config


CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file named like `--config`: `configs/x.py[:arg]` or `x[:arg]`."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.suffix:
    file = CONFIGS_DIR / f"{path}.py"
  spec_ = importlib.util.spec_from_file_location(file.stem, file)
  if spec_ is None or not file.is_file():
    raise FileNotFoundError(f"no config file {file}")
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(arg or None)
