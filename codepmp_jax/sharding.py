"""The device mesh and the rules that map logical axis names onto it.

Every parameter and activation in the model carries logical axis names; these rules say which mesh
axis each name is split over. Parameters use `vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `norm`,
`layers`; activations use `batch`, `length` and the `act_*` names, so that an activation's feature
axis can stay whole while the matching parameter axis is split for FSDP.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: LogicalRules = (
    # Parameters: FSDP splits the model dimension, tensor parallelism the wide ones.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("layers", None),
    ("score", None),
    # Activations: the batch over data and fsdp (a pair's two rows always stay together).
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("head_dim", None),
    ("act_vocab", "tensor"),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one entry of `shape` may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> LogicalRules:
  """Rules as tuples (config files hold them as lists); None means the defaults."""
  if rules is None:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_sharding(logical_specs: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int) -> NamedSharding:
  """Sharding of an array whose leading axis is the batch and whose other axes are whole."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
