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

from codepmp_jax.data import registry

# The layout the tests read (`shared_data / "gsm8k" / "test.jsonl"`): ../shared/data's.
_DATA_LINKS = "codepmp_test_data"


def _data_dir(tmp_root: pathlib.Path) -> pathlib.Path:
  """A directory with every registered data set at its registry layout, found by the registry
  ($CODEPMP_DATA, then ../shared/data, then the cache)."""
  paths = {name: pathlib.Path(registry.path(name, download_missing=False))
           for name in sorted(registry.DATASETS)}
  roots = {pathlib.Path(str(p)[:-len(registry.DATASETS[n].file)]) for n, p in paths.items()
           if str(p).endswith(registry.DATASETS[n].file)}
  if len(roots) == 1 and all(str(p).endswith(registry.DATASETS[n].file) for n, p in paths.items()):
    return roots.pop()
  links = tmp_root / _DATA_LINKS  # found in different places: one directory of links
  for name, p in paths.items():
    link = links / registry.DATASETS[name].file
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
      link.symlink_to(p.resolve())
  return links


def pytest_configure(config):
  """Before any test (and once, in the xdist controller): find or fetch the data sets; with no copy
  and no network, stop at once with the registry's one line (which data set, where it looked, how
  to provide it)."""
  if hasattr(config, "workerinput"):
    return
  try:
    for name in sorted(registry.DATASETS):
      registry.path(name, timeout=30)
  except (registry.DataNotFound, OSError) as e:
    pytest.exit(f"error: the tests need the public data sets: {e}", returncode=2)


# The modules that take longest (their subprocess and real-model tests), collected first: xdist's
# loadscope hands modules out in collection order, so these start at once and none is left
# running alone at the end of the suite.
LONGEST_FIRST = ("test_pod.py", "test_gcs.py", "test_train.py", "test_peft.py", "test_wiring.py",
                 "test_model_hf_parity.py", "test_generate.py", "test_experiments.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest in order


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> pathlib.Path:
  """The real reference data sets (GSM8K, LogiQA 2.0) laid out as in ../shared/data, wherever the
  registry found them (`pytest_configure` fetched what was missing)."""
  return _data_dir(tmp_path_factory.getbasetemp())
