"""Topology-aware meshes: the shape logic of single- and multi-slice (hybrid DCN x ICI) meshes."""
import types

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from codepmp_jax import sharding


def _fake_devices(num_slices, per_slice):
  """Stand-ins for TPU devices of a multi-slice pod (CPU devices have no slice_index)."""
  return [types.SimpleNamespace(id=i, slice_index=i // per_slice, process_index=i // 2,
                                platform="cpu", device_kind="cpu")
          for i in range(num_slices * per_slice)]


def test_single_slice_mesh_is_auto_and_resolves_minus_one():
  mesh = sharding.make_mesh((2, -1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.reshape(-1)) == sorted(d.id for d in jax.devices())


def test_split_mesh_shape():
  assert sharding.split_mesh_shape((4, 16, 1), (4, 1, 1)) == (1, 16, 1)
  assert sharding.split_mesh_shape((2, 8, 2), (1, 2, 1)) == (2, 4, 2)
  with pytest.raises(ValueError, match=r"does not split .* along \['fsdp'\]"):
    sharding.split_mesh_shape((2, 3, 1), (1, 2, 1))
  with pytest.raises(ValueError, match="must have 3 entries"):
    sharding.split_mesh_shape((2, 4, 1), (2, 1))


def test_hybrid_mesh_keeps_fsdp_inside_a_slice():
  """2 slices x 4 chips, data parallel across slices: every FSDP group lies in one slice."""
  grid = sharding.device_grid((2, -1, 1), _fake_devices(2, 4), dcn_shape=(2, 1, 1))
  assert grid.shape == (2, 4, 1)
  slices = np.vectorize(lambda d: d.slice_index)(grid)
  assert (slices == np.arange(2)[:, None, None]).all()


def test_hybrid_mesh_fsdp_across_slices_only_when_asked():
  grid = sharding.device_grid((1, 8, 1), _fake_devices(2, 4), dcn_shape=(1, 2, 1))
  slices = np.vectorize(lambda d: d.slice_index)(grid)[0, :, 0]
  assert list(slices) == [0, 0, 0, 0, 1, 1, 1, 1]  # contiguous: one DCN hop per FSDP ring half


def test_hybrid_mesh_needs_matching_slices():
  with pytest.raises(ValueError):
    sharding.device_grid((2, 4, 1), _fake_devices(2, 4), dcn_shape=(4, 1, 1))
