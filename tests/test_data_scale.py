"""Prepared data at scale: per-host reading with 4 processes (each opens only its own ArrayRecord
shards), exact resume, training without TensorFlow."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from codepmp_jax.data import prepare, prepared as prepared_lib
from codepmp_jax.data.tokenizer import train_sentencepiece

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAIRS = 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> pathlib.Path:
  tmp = tmp_path_factory.mktemp("scale")
  rows = [{"prompt": f"Task {i}: print {i} then {i * 7}.", "chosen": f"print({i}); print({i * 7})",
           "rejected": f"print({i + 1})"} for i in range(PAIRS)]
  (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  train_sentencepiece([json.dumps(r) for r in rows] * 3, 400, tmp / "tok")
  prepare.prepare(prepare.PrepareSettings(
      inputs=(str(tmp / "pairs.jsonl"),), format="pairs", tokenizer=str(tmp / "tok.model"),
      seq_len=48, out=str(tmp / "out"), num_shards=8, split="train:1", num_workers=1))
  return tmp / "out"


# One process of 4: an epoch and a half of batches, which shard files it opened, and the batches
# after a resume from the state at batch 3 (in a fresh iterator).
_PROCESS = """
import json, sys
from codepmp_jax.data import pipeline
cfg = pipeline.default_data_config()
cfg.update(path=sys.argv[1], prefetch=2)
index = int(sys.argv[2])
def make():
  return pipeline.PairBatches(cfg, split="train", global_batch=8, seq_len=48, sharding=None, seed=3,
                              repeat=True, process_index=index, process_count=4)
it = make()
batches = [next(it)["input_ids"].tolist() for _ in range(12)]
opened = it.source.opened
it.close()
resume = make()
first = make()
for _ in range(3):
  next(first)
resume.set_state(json.loads(json.dumps(first.get_state())))
first.close()
resumed = [next(resume)["input_ids"].tolist() for _ in range(9)]
resume.close()
print(json.dumps({"batches": batches, "opened": opened, "resumed": resumed,
                  "steps": it.steps_per_epoch}))
"""


def test_four_processes_open_only_their_shards_and_see_every_pair_once(prepared):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, str(prepared), str(p)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(4)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(out.splitlines()[-1]))
  names = prepared_lib.shard_paths(prepared, prepared_lib.read_manifest(prepared), "train")
  epoch = []
  for p, result in enumerate(results):
    assert result["steps"] == 8  # 64 pairs / 4 processes / 2 pairs per process and batch
    # Process p owns pairs [16p, 16p + 16): exactly shards 2p and 2p + 1 of the 8.
    assert result["opened"] == names[2 * p:2 * p + 2]
    batches = result["batches"]
    assert result["resumed"] == batches[3:12]  # exact, across the epoch boundary at batch 8
    epoch += [tuple(row) for batch in batches[:8] for row in batch]  # one pair a row
    second = sorted(tuple(row) for batch in batches[8:] for row in batch)
    assert second != sorted(tuple(row) for batch in batches[:4] for row in batch)
  assert len(epoch) == len(set(epoch)) == PAIRS  # every pair exactly once per epoch


# As on a machine without TensorFlow (the GPU machines): no import finder finds a tensorflow
# module (TFDS then runs its TensorFlow-free code, as when TensorFlow is not installed); prepare
# writes a TFDS dataset and training reads it.
_NO_TF = """
import sys

from launch.experiments.gpu_reproduction import hide_modules
hide_modules({"tensorflow"})
from codepmp_jax import train
from codepmp_jax.config import default_config
from codepmp_jax.data import prepare
pairs, out = sys.argv[1], sys.argv[2]
prepare.prepare(prepare.PrepareSettings(
    inputs=(pairs + "/pairs.jsonl",), format="pairs", tokenizer=pairs + "/tok.model", seq_len=48,
    out=out + "/prepared", num_shards=2, split="train:1", num_workers=1))
config = default_config()
config.data.path = out + "/prepared"
config.model.update(vocab_size=0, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1)
config.train.update(global_batch=8, seq_len=48, total_steps=3, log_every=1, eval_every=0)
config.mesh_shape = (-1, 1, 1)
final = train.train(config, out + "/run")
assert "tensorflow" not in sys.modules
print("loss", final["loss"])
"""


@pytest.mark.slow
def test_prepares_and_trains_without_tensorflow(prepared, tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", _NO_TF, str(prepared.parent), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert np.isfinite(float(result.stdout.split("loss")[-1]))
