"""Test setup, before anything imports jax: 8 fake CPU devices, and one persistent XLA compilation
cache for the session (the suite's many subprocess training runs compile the same small steps; a
hit skips the compile), shared with their subprocesses. The cache is a fresh temporary directory,
removed at exit, so every session starts cold and no test sees another session's executables."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ start-up lines
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the session's process, not its subprocesses
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="codepmp-test-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on the cache's file lock: concurrent subprocesses (the multi-process tests)
# share it, and no reader sees an entry half written (a bad entry is only a warning and a compile).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))

import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real reference data sets (GSM8K, LogiQA 2.0) beside the checkout."""
  assert SHARED_DATA.is_dir(), f"missing {SHARED_DATA}"
  return SHARED_DATA
