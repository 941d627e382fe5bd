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
from jax.experimental import mesh_utils
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


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """`shape` with its -1 entry (if any) replaced by the devices left over."""
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
  return tuple(shape)


def split_mesh_shape(shape: Sequence[int], dcn_shape: Sequence[int]) -> tuple[int, ...]:
  """The per-slice (ICI) shape of a global mesh `shape` split over slices by `dcn_shape`.

  `dcn_shape[i]` slices lie along mesh axis i, so axis i spans `shape[i] // dcn_shape[i]` chips
  inside a slice; e.g. (4, 16, 1) over (4, 1, 1): data across 4 slices, FSDP inside each.
  """
  if len(dcn_shape) != len(shape):
    raise ValueError(f"dcn_mesh_shape {tuple(dcn_shape)} must have {len(shape)} entries {MESH_AXES}")
  bad = [axis for axis, n, d in zip(MESH_AXES, shape, dcn_shape) if d < 1 or n % d]
  if bad:
    raise ValueError(f"mesh shape {tuple(shape)} does not split over dcn_mesh_shape "
                     f"{tuple(dcn_shape)} along {bad}")
  return tuple(n // d for n, d in zip(shape, dcn_shape))


def device_grid(shape: Sequence[int], devices: Sequence[Any], dcn_shape: Sequence[int] | None = None
                ) -> np.ndarray:
  """`devices` arranged as a mesh of `shape` (one entry may be -1) on the physical topology.

  Within a slice, `mesh_utils.create_device_mesh` orders devices so that neighbouring mesh
  positions are neighbouring chips. `dcn_shape` (slices along each axis, product = number of
  slices) builds a hybrid mesh with `create_hybrid_device_mesh`: only the axes given slices cross
  the slow data-centre network, so FSDP and tensor parallelism stay on the chip interconnect
  unless asked otherwise. Slices are told apart by `slice_index` (TPU) or else by process (GPU
  nodes).
  """
  shape = resolve_mesh_shape(shape, len(devices))
  if dcn_shape is not None and math.prod(dcn_shape) > 1:
    return mesh_utils.create_hybrid_device_mesh(
        split_mesh_shape(shape, dcn_shape), tuple(dcn_shape), devices,
        process_is_granule=not hasattr(devices[0], "slice_index"), allow_split_physical_axes=True)
  return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None,
              dcn_shape: Sequence[int] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh laid out by `device_grid`; its axes are Auto (Explicit axes
  break linen's logical partitioning)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_grid(shape, devices, dcn_shape), MESH_AXES)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> LogicalRules:
  """Rules as tuples (config files hold them as lists); None means the defaults."""
  if rules is None:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_sharding(logical_specs: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
  """Sharding of an array (of any rank) whose leading axis is the batch and whose other axes are whole."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
