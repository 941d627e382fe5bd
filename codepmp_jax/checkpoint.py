"""Self-describing checkpoints: parameters (orbax), the model config and the tokenizer together.

Two kinds share one layout for the model part:
- a model checkpoint (`save_model`), written by `convert` and at the end of training:
  `params/`, `model_config.json`, `tokenizer/`;
- a training workdir, whose `checkpoints/<step>/` (orbax CheckpointManager) hold the whole train
  state plus the data position, next to `model_config.json` and `tokenizer/` in the workdir.
`load_model` reads either, so `init_from`, `score` and `eval` take both.
"""
from __future__ import annotations

import pathlib
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from codepmp_jax.model import transformer
from codepmp_jax.model.config import ModelConfig

MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
PARAMS_DIR = "params"
TRAIN_CHECKPOINTS_DIR = "checkpoints"


def save_model(path: str | pathlib.Path, params: Any, model_config: ModelConfig,
               tokenizer: Any = None) -> pathlib.Path:
  """Writes params (canonical unscanned layout), model config and tokenizer under `path`."""
  path = pathlib.Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  if "layers" in params:
    params = transformer.unstack_layers(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / PARAMS_DIR, params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    model_config.save(path / MODEL_CONFIG_FILE)
    if tokenizer is not None:
      tokenizer.save(path / TOKENIZER_DIR)
  return path


def latest_train_step(workdir: str | pathlib.Path) -> int | None:
  """The newest finished step under `workdir/checkpoints`, or None."""
  root = pathlib.Path(workdir) / TRAIN_CHECKPOINTS_DIR
  steps = [int(p.name) for p in root.glob("*") if p.name.isdigit() and (p / "state").is_dir()]
  return max(steps) if steps else None


def load_model_config(path: str | pathlib.Path) -> ModelConfig:
  """The model config stored beside a model checkpoint or in a training workdir."""
  file = pathlib.Path(path) / MODEL_CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file}: no model config; is {path} a checkpoint or training workdir?")
  return ModelConfig.load(file)


def load_model(path: str | pathlib.Path, shardings: Any = None) -> tuple[Any, ModelConfig]:
  """Params (canonical layout) and model config from a model checkpoint or a training workdir.

  `shardings`, a tree of NamedShardings matching the canonical params, places the restored arrays
  directly on devices (no host copy of the whole model).
  """
  path = pathlib.Path(path).absolute()
  config = load_model_config(path)
  abstract = abstract_params(config)
  if shardings is not None:
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  if (path / PARAMS_DIR).is_dir():
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, abstract)
    return params, config
  step = latest_train_step(path)
  if step is None:
    raise FileNotFoundError(f"{path}: neither {PARAMS_DIR}/ nor a training checkpoint under "
                            f"{TRAIN_CHECKPOINTS_DIR}/")
  return restore_train_params(path, step, config, abstract), config


def restore_train_params(workdir: pathlib.Path, step: int, config: ModelConfig, abstract: Any) -> Any:
  """Only the params of a training checkpoint (optimizer state is not read)."""
  state_dir = workdir / TRAIN_CHECKPOINTS_DIR / str(step) / "state"
  target = transformer.stack_layers(abstract, config.num_layers) if config.scan_layers else abstract
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(
          item={"params": target}, partial_restore=True,
          restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)}))
  params = restored["params"]
  return transformer.unstack_layers(params) if config.scan_layers else params


def abstract_params(config: ModelConfig) -> Any:
  """Shapes and dtypes of the canonical (unscanned) params of `config`, without allocating them."""
  canonical = config.replace(scan_layers=False)
  return jax.eval_shape(lambda: nn.unbox(transformer.init_params(canonical, jax.random.key(0))))


class TrainCheckpoints:
  """Orbax-managed training checkpoints under `workdir/checkpoints/<step>/{state,data}`.

  Saves are asynchronous; the newest `keep` are kept, plus every step listed in `keep_steps`
  (the stable-phase checkpoints a scaling curve decays from). A save is only ever made of a state
  whose loss was finite, so the newest checkpoint is always a good one.
  """

  def __init__(self, workdir: str | pathlib.Path, keep: int, keep_steps: tuple[int, ...] = (),
               async_save: bool = True):
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_steps:
      policies.append(ocp.checkpoint_managers.CustomSteps(list(keep_steps)))
    self.manager = ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / TRAIN_CHECKPOINTS_DIR,
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
    """True on every process once any of them was told to stop (multi-host preemption sync)."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
