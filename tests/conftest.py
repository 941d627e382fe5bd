"""Test setup: 8 fake CPU devices and quiet XLA start-up, set before anything imports jax."""
import os

# The suite is compile-bound: LLVM's backend optimizations cost more compile time than the tiny
# programs run (tests/test_step.py: 36 s -> 26 s without them); subprocesses inherit the flags.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ start-up lines

import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real reference data sets (GSM8K, LogiQA 2.0) beside the checkout."""
  assert SHARED_DATA.is_dir(), f"missing {SHARED_DATA}"
  return SHARED_DATA
