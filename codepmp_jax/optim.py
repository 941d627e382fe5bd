"""Learning-rate schedules and the AdamW optimizer used for PMP and RM fine-tuning.

Schedules follow the Hugging Face Trainer conventions so runs compare with TRL/OpenRLHF ones:
the schedule is evaluated at the number of updates already applied (0 for the first update);
warmup rises linearly from 0 over `ceil(warmup_ratio * total_steps)` steps; decay phases reach
`min_lr_ratio * lr` one step after the last update, exactly like `transformers`'
`get_cosine_with_min_lr_schedule_with_warmup` and `get_wsd_schedule`.

Parameter-efficient training (`train.trainable`, `model.lora`): `trainable_mask` says which
parameters train; `make_optimizer` gives the frozen ones no optimizer state at all (no Adam
moments, no weight decay) and leaves them bit-for-bit unchanged.
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine")
NO_DECAY_LEAVES = ("scale", "bias")
LORA_LEAVES = ("lora_a", "lora_b")  # model.lora's adapter leaves (codepmp_jax.model.lora)
HEAD = "score"  # the reward head, trainable under every `train.trainable` but a regex
_LAYER = re.compile(r"layers_(\d+)")


def default_optimizer_config() -> ml_collections.ConfigDict:
  """All optimizer fields with the paper's PMP values (DESIGN.md) and Hugging Face AdamW defaults.

  schedule: constant | cosine | wsd (warmup-stable-decay); decay_shape (wsd only): linear | cosine;
  grad_clip <= 0 turns clipping off.
  """
  return ml_collections.ConfigDict(dict(
      lr=1e-6,
      schedule="wsd",
      warmup_ratio=0.03,
      decay_ratio=0.1,
      min_lr_ratio=0.0,
      decay_shape="linear",
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip=1.0,
  ))


def _ratio_steps(ratio: float, total_steps: int, name: str) -> int:
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"optimizer.{name}={ratio} must be in [0, 1]")
  # Rounded up like transformers' TrainingArguments.get_warmup_steps, ignoring float noise
  # such as 0.03 * 100 = 3.0000000000000004.
  return math.ceil(ratio * total_steps - 1e-9)


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the number of updates applied so far.

  - constant: linear warmup from 0, then `lr`.
  - cosine: linear warmup, then a half cosine from `lr` to `min_lr_ratio * lr` at `total_steps`.
  - wsd: linear warmup, flat at `lr`, then over the last `ceil(decay_ratio * total_steps)` steps
    a linear (default) or cosine (`decay_shape`) decay to
    `min_lr_ratio * lr`.
  """
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule {cfg.schedule!r} is not one of {SCHEDULES}")
  if cfg.decay_shape not in DECAY_SHAPES:
    raise ValueError(f"optimizer.decay_shape {cfg.decay_shape!r} is not one of {DECAY_SHAPES}")
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be at least 1")
  if not 0.0 <= cfg.min_lr_ratio <= 1.0:
    raise ValueError(f"optimizer.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
  lr, min_ratio = float(cfg.lr), float(cfg.min_lr_ratio)
  warmup = _ratio_steps(cfg.warmup_ratio, total_steps, "warmup_ratio")
  if cfg.schedule == "wsd":
    decay = _ratio_steps(cfg.decay_ratio, total_steps, "decay_ratio")
    if warmup + decay > total_steps:
      raise ValueError(
          f"optimizer warmup ({warmup} steps) and decay ({decay} steps) exceed total_steps={total_steps}")
    decay_start, decay_shape = total_steps - decay, cfg.decay_shape
  elif cfg.schedule == "cosine":
    decay, decay_start, decay_shape = total_steps - warmup, warmup, "cosine"
  else:
    decay, decay_start, decay_shape = 0, total_steps, "linear"

  def schedule(count: jax.Array) -> jax.Array:
    step = jnp.asarray(count, jnp.float32)
    warm = step / max(1, warmup)
    progress = jnp.clip((step - decay_start) / max(1, decay), 0.0, 1.0)
    if decay_shape == "linear":
      shape = 1.0 - progress
    else:
      shape = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    decayed = min_ratio + (1.0 - min_ratio) * shape
    factor = jnp.where(step < warmup, warm, jnp.where(step < decay_start, 1.0, decayed))
    return lr * factor

  return schedule


def _leaf_name(path: tuple) -> str:
  """The last dictionary key on a tree path (skipping e.g. the `.value` of boxed Flax params)."""
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(names[-1]) if names else ""


def weight_decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: everything except norm scales and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _leaf_name(path) not in NO_DECAY_LEAVES, params)


def param_path(path: tuple) -> str:
  """A tree path as the slash-joined parameter name `train.trainable` regexes see, e.g.
  `layers_1/attn/q_proj/kernel` (`layers/...` when layers are scanned)."""
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def parse_trainable(trainable: str) -> tuple[str, Any]:
  """`train.trainable` as ("all", None), ("top", N) or ("regex", compiled pattern)."""
  if trainable == "all":
    return "all", None
  if trainable.startswith("top:"):
    count = trainable[len("top:"):]
    if not count.isdigit():
      raise ValueError(f"train.trainable={trainable!r}: top:N needs a whole number of layers")
    return "top", int(count)
  if trainable.startswith("regex:"):
    try:
      return "regex", re.compile(trainable[len("regex:"):])
    except re.error as e:
      raise ValueError(f"train.trainable={trainable!r}: bad regular expression ({e})") from e
  raise ValueError(f"train.trainable={trainable!r} is not all, top:N or regex:PATTERN")


def trainable_mask(params: Any, trainable: str = "all") -> Any:
  """True for the leaves of `params` that train under `trainable` (`train.trainable`).

  - `all`: every parameter; with LoRA adapters in the tree (`model.lora`), only the adapters
    and the `score` head (PEFT's default, `modules_to_save=["score"]`).
  - `top:N`: the top N transformer layers (`layers_{L-N}` .. `layers_{L-1}`) and `score`; with
    adapters, only the adapters of those layers and `score`. Needs unscanned layers for
    0 < N < L: a scanned stack is one leaf per weight, so it cannot be frozen layer by layer
    (optimizer state is per leaf), and that is an error asking for `model.scan_layers=False`.
  - `regex:PATTERN`: the leaves whose `param_path` (e.g. `layers_11/mlp/up_proj/kernel`,
    `layers_3/attn/q_proj/lora_a`, `score/kernel`) the pattern matches anywhere (`re.search`),
    taken literally: `regex:(layers_(10|11)|score)`, `regex:(lora_|score)`.
  Worked out from the tree's structure only, so it is the same at trace time and on the host.
  """
  kind, arg = parse_trainable(trainable)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [param_path(path) for path, _ in flat]
  has_lora = any(p.rsplit("/", 1)[-1] in LORA_LEAVES for p in paths)
  is_head = lambda p: p.split("/", 1)[0] == HEAD  # noqa: E731
  base = lambda p: (not has_lora) or p.rsplit("/", 1)[-1] in LORA_LEAVES  # noqa: E731
  if kind == "all":
    flags = [is_head(p) or base(p) for p in paths]
  elif kind == "top":
    stacked = [leaf.shape[0] for (path, leaf), p in zip(flat, paths) if p.split("/", 1)[0] == "layers"]
    if stacked and arg not in (0, stacked[0]):
      raise ValueError(f"train.trainable={trainable!r} freezes layer by layer, which a scanned "
                       "layer stack cannot do (one optimizer state per stacked weight): set "
                       "model.scan_layers=False")
    layers = {int(m.group(1)) for p in paths if (m := _LAYER.fullmatch(p.split("/", 1)[0]))}
    num_layers = stacked[0] if stacked else max(layers, default=-1) + 1
    if arg > num_layers:
      raise ValueError(f"train.trainable={trainable!r}: the model has only {num_layers} layers")

    def top(p):
      if p.split("/", 1)[0] == "layers":
        return arg > 0  # the whole stack (arg == num_layers) or none of it
      m = _LAYER.fullmatch(p.split("/", 1)[0])
      return m is not None and int(m.group(1)) >= num_layers - arg
    flags = [is_head(p) or (top(p) and base(p)) for p in paths]
  else:
    flags = [arg.search(p) is not None for p in paths]
  if paths and not any(flags):
    raise ValueError(f"train.trainable={trainable!r} leaves no parameter to train")
  return jax.tree_util.tree_unflatten(treedef, flags)


def make_optimizer(cfg: Any, total_steps: int, trainable: str = "all") -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW on `make_schedule`, no weight decay on norms and biases.

  optax's adamw applies decoupled weight decay scaled by the scheduled lr,
  `p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)`, which is torch.optim.AdamW's update.
  The chain always has two elements so the optimizer-state layout does not depend on grad_clip.

  `trainable` (`trainable_mask`): when it freezes anything in the params given to `init`, the
  state is optax's `multi_transform` of that chain over the trainable leaves and `set_to_zero`
  over the frozen ones, so frozen leaves have no Adam moments (their place in `mu`/`nu` is an
  empty `MaskedNode`), no weight decay, no share of the clipping norm, and a zero update. When
  everything trains, the state is the plain chain's (checkpoints of full runs keep their layout).
  """
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
  adamw = optax.adamw(
      make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
      weight_decay=cfg.weight_decay, mask=weight_decay_mask)
  full = optax.chain(clip, adamw)
  parse_trainable(trainable)  # a malformed spec fails here, not at the first step

  def labels(params):
    return jax.tree.map(lambda keep: "trainable" if keep else "frozen",
                        trainable_mask(params, trainable))

  partitioned = optax.multi_transform({"trainable": full, "frozen": optax.set_to_zero()}, labels)

  def init(params):
    if all(jax.tree.leaves(trainable_mask(params, trainable))):
      return full.init(params)
    return partitioned.init(params)

  def update(updates, state, params=None):
    if isinstance(state, optax.transforms.PartitionState):
      return partitioned.update(updates, state, params)
    return full.update(updates, state, params)

  return optax.GradientTransformation(init, update)


def opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, default: Any) -> Any:
  """Shardings for an optimizer state: a leaf that sits under a parameter's path (its trailing
  dictionary keys name a parameter, e.g. `mu/layers_0/attn/q_proj/kernel`) and has its shape
  gets that parameter's sharding; every other leaf (step counts) gets `default`. Unlike
  `optax.tree_map_params` it also reads the partial trees of a `multi_transform` state."""
  by_path = {}
  for (path, leaf), shard in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree.leaves(param_shardings)):
    by_path[tuple(k.key for k in path)] = (leaf.shape, shard)

  def place(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    for i in range(len(keys)):
      found = by_path.get(tuple(keys[i:]))
      if found is not None and found[0] == leaf.shape:
        return found[1]
    return default

  return jax.tree_util.tree_map_with_path(place, opt_state)
