"""Trains a reward model: PMP (Bradley-Terry + LM loss) or RM fine-tuning (Bradley-Terry only).

  python -m codepmp_jax.train --config=configs/tiny.py --workdir=DIR [--config.a.b=v ...]

Reads top to bottom: set-up (distributed, mesh, tokenizer, model config, data, optimizer), the
train state (resumed from the workdir, initialised from `init_from`, or fresh), then the loop with
logging, periodic evaluation, checkpointing, and clean exits on NaN or SIGTERM.
"""
from __future__ import annotations

import json
import logging as logging_std
import math
import pathlib
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from codepmp_jax import checkpoint, losses, metrics, optim, sharding, step
from codepmp_jax.data import builtin, pipeline, prepare
from codepmp_jax.data.tokenizer import Tokenizer, load_tokenizer
from codepmp_jax.model import flops, transformer
from codepmp_jax.model.config import ModelConfig

# Fields of the model config that a run may change on top of an `init_from` checkpoint.
NUMERICS_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers")


class NonFiniteLoss(RuntimeError):
  pass


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` when the config asks for it (auto-detects TPU/Slurm/GKE)."""
  if cfg.coordinator_address:
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  elif cfg.initialize:
    jax.distributed.initialize()


def resolve_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer | None:
  """The run's tokenizer; prepared data must have been made with it."""
  prepared = config.data.source == "prepared"
  init_tokenizer = pathlib.Path(config.init_from) / checkpoint.TOKENIZER_DIR
  path = (config.tokenizer or (str(init_tokenizer) if config.init_from and init_tokenizer.is_dir() else "")
          or (config.data.path if prepared else ""))
  if not path:
    return None
  tokenizer = load_tokenizer(path)
  if prepared:
    prepare.check_tokenizer(config.data.path, tokenizer.fingerprint)
  return tokenizer


def resolve_model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None) -> ModelConfig:
  """The model to train: from `init_from`'s checkpoint (numerics from the config) or the config."""
  fields = config.model.to_dict()
  if config.init_from:
    base = checkpoint.load_model_config(config.init_from)
    return base.replace(**{k: fields[k] for k in NUMERICS_FIELDS})
  if tokenizer is None:
    if not fields["vocab_size"]:
      raise ValueError("config.model.vocab_size=0 takes the size from a tokenizer, but this run has "
                       "none: set config.tokenizer or config.model.vocab_size")
    return ModelConfig.from_dict(fields)
  if not fields["vocab_size"]:
    fields["vocab_size"] = tokenizer.vocab_size
  for name, token_id in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                         ("pad_token_id", tokenizer.pad_id)):
    fields[name] = token_id if fields[name] is None else fields[name]
  if fields["vocab_size"] < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={fields['vocab_size']} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size}")
  return ModelConfig.from_dict(fields)


def parse_decay_from(spec: str) -> tuple[pathlib.Path, int]:
  """`WORKDIR:STEP` (or `WORKDIR`, its newest step) -> the stable-phase checkpoint to decay from."""
  path, _, step = spec.rpartition(":") if ":" in spec else (spec, "", "")
  workdir = pathlib.Path(path).absolute()
  found = int(step) if step else checkpoint.latest_train_step(workdir)
  if found is None or not (workdir / checkpoint.TRAIN_CHECKPOINTS_DIR / str(found)).is_dir():
    raise FileNotFoundError(f"decay_from={spec!r}: no training checkpoint at step {found} in {workdir}")
  return workdir, found


def decay_phase_config(config: ml_collections.ConfigDict, stable_steps: int, decay_steps: int
                       ) -> ml_collections.ConfigDict:
  """The warmup-stable-decay schedule of a run of `stable_steps + decay_steps` whose decay starts
  exactly at `stable_steps` (the cheap scaling-curve recipe: decay from stable checkpoints)."""
  if config.optimizer.schedule != "wsd" or decay_steps < 1:
    raise ValueError("decay_from needs optimizer.schedule='wsd' and train.decay_steps >= 1")
  config = ml_collections.ConfigDict(config.to_dict())
  config.optimizer.decay_ratio = decay_steps / (stable_steps + decay_steps)
  warmup = math.ceil(config.optimizer.warmup_ratio * (stable_steps + decay_steps) - 1e-9)
  if warmup > stable_steps:
    raise ValueError(f"decay_from step {stable_steps} is still inside the warmup ({warmup} steps)")
  return config


def initial_params(config: ml_collections.ConfigDict, model_config: ModelConfig,
                   param_shardings: Any) -> Any:
  """Fresh params, or `init_from`'s (score head included; a missing LM head stays fresh)."""
  canonical = model_config.replace(scan_layers=False)

  def fresh():
    params = nn.unbox(transformer.init_params(canonical, jax.random.key(config.seed)))
    return transformer.stack_layers(params, canonical.num_layers) if model_config.scan_layers else params

  params = jax.jit(fresh, out_shardings=param_shardings)()
  if not config.init_from:
    return params
  loaded, _ = checkpoint.load_model(config.init_from)
  if model_config.scan_layers:
    loaded = transformer.stack_layers(loaded, model_config.num_layers)
  missing = sorted(set(params) - set(loaded))
  if missing:
    logging.warning("init_from %s has no %s; those start fresh", config.init_from, missing)
  merged = {k: loaded.get(k, v) for k, v in params.items()}
  return jax.device_put(merged, param_shardings)


def evaluate(eval_step, params, config, model_config, batch_sharding) -> dict[str, float]:
  """Metrics over the held-out split (or its first `eval_batches` batches)."""
  data = pipeline.build_pipeline(
      config.data, split="eval", global_batch=config.train.eval_batch or config.train.global_batch,
      seq_len=config.train.seq_len, sharding=batch_sharding["input_ids"], seed=config.seed,
      repeat=False)
  totals = None
  for i, batch in enumerate(data):
    if config.train.eval_batches and i >= config.train.eval_batches:
      break
    sums = jax.device_get(eval_step(params, batch))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  if totals is None:
    return {}
  return {f"eval/{k}": float(v) for k, v in losses.metrics_from_sums(totals, config.loss).items()}


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """Runs (or resumes) training in `workdir`; returns the last logged metrics."""
  maybe_initialize_distributed(config.distributed)
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  lead = jax.process_index() == 0
  if lead:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))

  # Data and tokenizer (the built-in default builds its data on first use).
  builtin.ensure(config.data)
  tokenizer = resolve_tokenizer(config)
  model_config = resolve_model_config(config, tokenizer)
  if lead:
    model_config.save(workdir / checkpoint.MODEL_CONFIG_FILE)
    if tokenizer is not None:
      tokenizer.save(workdir / checkpoint.TOKENIZER_DIR)

  if config.data.source == "synthetic" and config.data.vocab_size > model_config.vocab_size:
    raise ValueError(f"config.data.vocab_size={config.data.vocab_size} exceeds the model's "
                     f"vocab_size={model_config.vocab_size}")

  mesh = sharding.make_mesh(config.mesh_shape)
  rules = sharding.rules_from_config(config.logical_rules)
  batch_sharding = step.batch_shardings(mesh, rules)
  tc = config.train
  train_data = pipeline.build_pipeline(
      config.data, split="train", global_batch=tc.global_batch, seq_len=tc.seq_len,
      sharding=batch_sharding["input_ids"], seed=config.seed, repeat=True)
  total_steps = tc.total_steps or math.ceil(tc.epochs * train_data.num_pairs / tc.global_batch)
  decay_source = parse_decay_from(config.decay_from) if config.decay_from else None
  if decay_source is not None:
    total_steps = decay_source[1] + tc.decay_steps
    config = decay_phase_config(config, decay_source[1], tc.decay_steps)
  optimizer = optim.make_optimizer(config.optimizer, total_steps)
  model = transformer.RewardModel(model_config)
  abstract_state, state_sharding = step.state_shardings(model_config, optimizer, mesh, rules)
  checkpoints = checkpoint.TrainCheckpoints(
      workdir, keep=config.checkpoint.keep, keep_steps=tuple(config.checkpoint.keep_steps))

  # MFU's denominator: the device's bf16 peak, or on CPU a matmul measured now.
  peak = (metrics.device_peak_flops() or metrics.measure_cpu_peak_flops()) * jax.device_count()

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # The train state: resumed, or initialised.
    start = checkpoints.latest_step()
    if start is not None:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, state_sharding)
      state, data_state = checkpoints.restore(start, target)
      train_data.set_state(data_state)
      logging.info("resumed from %s at step %d", workdir, start)
    elif decay_source is not None:
      source_dir, start = decay_source
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, state_sharding)
      source = checkpoint.TrainCheckpoints(source_dir, keep=1)
      state, data_state = source.restore(start, target)
      source.close()
      train_data.set_state(data_state)
      logging.info("decay phase: %d steps from step %d of %s", tc.decay_steps, start, source_dir)
    else:
      start = 0
      params = initial_params(config, model_config, state_sharding.params)
      state = jax.jit(lambda p: step.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                      out_shardings=state_sharding)(params)

    train_step = step.jit_train_step(
        step.make_train_step(model, optimizer, config.loss, tc.microbatches),
        state_sharding, batch_sharding, mesh)
    eval_step = step.jit_eval_step(step.make_eval_step(model, config.loss), state_sharding.params,
                                   batch_sharding, mesh)

    tokens_per_step = tc.global_batch * 2 * tc.seq_len
    flops_per_step = flops.pair_step_flops(model_config, tc.global_batch, tc.seq_len,
                                           lm_loss=config.loss.lm_coef != 0)
    schedule = optim.make_schedule(config.optimizer, total_steps)
    writer = metrics.MetricWriter(workdir, total_steps, start_step=start)
    stop = {"signal": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))

    def check_finite(step_number: int, values: dict) -> None:
      bad = [k for k, v in values.items() if not np.isfinite(v)]
      if bad:
        last_good = checkpoints.latest_step()
        raise NonFiniteLoss(f"non-finite {bad} at step {step_number}; " + (
            f"the last good checkpoint is step {last_good} in {workdir}" if last_good is not None
            else "no checkpoint was saved yet"))

    def save(step_number: int) -> None:
      checkpoints.save(step_number, state, train_data.get_state())

    last: dict[str, float] = {}
    pending = None  # (step, device metrics) of the previous step, checked one step late
    run_start = window_start = time.perf_counter()
    window_steps = 0
    try:
      for step_number in range(start + 1, total_steps + 1):
        batch = next(train_data)
        state, step_metrics = train_step(state, batch)
        if pending is not None:
          check_finite(pending[0], jax.device_get(pending[1]))
        pending = (step_number, step_metrics)
        window_steps += 1
        writer.advance(step_number)
        log_now = step_number % tc.log_every == 0 or step_number == total_steps
        save_now = (step_number % config.checkpoint.save_every == 0 or step_number == total_steps
                    or step_number in config.checkpoint.keep_steps)
        preempted = stop["signal"] or checkpoints.reached_preemption(step_number)
        if log_now or save_now or preempted:
          values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          check_finite(step_number, values)
          pending = None
        if log_now:
          elapsed = time.perf_counter() - window_start
          values.update(lr=float(schedule(step_number - 1)),
                        elapsed_s=time.perf_counter() - run_start,  # since this process started the loop
                        tokens_per_s=tokens_per_step * window_steps / elapsed,
                        mfu=flops_per_step * window_steps / elapsed / peak)
          if tc.eval_every and (step_number % tc.eval_every == 0 or step_number == total_steps):
            values.update(evaluate(eval_step, state.params, config, model_config, batch_sharding))
          writer.write(step_number, values)
          window_start, window_steps = time.perf_counter(), 0  # throughput leaves evaluation out
          last = values
        if save_now or preempted:
          save(step_number)
        if preempted:
          logging.warning("preempted: saved step %d in %s and stopping", step_number, workdir)
          break
    finally:
      checkpoints.close()
      writer.close()
  if lead:
    final_step = int(jax.device_get(state.step))
    summary = {"step": final_step, "finished": final_step == total_steps, **last}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    logging.info("finished: %s", summary)
  return last


FLAGS = flags.FLAGS


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax (several lines per checkpoint); warnings still show."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  """Keeps a program's log readable: our progress, and only warnings from orbax."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing adds none)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:arg]).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv
  quiet_library_logs()
  train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
