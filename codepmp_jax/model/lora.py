"""Low-rank adapters (LoRA, Hu et al. 2021) on the model's projections, PEFT-compatible.

`ModelConfig.lora` (`LoraConfig`: rank, alpha, targets) turns them on. An adapted `Linear` with
kernel W [in, out] keeps W and adds two parameters beside it, `lora_a` [in, rank] and `lora_b`
[rank, out], computing `x @ W + (alpha / rank) * (x @ lora_a) @ lora_b`. As in PEFT, A starts
random (kaiming-uniform, bound 1/sqrt(in)) and B at zero, so the initial model is the base model;
there is no adapter dropout. In PEFT's [out, in] torch layout `lora_A.weight = lora_a.T` and
`lora_B.weight = lora_b.T`.

Checkpoints keep the adapters as separate leaves (`.../q_proj/lora_a`); `merge` folds them into
the kernels, which is what `convert --to_hf` exports (a plain `*ForSequenceClassification`).
Which leaves train is `optim.trainable_mask`'s business: with adapters present, by default only
they and the `score` head (PEFT's `modules_to_save=["score"]`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codepmp_jax.model.config import LoraConfig, ModelConfig

A, B = "lora_a", "lora_b"
LEAVES = (A, B)


def init_a(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32) -> jax.Array:
  """PEFT's A init: torch's kaiming_uniform_(a=sqrt(5)) on the [rank, in] weight, i.e. uniform in
  +-1/sqrt(in)."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def is_lora_path(path: tuple) -> bool:
  """Whether a tree path (DictKeys, or plain names) ends at an adapter leaf."""
  names = [getattr(k, "key", k) for k in path]
  return bool(names) and names[-1] in LEAVES


def has_lora(params: Any) -> bool:
  return any(is_lora_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def _filter(tree: Any, keep) -> Any:
  """The nested dict `tree` with only the leaves `keep(name)` is true for (empty dicts dropped)."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      sub = _filter(value, keep)
      if sub:
        out[name] = sub
    elif keep(name):
      out[name] = value
  return out


def strip(params: Any) -> Any:
  """`params` without adapter leaves: the base model's tree."""
  return _filter(params, lambda name: name not in LEAVES)


def adapters(params: Any) -> Any:
  """Only the adapter leaves of `params` (in their places)."""
  return _filter(params, lambda name: name in LEAVES)


def graft(base: Any, extra: Any) -> Any:
  """`base` with the leaves of `extra` (e.g. `adapters(...)`) added in their places."""
  if not isinstance(extra, dict):
    return extra
  out = dict(base)
  for name, value in extra.items():
    out[name] = graft(base.get(name, {}), value)
  return out


def merge(params: dict, config: ModelConfig) -> tuple[dict, ModelConfig]:
  """Params (canonical, unscanned) with every adapter folded into its kernel, on the host, and the
  config without adapters: `W + (alpha / rank) * lora_a @ lora_b`, computed in float32 and cast
  back to W's dtype. Params without adapters come back as they are."""
  if not config.lora.rank:
    return params, config
  scale = config.lora.scale

  def fold(node: Any) -> Any:
    if not isinstance(node, dict):
      return node
    if A in node:
      kernel = np.asarray(node["kernel"])
      delta = np.asarray(node[A], np.float32) @ np.asarray(node[B], np.float32)
      merged = (kernel.astype(np.float32) + np.float32(scale) * delta).astype(kernel.dtype)
      return {**{k: v for k, v in node.items() if k not in LEAVES}, "kernel": merged}
    return {k: fold(v) for k, v in node.items()}

  return fold(params), dataclasses.replace(config, lora=LoraConfig())
