"""Trains a reward model: PMP (Bradley-Terry + LM loss) or RM fine-tuning (Bradley-Terry only).

  python -m codepmp_jax.train --config=configs/tiny.py --workdir=DIR [--config.a.b=v ...]

Reads top to bottom like big_vision's trainer: set-up (distributed, workdir, mesh, tokenizer,
model config, data, optimizer), the config resolved and written once, the train state (restored
from a checkpoint -- this workdir's newest, or `decay_from`'s --, initialised from `init_from`, or
fresh), then the loop, whose cadence (log, eval, save, preemption, throughput) is decided by `Due`.
A preemption saves the step every process agreed on and exits 0; a non-finite loss stops without
saving. The workdir's layout is `codepmp_jax.workdir`'s; beside the model it records the prompt
format the model learned (`prompt_format.json`, see `resolve_prompt_format`) and the truncation
policy of its data (`truncation.json`, `resolve_truncation`), which `score`, `eval`, `generate`
and `convert --to_hf` then use by default.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from codepmp_jax import checkpoint, cli, losses, metrics, optim, sharding, step
from codepmp_jax import workdir as layout
from codepmp_jax.data import builtin, encode, loaders, pipeline, prepared, templates
from codepmp_jax.data.tokenizer import Tokenizer, load_tokenizer
from codepmp_jax.model import flops, lora, transformer
from codepmp_jax.model.config import ModelConfig, resolve_attention

# Fields of the model config that a run sets on top of an `init_from` checkpoint: how the model is
# computed (and adapted: `lora`), not what it is. Every other ModelConfig field is the checkpoint's.
NUMERICS_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "attention", "causal_block",
                   "attention_block_bytes", "attention_min_block", "splash_interpret",
                   "lora")
# `init_from` values that mean "no checkpoint": fresh random parameters.
SCRATCH = ("", "scratch")
COMPILE_CACHE_DIR = "compile_cache"
_SHARED_CHECK_FILE = ".shared_workdir_check"


class NonFiniteLoss(RuntimeError):
  pass


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` when the config asks for it (auto-detects TPU/Slurm/GKE)."""
  if cfg.coordinator_address:
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  elif cfg.initialize:
    jax.distributed.initialize()


def init_source(config: ml_collections.ConfigDict) -> str:
  """The checkpoint `init_from` names, or "" for fresh parameters.

  A recipe that must not start from random weights (RM fine-tuning) leaves `init_from` a
  placeholder (None): such a run stops here unless told a checkpoint or `scratch`.
  """
  if config.init_from is None:
    raise ValueError("this config needs --config.init_from=CKPT (a PMP or base checkpoint), or "
                     "--config.init_from=scratch to train from random init")
  return "" if config.init_from in SCRATCH else config.init_from


def check_shared_workdir(workdir: epath.Path) -> None:
  """In a multi-process run, stops at once unless every process sees the same `workdir`.

  Process 0 writes a random token there; after a barrier every process reads it back. A workdir
  on each host's local disk would otherwise give each host its own partial checkpoints.
  """
  if jax.process_count() == 1:
    return
  token = int(multihost_utils.broadcast_one_to_all(
      np.asarray(np.random.default_rng().integers(1, 2**31 - 1) if jax.process_index() == 0 else 0)))
  marker = workdir / _SHARED_CHECK_FILE
  if jax.process_index() == 0:
    marker.write_text(str(token))
  multihost_utils.sync_global_devices("codepmp_jax: shared workdir token written")
  try:
    seen = marker.exists() and marker.read_text().strip() == str(token)
  except OSError:
    seen = False
  everyone = np.asarray(multihost_utils.process_allgather(np.asarray(seen)))
  multihost_utils.sync_global_devices("codepmp_jax: shared workdir token read")
  if jax.process_index() == 0:
    marker.unlink(missing_ok=True)
  if not everyone.all():
    blind = [int(i) for i in np.flatnonzero(~everyone)]
    raise RuntimeError(f"workdir {workdir} is not shared: processes {blind} of "
                       f"{jax.process_count()} do not see what process 0 wrote there. A "
                       "multi-host run needs one workdir for all hosts: use gs://... or a shared "
                       "filesystem (NFS, Filestore, Lustre).")


def setup_compilation_cache(config: ml_collections.ConfigDict, workdir: epath.Path) -> str:
  """Points JAX's persistent compilation cache at `compilation_cache_dir` and returns it.

  "auto": `<workdir>/compile_cache` on accelerators and in multi-process runs (a pod's restart
  after preemption then skips recompiling the step), off on a single CPU process; "" is off.
  """
  directory = config.compilation_cache_dir
  if directory == "auto":
    on = jax.process_count() > 1 or jax.default_backend() != "cpu"
    directory = str(workdir / COMPILE_CACHE_DIR) if on else ""
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def resolve_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer | None:
  """The run's tokenizer; prepared data must have been made with it."""
  from_prepared = config.data.source == "prepared"
  source = init_source(config)
  init_tokenizer = checkpoint.as_path(source) / layout.TOKENIZER if source else None
  path = (config.tokenizer or (str(init_tokenizer) if init_tokenizer and init_tokenizer.is_dir() else "")
          or (config.data.path if from_prepared else ""))
  if not path:
    return None
  tokenizer = load_tokenizer(path)
  if from_prepared:
    prepared.check_tokenizer(config.data.path, tokenizer.fingerprint)
  return tokenizer


def resolve_model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None) -> ModelConfig:
  """The model to train: from `init_from`'s checkpoint (numerics from the config) or the config."""
  fields = config.model.to_dict()
  source = init_source(config)
  if source:
    base = checkpoint.load_model_config(source)
    return base.replace(**{k: fields[k] for k in NUMERICS_FIELDS if k in fields})
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


def resolve_prompt_format(config: ml_collections.ConfigDict) -> str | None:
  """The prompt format (`templates.FORMATS`) the run's data is rendered in, or None if unknown.

  `data.prompt_format` when set; else from the data: the built-in data and prepared `pairs` that
  `synth` made (its manifest beside the pair files records the `code` template) are `code`, other
  prepared data the loader's format (`loaders.FORMAT_TEMPLATES`: gsm8k -> math, trl -> chat, ...;
  TRL standard string data needs `data.prompt_format=none`); synthetic and in-memory data none.
  """
  if config.data.prompt_format:
    if config.data.prompt_format not in templates.FORMATS:
      raise ValueError(f"config.data.prompt_format={config.data.prompt_format!r} is not one of "
                       f"{list(templates.FORMATS)}")
    return config.data.prompt_format
  if config.data.builtin.name:
    return "code"
  if config.data.source != "prepared":
    return None
  manifest = prepared.read_manifest(config.data.path)
  if manifest["format"] == "pairs" and manifest["sources"] and all(
      _made_by_synth(source["path"]) for source in manifest["sources"]):
    return "code"
  return loaders.FORMAT_TEMPLATES[manifest["format"]]


def resolve_truncation(config: ml_collections.ConfigDict) -> str:
  """The truncation policy (`encode.TRUNCATION`) the run's data was cut with, recorded with the
  model so `score` and `eval` cut their inputs the same way.

  Prepared data records it in its manifest (`data.truncation`, when set, must agree); synthetic
  and in-memory data take `data.truncation` or the default, `keep_end`.
  """
  wanted = config.data.truncation
  if wanted:
    encode.check_truncation(wanted)
  if config.data.source != "prepared":
    return wanted or encode.DEFAULT_TRUNCATION
  cut = prepared.read_manifest(config.data.path)["truncation"]
  if wanted and wanted != cut:
    raise ValueError(f"config.data.truncation={wanted!r} but {config.data.path} was prepared with "
                     f"{cut!r}; prepare it again with --truncation={wanted}")
  return cut


def _made_by_synth(pair_file: str) -> bool:
  """Whether `pair_file` lies beside a synth manifest that records the PMP code template."""
  manifest = epath.Path(pair_file).parent / "manifest.json"
  try:
    prompts = json.loads(manifest.read_text()).get("prompts") or {}
  except (OSError, json.JSONDecodeError, AttributeError):
    return False
  return prompts.get("code") == templates.TEMPLATES["code"]


def parse_decay_from(spec: str) -> tuple[epath.Path, int]:
  """`WORKDIR:STEP` (or `WORKDIR`, its newest step) -> the stable-phase checkpoint to decay from.
  WORKDIR may be a URI (`gs://b/run:700`)."""
  path, _, step_text = spec.rpartition(":")
  if not step_text.isdigit():
    path, step_text = spec, ""
  workdir = checkpoint.as_path(path)
  found = int(step_text) if step_text else checkpoint.latest_train_step(workdir)
  if found is None or not (layout.path(workdir, layout.CHECKPOINTS) / str(found)).is_dir():
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
                   abstract_params: Any, param_shardings: Any) -> Any:
  """`init_from`'s params in the run's layout, dtype and shardings, or fresh ones.

  The checkpoint is read shard by shard onto the devices (`checkpoint.restore_params`); only the
  subtrees it lacks (e.g. an LM head a converted classifier did not have) and the run's LoRA
  adapters (`model.lora`) are initialised fresh.
  """
  canonical = model_config.replace(scan_layers=False)

  def fresh():
    params = nn.unbox(transformer.init_params(canonical, jax.random.key(config.seed)))
    return transformer.stack_layers(params, canonical.num_layers) if model_config.scan_layers else params

  source = init_source(config)
  if not source:
    return jax.jit(fresh, out_shardings=param_shardings)()
  if checkpoint.load_model_config(source).lora.rank:
    raise ValueError(f"init_from {source} holds LoRA adapters: merge them into a plain model first "
                     "(convert --to_hf=DIR, then convert --from_hf=DIR --output=CKPT)")
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        lora.strip(abstract_params), lora.strip(param_shardings))
  loaded, _ = checkpoint.restore_params(source, target)
  if model_config.lora.rank:  # fresh adapters on the checkpoint's weights (B = 0: the same model)
    loaded = lora.graft(loaded, jax.jit(lambda: lora.adapters(fresh()),
                                        out_shardings=lora.adapters(param_shardings))())
  missing = sorted(set(abstract_params) - set(loaded))
  if not missing:
    return loaded
  logging.warning("init_from %s has no %s; those start fresh", source, missing)
  params = jax.jit(fresh, out_shardings=param_shardings)()
  return {k: loaded.get(k, v) for k, v in params.items()}


class HeldOutLoss:
  """Metrics over the held-out split (or its first `eval_batches` batches).

  The eval pipeline is built once and rewound to its start for every evaluation; the eval step
  is microbatched like the train step, so evaluation fits wherever training does.
  """

  def __init__(self, eval_step, data: pipeline.PairBatches, max_batches: int, loss_cfg: Any):
    self.eval_step, self.data, self.max_batches, self.loss_cfg = eval_step, data, max_batches, loss_cfg
    self.start = data.get_state()

  def __call__(self, params: Any) -> dict[str, float]:
    self.data.set_state(self.start)
    totals = None
    for i, batch in enumerate(self.data):
      if self.max_batches and i >= self.max_batches:
        break
      sums = jax.device_get(self.eval_step(params, batch))
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if totals is None:  # (prepared unpacked data is checked at the start: builtin.check_eval_split)
      raise ValueError("the held-out split gave no batch of train.eval_batch pairs: lower "
                       "--config.train.eval_batch, hold out more data, or set --config.train.eval_every=0")
    return {f"eval/{k}": float(v) for k, v in losses.metrics_from_sums(totals, self.loss_cfg).items()}

  def close(self) -> None:
    self.data.close()


def itstime(step_number: int, every: int, total_steps: int) -> bool:
  """big_vision's cadence rule: every `every` steps (0 = never), and always at the last step."""
  return step_number == total_steps or (every > 0 and step_number % every == 0)


@dataclasses.dataclass(frozen=True)
class Due:
  """What the loop does after a step: the whole cadence of the run in one place."""
  log: bool
  eval: bool
  save: bool
  preempted: bool

  @classmethod
  def at(cls, step_number: int, total_steps: int, config: ml_collections.ConfigDict,
         preempted: bool) -> Due:
    tc, cc = config.train, config.checkpoint
    evaluate = tc.eval_every > 0 and itstime(step_number, tc.eval_every, total_steps)
    return cls(log=evaluate or itstime(step_number, tc.log_every, total_steps), eval=evaluate,
               save=itstime(step_number, cc.save_every, total_steps) or step_number in cc.keep_steps,
               preempted=preempted)

  @property
  def reads_metrics(self) -> bool:
    """Whether the step's metrics come to the host now (else they are checked one step late)."""
    return self.log or self.save or self.preempted


class Throughput:
  """Tokens/s and MFU over the steps since the last `read` (evaluation time left out).

  Counts all `R L` positions of each batch's rows (padding included; bucketed rows are
  shorter), and the FLOPs of what the step computes on them (`flops.packed_step_flops`).
  """

  def __init__(self, model_config: ModelConfig, lm_loss: bool, peak_flops: float):
    self.model_config, self.lm_loss, self.peak = model_config, lm_loss, peak_flops
    self._flops_by_shape: dict[tuple[int, ...], float] = {}
    self.restart()

  def restart(self) -> None:
    self.start, self.tokens, self.flops = time.perf_counter(), 0, 0.0

  def add(self, batch: dict) -> None:
    shape = batch["input_ids"].shape
    # rows, row length, LM slots, sequence slots and their length
    key = shape + batch["lm_index"].shape[1:] + batch["sequence_index"].shape[1:]
    if key not in self._flops_by_shape:
      self._flops_by_shape[key] = flops.packed_step_flops(self.model_config, *key, self.lm_loss)
    self.tokens += math.prod(shape)
    self.flops += self._flops_by_shape[key]

  def read(self) -> dict[str, float]:
    elapsed = time.perf_counter() - self.start
    values = {"tokens_per_s": self.tokens / elapsed, "mfu": self.flops / elapsed / self.peak}
    self.restart()
    return values


class Preemption:
  """Whether to save and stop now.

  One process: a SIGTERM handler sets a flag (the previous handler is put back by `close`).
  Several: no Python handler -- it would replace the one JAX's preemption service installs --
  but JAX's preemption sync point, which is true on every process at the same step once any of
  them got the notice. `reached` must then be called at every step on every process.
  """

  def __init__(self, checkpoints: checkpoint.TrainCheckpoints):
    self.checkpoints = checkpoints
    self.multi_process = jax.process_count() > 1
    self.signalled = False
    self._previous = None
    if not self.multi_process:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, *_) -> None:
    self.signalled = True

  def reached(self, step_number: int) -> bool:
    if self.multi_process:
      return self.checkpoints.reached_preemption(step_number)
    return self.signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _abstract_with(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def train(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> dict[str, float]:
  """Runs (or resumes) training in `workdir` (local or `gs://`); returns the last logged metrics."""
  maybe_initialize_distributed(config.distributed)
  if init_source(config):  # a config that needs init_from, or a wrong one, fails before anything is built
    checkpoint.load_model_config(init_source(config))
  workdir = checkpoint.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check_shared_workdir(workdir)
  setup_compilation_cache(config, workdir)
  lead = jax.process_index() == 0

  # Data and tokenizer: prepared data only (train builds none; builtin.py builds the default's).
  builtin.check_prepared(config.data)
  tokenizer = resolve_tokenizer(config)
  model_config = resolve_attention(resolve_model_config(config, tokenizer), jax.default_backend())
  prompt_format = resolve_prompt_format(config)
  truncation = resolve_truncation(config)
  if config.data.source == "synthetic" and config.data.vocab_size > model_config.vocab_size:
    raise ValueError(f"config.data.vocab_size={config.data.vocab_size} exceeds the model's "
                     f"vocab_size={model_config.vocab_size}")

  mesh = sharding.make_mesh(config.mesh_shape, dcn_shape=config.dcn_mesh_shape)
  rules = sharding.rules_from_config(config.logical_rules)
  batch_sharding = step.batch_shardings(mesh, rules)
  tc = config.train
  train_data = pipeline.build_pipeline(
      config.data, split="train", global_batch=tc.global_batch, seq_len=tc.seq_len,
      sharding=batch_sharding["input_ids"], seed=config.seed, repeat=True,
      row_multiple=tc.microbatches)
  # One epoch is exactly the full batches of one epoch (what the pipeline yields per epoch).
  total_steps = tc.total_steps or max(1, math.floor(tc.epochs * train_data.steps_per_epoch + 1e-9))
  logging.info("data[train]: %d pairs, %d steps an epoch, %s", train_data.num_pairs,
               train_data.steps_per_epoch,
               f"every step packed into {train_data.shape}" if config.data.pack else
               f"{train_data.left_over_pairs} pairs of this process left out of each epoch")
  restore_from = None  # (workdir, step) of the train state to continue
  latest = checkpoint.latest_train_step(workdir)
  if config.decay_from:
    decay_dir, decay_step = parse_decay_from(config.decay_from)
    total_steps = decay_step + tc.decay_steps
    config = decay_phase_config(config, decay_step, tc.decay_steps)
    restore_from = (decay_dir, decay_step)
  if latest is not None:
    restore_from = (workdir, latest)

  # The resolved config, written once: nothing below changes it.
  if lead:
    layout.path(workdir, layout.CONFIG).write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    checkpoint.save_model_config(layout.path(workdir, layout.MODEL_CONFIG), model_config)
    if tokenizer is not None:
      tokenizer.save(layout.path(workdir, layout.TOKENIZER))
    if prompt_format is not None:
      templates.save_prompt_format(workdir, prompt_format)
    encode.save_truncation(workdir, truncation)

  optimizer = optim.make_optimizer(config.optimizer, total_steps, tc.trainable)
  model = transformer.RewardModel(model_config)
  abstract_state, state_sharding = step.state_shardings(model_config, optimizer, mesh, rules)
  checkpoints = checkpoint.TrainCheckpoints(
      workdir, keep=config.checkpoint.keep, keep_steps=tuple(config.checkpoint.keep_steps))
  eval_microbatches = tc.eval_microbatches or tc.microbatches
  evaluator = None
  if tc.eval_every:
    eval_batch = tc.eval_batch or tc.global_batch
    builtin.check_eval_split(config.data, eval_batch)  # a split with no whole batch is an error
    if eval_batch % eval_microbatches:
      raise ValueError(f"train.eval_batch={eval_batch} does not split into "
                       f"train.eval_microbatches={eval_microbatches}")
    eval_data = pipeline.build_pipeline(
        config.data, split="eval", global_batch=eval_batch, seq_len=tc.seq_len,
        sharding=batch_sharding["input_ids"], seed=config.seed, repeat=False,
        row_multiple=eval_microbatches)

  # MFU's denominator: the device's bf16 peak, or on CPU a matmul measured now.
  peak = (metrics.device_peak_flops() or metrics.measure_cpu_peak_flops()) * jax.device_count()

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # The train state: restored (this workdir's newest step, or decay_from's), or initialised.
    if restore_from is not None:
      source_dir, start = restore_from
      source = checkpoints if source_dir == workdir else checkpoint.TrainCheckpoints(source_dir, keep=1)
      state, data_state = source.restore(start, _abstract_with(abstract_state, state_sharding))
      if source is not checkpoints:
        source.close()
      train_data.set_state(data_state)
      logging.info("restored step %d of %s", start, source_dir)
    else:
      start = 0
      params = initial_params(config, model_config, abstract_state.params, state_sharding.params)
      state = jax.jit(lambda p: step.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                      out_shardings=state_sharding)(params)

    train_fn = step.make_train_step(model, optimizer, config.loss, tc.microbatches, tc.lm_chunk,
                                    tc.trainable)
    eval_fn = step.make_eval_step(model, config.loss, eval_microbatches, tc.lm_chunk)
    train_step = step.jit_train_step(train_fn, state_sharding, batch_sharding, mesh)
    eval_step = step.jit_eval_step(eval_fn, state_sharding.params, batch_sharding, mesh)
    if tc.eval_every:
      evaluator = HeldOutLoss(eval_step, eval_data, tc.eval_batches, config.loss)

    schedule = optim.make_schedule(config.optimizer, total_steps)
    writer = metrics.MetricWriter(workdir, total_steps, start_step=start)
    throughput = Throughput(model_config, config.loss.lm_coef != 0, peak)
    preemption = Preemption(checkpoints)

    def check_finite(step_number: int, values: dict) -> None:
      bad = [k for k, v in values.items() if not np.isfinite(v)]
      if bad:
        last_good = checkpoints.latest_step()
        raise NonFiniteLoss(f"non-finite {bad} at step {step_number}; " + (
            f"the last good checkpoint is step {last_good} in {workdir}" if last_good is not None
            else "no checkpoint was saved yet"))

    last: dict[str, float] = {}
    pending = None  # (step, device metrics) of the previous step, checked one step late
    run_start = time.perf_counter()
    try:
      for step_number in range(start + 1, total_steps + 1):
        batch = next(train_data)
        state, step_metrics = train_step(state, batch)
        throughput.add(batch)
        if pending is not None:
          check_finite(pending[0], jax.device_get(pending[1]))
        pending = (step_number, step_metrics)
        writer.advance(step_number)
        due = Due.at(step_number, total_steps, config, preemption.reached(step_number))
        if due.reads_metrics:
          values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          check_finite(step_number, values)
          pending = None
        if due.log:
          values.update(lr=float(schedule(step_number - 1)),
                        elapsed_s=time.perf_counter() - run_start,  # since this process started the loop
                        **throughput.read())
          if due.eval:
            values.update(evaluator(state.params))
            throughput.restart()
          # Compilations so far (fixed batch shapes: one each per run).
          values.update(compiles_train_step=train_step._cache_size(),
                        compiles_eval_step=eval_step._cache_size())
          writer.write(step_number, values)
          last = values
        if due.save or due.preempted:
          checkpoints.save(step_number, state, train_data.get_state())
        if due.preempted:
          logging.warning("preempted: saved step %d in %s and stopping", step_number, workdir)
          break
    finally:
      preemption.close()
      checkpoints.close()
      writer.close()
      train_data.close()
      if evaluator is not None:
        evaluator.close()
  if lead:
    final_step = int(jax.device_get(state.step))
    summary = {"step": final_step, "finished": final_step == total_steps, **last}
    layout.path(workdir, layout.SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True))
    logging.info("finished: %s", summary)
    # Reward mean/std over the held-out split, from the last evaluation: normalized rewards (#33).
    reward_stats = checkpoint.reward_stats_from_eval(last, final_step) if summary["finished"] else None
    if reward_stats is not None:
      checkpoint.save_reward_stats(workdir, **reward_stats)
  return last


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing adds none)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:arg]).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv
  train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main, define_flags)
