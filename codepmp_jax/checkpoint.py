"""Self-describing checkpoints: parameters (orbax), the model config and the tokenizer together.

Two kinds share one layout for the model part:
- a model checkpoint (`save_model`), written by `convert`: `params/` (canonical, unscanned
  layout), `model_config.json`, `tokenizer/`, `prompt_format.json` (the template it was trained on),
  `truncation.json` and, once measured, `reward_stats.json` (the reward mean and std over a
  reference split, for normalized rewards: `save_reward_stats`);
- a training workdir (layout in `codepmp_jax.workdir`), whose `checkpoints/<step>/` (orbax
  CheckpointManager) hold the whole train state (in the run's layout, scanned or not) plus the data
  position, next to `model_config.json`, `tokenizer/` and `prompt_format.json` in the workdir.
`load_model` and `restore_params` read either, so `init_from`, `score` and `eval` take both.

Every path goes through `etils.epath`: `gs://...` reaches orbax unchanged, a local path is made
absolute (orbax needs that), never the other way round.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from codepmp_jax.data import encode, templates
from codepmp_jax.model import transformer
from codepmp_jax.model.config import ModelConfig
from codepmp_jax.storage import is_remote
from codepmp_jax.workdir import CHECKPOINTS, MODEL_CONFIG, REWARD_STATS, TOKENIZER

PARAMS_DIR = "params"  # a model checkpoint's params (a workdir keeps them in CHECKPOINTS/<step>/)
REWARD_STATS_FILE = REWARD_STATS  # beside truncation.json, in a checkpoint or a workdir

PathLike = str | os.PathLike


def as_path(path: PathLike) -> epath.Path:
  """`path` as an epath: a URI (`gs://b/x`) unchanged, a local path made absolute."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def save_model_config(path: PathLike, model_config: ModelConfig) -> None:
  as_path(path).write_text(json.dumps(model_config.to_dict(), indent=2, sort_keys=True))


def save_model(path: PathLike, params: Any, model_config: ModelConfig,
               tokenizer: Any = None, prompt_format: str | None = None,
               truncation: str | None = None, reward_stats: dict | None = None) -> epath.Path:
  """Writes params (canonical unscanned layout), model config, tokenizer and (when known) the
  prompt format the model was trained on (`templates.FORMATS`), its data's truncation policy
  (`encode.TRUNCATION`) and its reward statistics (`save_reward_stats`) under `path`."""
  path = as_path(path)
  path.mkdir(parents=True, exist_ok=True)
  if "layers" in params:
    params = transformer.unstack_layers(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / PARAMS_DIR, params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    save_model_config(path / MODEL_CONFIG, model_config)
    if tokenizer is not None:
      tokenizer.save(path / TOKENIZER)
    if prompt_format is not None:
      templates.save_prompt_format(path, prompt_format)
    if truncation is not None:
      encode.save_truncation(path, truncation)
    if reward_stats is not None:
      save_reward_stats(path, **reward_stats)
  return path


def save_reward_stats(directory: PathLike, mean: float, std: float, **info: Any) -> dict:
  """Record the reward mean and standard deviation over a reference split beside the model (a
  checkpoint or a training workdir), for normalized rewards `(r - mean) / std` (`score`, `serve`
  and `eval --normalize`; a Hugging Face export carries them as config.json's `mean` and `std`,
  where OpenRLHF's `--normalize_reward` reads them). `info` says where they came from
  (`source`, `sequences`). Returns what was written."""
  mean, std = float(mean), float(std)
  if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
    raise ValueError(f"reward stats need a finite mean and a positive std, got mean={mean} std={std}")
  stats = {"mean": mean, "std": std, **info}
  directory = as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / REWARD_STATS_FILE).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
  return stats


def load_reward_stats(directory: PathLike) -> dict | None:
  """The reward stats stored beside a model (`save_reward_stats`), or None when never measured."""
  file = as_path(directory) / REWARD_STATS_FILE
  if not file.is_file():
    return None
  try:
    stats = json.loads(file.read_text())
    mean, std = float(stats["mean"]), float(stats["std"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError):
    raise ValueError(f"{file}: expected {{\"mean\": number, \"std\": positive number}}") from None
  if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
    raise ValueError(f"{file}: mean={mean} std={std}; the std must be positive and both finite")
  return {**stats, "mean": mean, "std": std}


def reward_stats_of(rewards: Any, **info: Any) -> dict:
  """Mean and standard deviation of `rewards` as OpenRLHF's reward trainer computes them at the
  end of training (`torch.std`, ddof 1, clamped to at least 1e-8), with `sequences` counted."""
  import numpy as np
  rewards = np.asarray(rewards, np.float64).ravel()
  if rewards.size < 2:
    raise ValueError(f"reward stats need at least 2 rewards, got {rewards.size}")
  return {"mean": float(rewards.mean()), "std": max(float(rewards.std(ddof=1)), 1e-8),
          "sequences": int(rewards.size), **info}


def reward_stats_from_eval(metrics: dict, step: int) -> dict | None:
  """Reward stats over the held-out split from a training run's last evaluation (`eval/` chosen
  and rejected reward means and population stds: chosen and rejected pooled, equally many), or
  None when that step logged no evaluation."""
  names = [f"eval/{side}_reward_{m}" for side in ("chosen", "rejected") for m in ("mean", "std")]
  if not all(n in metrics for n in names):
    return None
  mc, sc, mr, sr = (float(metrics[n]) for n in names)
  mean = (mc + mr) / 2
  std = math.sqrt(max((sc * sc + mc * mc + sr * sr + mr * mr) / 2 - mean * mean, 0.0))
  if not (math.isfinite(mean) and std > 0):
    return None
  return {"mean": mean, "std": std, "source": f"held-out split, training step {step}"}


def latest_train_step(workdir: PathLike) -> int | None:
  """The newest finished step under `workdir/checkpoints`, or None."""
  root = as_path(workdir) / CHECKPOINTS
  if not root.is_dir():
    return None
  steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir()]
  return max(steps) if steps else None


def load_model_config(path: PathLike) -> ModelConfig:
  """The model config stored beside a model checkpoint or in a training workdir."""
  file = as_path(path) / MODEL_CONFIG
  if not file.is_file():
    raise FileNotFoundError(f"{file}: no model config; is {path} a checkpoint or training workdir?")
  return ModelConfig.from_dict(json.loads(file.read_text()))


def abstract_params(config: ModelConfig) -> Any:
  """Shapes and dtypes of the canonical (unscanned) params of `config`, without allocating them."""
  canonical = config.replace(scan_layers=False)
  return jax.eval_shape(lambda: nn.unbox(transformer.init_params(canonical, jax.random.key(0))))


def _stacked_sharding(s: NamedSharding) -> NamedSharding:
  return NamedSharding(s.mesh, PartitionSpec(None, *s.spec))


def _unstacked_sharding(s: NamedSharding) -> NamedSharding:
  return NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:]))


def _abstract(a: Any, sharding: Any = None, shape: tuple[int, ...] | None = None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(a.shape if shape is None else shape, a.dtype, sharding=sharding)


def _stored_target(path: epath.Path, config: ModelConfig, layer_shardings: Any,
                   other_shardings: dict) -> tuple[str, Any]:
  """Where `path`'s params are stored (`params` dir or a train step) and their abstract tree,
  in the stored layout, each leaf with the sharding of its canonical counterpart (or none)."""
  canonical = abstract_params(config)
  layers = [f"layers_{i}" for i in range(config.num_layers)]

  def place(name, abstract):
    shard = layer_shardings if name in layers else other_shardings.get(name)
    if shard is None:
      return jax.tree.map(_abstract, abstract)
    return jax.tree.map(_abstract, abstract, shard)

  if (path / PARAMS_DIR).is_dir():
    return "params", {name: place(name, a) for name, a in canonical.items()}
  step = latest_train_step(path)
  if step is None:
    raise FileNotFoundError(f"{path}: neither {PARAMS_DIR}/ nor a training checkpoint under "
                            f"{CHECKPOINTS}/")
  target = {name: place(name, a) for name, a in canonical.items() if name not in layers}
  if config.scan_layers:  # a scanned run stores one `layers` subtree with a leading layer axis
    first = place(layers[0], canonical[layers[0]])
    target["layers"] = jax.tree.map(
        lambda a: _abstract(a, None if a.sharding is None else _stacked_sharding(a.sharding),
                            (config.num_layers,) + a.shape), first)
  else:
    target.update({name: place(name, canonical[name]) for name in layers})
  return f"{CHECKPOINTS}/{step}", target


def _restore_stored(path: epath.Path, where: str, target: Any) -> Any:
  if where == "params":
    return ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
  state_dir = path / where / "state"
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(
          item={"params": target}, partial_restore=True,
          restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)}))
  return restored["params"]


def load_model(path: PathLike, shardings: Any = None) -> tuple[Any, ModelConfig]:
  """Params (canonical layout, as stored dtype) and model config from a model checkpoint or a
  training workdir (its newest step).

  `shardings`, a tree of NamedShardings matching the canonical params, places the restored arrays
  directly on devices (no host copy of the whole model).
  """
  path = as_path(path)
  config = load_model_config(path)
  layer = others = None
  if shardings is not None:
    layer, others = shardings["layers_0"], shardings
  where, target = _stored_target(path, config, layer, others or {})
  params = _restore_stored(path, where, target)
  return (transformer.unstack_layers(params) if "layers" in params else params), config


def restore_params(path: PathLike, target: Any) -> tuple[Any, ModelConfig]:
  """`path`'s params straight into a run's layout, dtypes and shardings; and their model config.

  `target` is the run's abstract params (ShapeDtypeStructs with NamedShardings), scanned
  (`layers`) or not. Each stored array is read onto the devices with the sharding of its place in
  the run (a scanned run's layer shardings minus the layer axis), then one jit stacks or unstacks
  the layers and casts to the run's dtypes with the run's out_shardings: no device ever holds a
  whole copy of the model, and a bf16 checkpoint becomes the run's float32 master weights.
  Returns only the subtrees the checkpoint has (`params` keys of `target` it lacks are left out).
  """
  path = as_path(path)
  config = load_model_config(path)
  shardings = jax.tree.map(lambda a: a.sharding, target)
  scanned = "layers" in target
  layer = (jax.tree.map(_unstacked_sharding, shardings["layers"]) if scanned
           else shardings.get("layers_0"))
  where, stored = _stored_target(path, config, layer, shardings)
  params = _restore_stored(path, where, stored)
  layer_keys = {"layers"} if scanned else {f"layers_{i}" for i in range(config.num_layers)}
  keys = [k for k in target if k in layer_keys or k in params]

  def relayout(p):
    if scanned and "layers" not in p:
      p = transformer.stack_layers(p, config.num_layers)
    elif not scanned and "layers" in p:
      p = transformer.unstack_layers(p)
    return {k: jax.tree.map(lambda x, t: x.astype(t.dtype), p[k], target[k]) for k in keys}

  out = jax.jit(relayout, out_shardings={k: shardings[k] for k in keys})(params)
  return out, config


class TrainCheckpoints:
  """Orbax-managed training checkpoints under `workdir/checkpoints/<step>/{state,data}`.

  Saves are asynchronous; the newest `keep` are kept, plus every step listed in `keep_steps`
  (the stable-phase checkpoints a scaling curve decays from). A save is only ever made of a state
  whose loss was finite, so the newest checkpoint is always a good one.
  """

  def __init__(self, workdir: PathLike, keep: int, keep_steps: tuple[int, ...] = (),
               async_save: bool = True):
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_steps:
      policies.append(ocp.checkpoint_managers.CustomSteps(list(keep_steps)))
    self.manager = ocp.CheckpointManager(
        as_path(workdir) / CHECKPOINTS,
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies)),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """The train state (placed by the shardings in `abstract_state`) and the data position."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once any of them got a preemption notice (JAX's
    preemption sync point; False in a single process). Call it at every step on every process."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
