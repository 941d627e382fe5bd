"""Learning-rate schedules and the AdamW optimizer used for PMP and RM fine-tuning.

Schedules follow the Hugging Face Trainer conventions so runs compare with TRL/OpenRLHF ones:
the schedule is evaluated at the number of updates already applied (0 for the first update);
warmup rises linearly from 0 over `ceil(warmup_ratio * total_steps)` steps; decay phases reach
`min_lr_ratio * lr` one step after the last update, exactly like `transformers`'
`get_cosine_with_min_lr_schedule_with_warmup` and `get_wsd_schedule`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine")
NO_DECAY_LEAVES = ("scale", "bias")


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


def make_optimizer(cfg: Any, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW on `make_schedule`, no weight decay on norms and biases.

  optax's adamw applies decoupled weight decay scaled by the scheduled lr,
  `p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)`, which is torch.optim.AdamW's update.
  The chain always has two elements so the optimizer-state layout does not depend on grad_clip.
  """
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
  adamw = optax.adamw(
      make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
      weight_decay=cfg.weight_decay, mask=weight_decay_mask)
  return optax.chain(clip, adamw)
