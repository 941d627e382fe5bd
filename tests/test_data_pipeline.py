"""The input pipeline, unpacked: batch layout, epochs, buckets, per-process parts, exact resume
(Grain and tf.data readers), global arrays. Packed steps: test_packed_pipeline.py."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from codepmp_jax.data import packing, pipeline, prepare, sampler
from codepmp_jax.data.encode import EncodedPair, EncodedSequence, PairArrays
from codepmp_jax.data.tokenizer import train_sentencepiece

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pairs(n: int, max_len: int = 12, seed: int = 0) -> PairArrays:
  """Pair i's chosen starts with token 1000 + i (so batches show which pairs they hold)."""
  rng = np.random.default_rng(seed)
  pairs = []
  for i in range(n):
    lengths = rng.integers(3, max_len + 1, 2)
    chosen = (1000 + i, *rng.integers(3, 50, lengths[0] - 2), 2)
    rejected = (2000 + i, *rng.integers(3, 50, lengths[1] - 2), 2)
    pairs.append(EncodedPair(EncodedSequence(chosen, 1), EncodedSequence(rejected, 1), float(i)))
  return PairArrays.from_pairs(pairs)


def _batches(cfg, n, *, global_batch=8, seq_len=16, seed=0, repeat=True, index=0, count=1):
  it = pipeline.PairBatches(cfg, split="train", global_batch=global_batch, seq_len=seq_len,
                            sharding=None, seed=seed, repeat=repeat, process_index=index,
                            process_count=count)
  return it, [next(it) for _ in range(n)]


def _ids(batch) -> list[int]:
  return (batch["input_ids"][:, 0] - 1000).tolist()  # a row's first token: its pair's chosen


def test_pair_rows_lay_one_pair_a_row_by_hand():
  pairs = [EncodedPair(EncodedSequence((5, 6, 7, 2), 2), EncodedSequence((5, 6, 8, 9, 2), 2), 1.5),
           EncodedPair(EncodedSequence((4, 2), 0), EncodedSequence((4, 3, 2), 1))]
  batch = packing.pair_rows(PairArrays.from_pairs(pairs), 6, pad_id=0)
  np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 2, 5, 6, 8, 9, 2, 0, 0, 0],
                                                     [4, 2, 4, 3, 2, 0, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 0],
                                                       [1, 1, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0, 0],
                                                     [0, 1, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0]])
  # LM targets: chosen response tokens incl. eos (never a sequence's first, which nothing predicts).
  np.testing.assert_array_equal(batch["lm_mask"], [[0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                                                   [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["lm_index"], [[2, 3, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["reward_index"], [[3, 8], [1, 4]])
  np.testing.assert_array_equal(batch["sequence_index"][1], [[0, 1, -1, -1, -1, -1],
                                                             [2, 3, 4, -1, -1, -1]])
  np.testing.assert_array_equal(batch["margin"], [[1.5], [0.0]])
  np.testing.assert_array_equal(batch["pair_valid"], [[1.0], [1.0]])
  assert {k: v.shape for k, v in batch.items()} == packing.PackedShape.pair_rows(2, 6).array_shapes(1)
  # The same pairs as transformers scores them: each sequence in its own right-padded row.
  ids, lengths, lm_mask = PairArrays.from_pairs(pairs).sequence_rows(6, pad_id=0)
  np.testing.assert_array_equal(ids, [[5, 6, 7, 2, 0, 0], [5, 6, 8, 9, 2, 0], [4, 2, 0, 0, 0, 0],
                                      [4, 3, 2, 0, 0, 0]])
  np.testing.assert_array_equal(lengths, [4, 5, 2, 3])
  np.testing.assert_array_equal(lm_mask, [[0, 0, 1, 1, 0, 0], [0] * 6, [0, 1, 0, 0, 0, 0], [0] * 6])


def test_epochs_are_permutations_deterministic_in_the_seed_and_stop_when_asked():
  cfg = pipeline.in_memory_config(_pairs(50), pad_id=0)
  it, batches = _batches(cfg, 6, repeat=False)
  with pytest.raises(StopIteration):
    next(it)
  seen = [i for b in batches for i in _ids(b)]
  assert len(seen) == len(set(seen)) == 48 and it.left_over_pairs == 2 and it.num_pairs == 50
  assert it.get_state()["next_index"] == 6
  _, again = _batches(cfg, 12)
  _, other = _batches(cfg, 6, seed=1)
  assert [_ids(b) for b in again[:6]] == [_ids(b) for b in batches]
  assert [_ids(b) for b in other] != [_ids(b) for b in batches]
  assert [_ids(b) for b in again[6:]] != [_ids(b) for b in batches]  # a new order each epoch
  too_small, _ = _batches(pipeline.in_memory_config(_pairs(5), pad_id=0), 0, repeat=False)
  assert list(too_small) == [] and too_small.left_over_pairs == 5
  cfg.shuffle_buffer = 0
  _, ordered = _batches(cfg, 2)
  assert [_ids(b) for b in ordered] == [list(range(8)), list(range(8, 16))]


def test_buckets_are_a_few_fixed_lengths_shared_by_all_processes():
  cfg = pipeline.in_memory_config(_pairs(64, max_len=300, seed=3), pad_id=0, bucket=True)
  lengths = []
  for index in range(2):
    _, batches = _batches(cfg, 8, global_batch=2, seq_len=512, index=index, count=2)
    lengths.append([b["input_ids"].shape[-1] // 2 for b in batches])  # rows of 2 x the bucket
    for b in batches:
      assert b["positions"].max() < b["input_ids"].shape[-1] // 2
  assert lengths[0] == lengths[1]
  assert set(lengths[0]) <= {128, 256, 512} and len(set(lengths[0])) > 1
  assert sampler.bucket_lengths(512) == (128, 256, 512)
  assert sampler.bucket_lengths(1000) == (128, 256, 512, 1000)


def test_two_processes_read_disjoint_contiguous_parts():
  cfg = pipeline.in_memory_config(_pairs(41), pad_id=0)
  parts = []
  for index in range(2):
    it, batches = _batches(cfg, 5, global_batch=8, index=index, count=2, repeat=False)
    with pytest.raises(StopIteration):
      next(it)
    parts.append([_ids(b) for b in batches])
    assert all(len(ids) == 4 for ids in parts[-1]) and it.steps_per_epoch == 5
    assert {min(i // 20, 1) for ids in parts[-1] for i in ids} == {index}  # pairs [0, 20), [20, 41)
  assert it.left_over_pairs == 1  # process 0 holds 20 pairs: 5 full batches; process 1 holds 21
  all_ids = [i for part in parts for ids in part for i in ids]
  assert len(all_ids) == len(set(all_ids)) == 40


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
  tmp = tmp_path_factory.mktemp("prepared")
  rows = [{"prompt": f"Question {i}: add {i} and {i + 1}.", "chosen": f"{2 * i + 1}",
           "rejected": f"{2 * i + 2}"} for i in range(44)]
  (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  train_sentencepiece([json.dumps(r) for r in rows] * 3, 300, tmp / "tok")
  prepare.prepare(prepare.PrepareSettings(
      inputs=(str(tmp / "pairs.jsonl"),), format="pairs", tokenizer=str(tmp / "tok.model"),
      seq_len=32, out=str(tmp / "out"), num_shards=3, split="train:1", num_workers=1))
  return str(tmp / "out")


_RESUME = """
import json, sys
import numpy as np
from codepmp_jax.data import pipeline
cfg = pipeline.default_data_config()
cfg.update(json.loads(sys.argv[1]))
out = {}
for name, spec in json.loads(sys.argv[2]).items():
  it = pipeline.PairBatches(cfg, split="train", global_batch=8, seq_len=32, sharding=None, seed=7,
                            repeat=True, process_index=spec["index"], process_count=spec["count"])
  it.set_state(spec["state"])
  for step in range(5):
    for key, value in next(it).items():
      out[f"{name}/{step}/{key}"] = value
np.savez(sys.argv[3], **out)
"""


@pytest.mark.slow
@pytest.mark.parametrize("reader", pipeline.READERS)
def test_resume_in_a_new_process_gives_the_same_next_batches(prepared, tmp_path, reader):
  cfg = pipeline.default_data_config()
  cfg.update(path=prepared, bucket=True, prefetch=3, reader=reader)
  runs, specs = {}, {}
  for name, index, count in (("single", 0, 1), ("p0", 0, 2), ("p1", 1, 2)):
    full_it, full = _batches(cfg, 12, seq_len=32, seed=7, index=index, count=count)
    part_it, first = _batches(cfg, 7, seq_len=32, seed=7, index=index, count=count)
    full_it.close()
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(full, first) for k in a)
    runs[name] = full[7:]
    specs[name] = {"index": index, "count": count, "state": json.loads(json.dumps(part_it.get_state()))}
    part_it.close()
  assert full_it.steps_per_epoch == 5  # the 12 batches cross two epoch boundaries
  out = tmp_path / "resumed.npz"
  env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", _RESUME, json.dumps({"path": prepared, "bucket": True, "reader": reader}),
                           json.dumps(specs), str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  resumed = np.load(out)
  for name, batches in runs.items():
    for step, batch in enumerate(batches):
      for key, value in batch.items():
        np.testing.assert_array_equal(resumed[f"{name}/{step}/{key}"], value, err_msg=f"{name} {step} {key}")
  assert not np.array_equal(runs["p0"][0]["input_ids"], runs["p1"][0]["input_ids"])


def test_state_from_another_order_is_refused():
  cfg = pipeline.in_memory_config(_pairs(20), pad_id=0)
  it, _ = _batches(cfg, 1)
  state = it.get_state()
  other, _ = _batches(cfg, 0, seed=1)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)


def test_global_arrays_on_a_mesh_equal_the_host_batches():
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  cfg = pipeline.in_memory_config({"train": _pairs(40), "eval": _pairs(16)}, pad_id=0)
  it = pipeline.build_pipeline(cfg, split="train", global_batch=16, seq_len=16, sharding=sharding,
                               seed=0, repeat=True)
  host = pipeline.build_pipeline(cfg, split="train", global_batch=16, seq_len=16, sharding=None,
                                 seed=0, repeat=True)
  for _ in range(3):
    batch, expected = next(it), next(host)
    for key, value in batch.items():
      assert isinstance(value, jax.Array) and value.shape == expected[key].shape
      assert value.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
      np.testing.assert_array_equal(np.asarray(value), expected[key])
  assert pipeline.build_pipeline(cfg, split="eval", global_batch=16, seq_len=16, sharding=None,
                                 seed=0, repeat=False).num_pairs == 16


def test_read_groups_make_batches_independent_of_the_process_count():
  """With data.read_groups fixed, 1, 2 or 4 processes together yield the same shuffled global
  batches (so a pod run equals a one-process run and may resume on another topology)."""
  cfg = pipeline.in_memory_config(_pairs(70), pad_id=0, read_groups=4, bucket=True)
  per_count = {}
  for count in (1, 2, 4):
    parts = [_batches(cfg, 12, index=p, count=count)[1] for p in range(count)]
    per_count[count] = [sum((_ids(part[k]) for part in parts), []) for k in range(12)]
  assert per_count[1] == per_count[2] == per_count[4]
  it, _ = _batches(cfg, 1)
  assert it.steps_per_epoch == (70 // 4) // 2  # each group gives global_batch / 4 pairs a batch
  epoch = sum(per_count[1][:it.steps_per_epoch], [])
  assert len(set(epoch)) == len(epoch)  # no pair twice within an epoch
  assert per_count[1][0] != sorted(per_count[1][0])  # shuffled
  with pytest.raises(ValueError, match="read_groups"):
    _batches(cfg, 1, count=3, global_batch=12)


@pytest.mark.parametrize("reader", ["grain", "tfdata"])
def test_a_stuck_reader_is_an_error_naming_the_step(reader):
  """A batch not ready within data.batch_timeout_s stops the run with an error, not a hang."""
  import threading
  cfg = pipeline.in_memory_config(_pairs(32), pad_id=0, prefetch=0, reader=reader)
  it = pipeline.PairBatches(cfg, split="train", global_batch=8, seq_len=16, sharding=None, seed=0,
                            repeat=True, process_index=0, process_count=1)
  release, calls = threading.Event(), []
  take = it.source.take

  def stuck_after_the_first(indices):  # the reader hangs from step 1 on
    calls.append(indices)
    if len(calls) > 1:
      release.wait(60)
    return take(indices)
  it.source.take = stuck_after_the_first
  next(it)  # step 0 (tf.data's first batch includes starting TensorFlow)
  cfg.batch_timeout_s = 1
  with pytest.raises(TimeoutError, match=r"the batch of step 1 was not ready after 1 s"):
    next(it)
  release.set()
  it.close()
