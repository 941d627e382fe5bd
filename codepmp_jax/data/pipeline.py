"""The training input pipeline: batches of preference pairs as global jax Arrays, exactly resumable.

`build_pipeline(cfg, split=..., global_batch=..., seq_len=..., sharding=..., seed=..., repeat=...)`
returns a `PairBatches` iterator of the batch layout in docs/CONTRACTS.md.

How it stays exact and cheap: each process holds its own part of the split in memory as flat
token arrays (`PairArrays`; for prepared data read once from the TFRecord shards with tf.data),
and batch `k` of epoch `e` is a slice of a permutation drawn from `(seed, e, process)`. The state is
just `(epoch, batch)`, so saving it is free and a resumed run produces the same batches without
replaying any data. The parts are interleaved (process `p` of `P` holds pairs `p, p+P, ...` of
the split), every process takes the same number of batches per epoch (`(num_pairs // P) //
per-process batch`), and the pairs left over in an epoch are counted and logged. A background
thread assembles `prefetch` batches ahead.

Config fields read (`default_data_config()` has them all):
  source          "prepared" (shards from `python -m codepmp_jax.data.prepare`), "synthetic"
                  (random tokens, every sequence `seq_len` long) or "in_memory" (`records`).
  path            prepared: the directory holding manifest.json.
  vocab_size      synthetic: tokens are drawn from [0, vocab_size).
  synthetic_pairs synthetic: pairs per split (the epoch length).
  records         in_memory: `PairArrays`, a list of `EncodedPair`, or a dict split -> either
                  (a bare collection serves every split); see `in_memory_config`.
  pad_id          synthetic / in_memory: the padding id (prepared data take it from the manifest).
  bucket          pad each batch only up to the next multiple of 128 of its longest sequence
                  (capped at seq_len; all processes agree) instead of to seq_len.
  shuffle_buffer  0 keeps the stored order (for evaluation); any other value shuffles the whole
                  split every epoch: random access makes a perfect shuffle free, so no buffer
                  size is needed.
  prefetch        batches assembled ahead in a background thread (0: none).
No TensorFlow is imported unless `source == "prepared"`.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import queue
import threading
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np

from codepmp_jax.data.encode import EncodedPair, PairArrays

BUCKET = 128
SOURCES = ("prepared", "synthetic", "in_memory")
_END = object()


def default_data_config() -> ml_collections.ConfigDict:
  """Every field `build_pipeline` reads, with defaults (see the module docstring)."""
  return ml_collections.ConfigDict({
      "source": "prepared",
      "path": "",
      "vocab_size": 32000,
      "synthetic_pairs": 1 << 16,
      "records": None,
      "pad_id": 0,
      "bucket": False,
      "shuffle_buffer": 1,
      "prefetch": 2,
  })


def in_memory_config(records, pad_id: int, **overrides) -> ml_collections.ConfigDict:
  """A data config for already-encoded pairs held in memory (tests, benchmarks, small data).

  `records`: `PairArrays`, a list of `EncodedPair`, or a dict split -> either. From plain
  `PairRecord`s: `in_memory_config(encode_records(tokenizer, records, seq_len), tokenizer.pad_id)`.
  """
  cfg = default_data_config()
  cfg.source = "in_memory"
  cfg.records = records
  cfg.pad_id = pad_id
  cfg.update(overrides)
  return cfg


@dataclasses.dataclass
class _Part:
  """What one process needs: its own pairs and every pair's max length (for shared buckets)."""
  local: PairArrays | None  # None for synthetic data
  global_lengths: np.ndarray  # [num_pairs] max(chosen, rejected) length
  pad_id: int


def _as_arrays(records) -> PairArrays:
  if isinstance(records, PairArrays):
    return records
  if isinstance(records, Sequence) and all(isinstance(r, EncodedPair) for r in records):
    return PairArrays.from_pairs(records)
  raise TypeError("in_memory records must be PairArrays or a list of EncodedPair")


def _take(arrays: PairArrays, indices: np.ndarray) -> PairArrays:
  lengths = arrays.lengths[indices]
  starts = arrays.offsets[indices]
  ends = np.cumsum(lengths.reshape(-1))
  gather = (np.arange(ends[-1] if len(ends) else 0)
            - np.repeat(ends - lengths.reshape(-1), lengths.reshape(-1))
            + np.repeat(starts.reshape(-1), lengths.reshape(-1)))
  return PairArrays.from_lengths(arrays.tokens[gather], lengths, arrays.response_start[indices],
                                 arrays.margin[indices])


def _in_memory_part(cfg, split: str, index: int, count: int) -> _Part:
  records = cfg.records
  if records is None:
    raise ValueError("data.source=in_memory needs data.records (see pipeline.in_memory_config)")
  if isinstance(records, (Mapping, ml_collections.ConfigDict)):  # a config turns dicts into ConfigDicts
    if split not in records:
      raise ValueError(f"in_memory records have no split {split!r}; they have {sorted(records.keys())}")
    records = records[split]
  arrays = _as_arrays(records)
  return _Part(_take(arrays, np.arange(index, len(arrays), count)),
               arrays.lengths.max(axis=1) if len(arrays) else np.zeros(0, np.int32), cfg.pad_id)


def _prepared_part(cfg, split: str, seq_len: int, index: int, count: int) -> _Part:
  from codepmp_jax.data.prepare import read_manifest  # keeps absl flags and tf out of other sources
  directory = pathlib.Path(cfg.path)
  manifest = read_manifest(directory)
  if split not in manifest["splits"]:
    raise ValueError(f"{directory} has no split {split!r}; it has {sorted(manifest['splits'])}")
  if manifest["seq_len"] > seq_len:
    raise ValueError(f"{directory} was prepared with seq_len {manifest['seq_len']} > this run's {seq_len}")
  files = [directory / shard["file"] for shard in manifest["splits"][split]["shards"]]
  global_lengths = np.concatenate(
      [np.load(f"{f}.lengths.npy") for f in files] or [np.zeros(0, np.int32)])
  local = _read_tfrecords(files, index, count)
  if not np.array_equal(local.lengths.max(axis=1), global_lengths[index::count]):
    raise ValueError(f"{directory}: shards do not match their .lengths.npy files; prepare again")
  return _Part(local, global_lengths, manifest["tokenizer"]["pad_id"])


def _read_tfrecords(files: Sequence[pathlib.Path], index: int, count: int) -> PairArrays:
  """Pairs `index, index + count, ...` of the shards, in order, parsed with tf.data."""
  import tensorflow as tf  # only prepared data need it
  spec = {"chosen_ids": tf.io.RaggedFeature(tf.int64), "rejected_ids": tf.io.RaggedFeature(tf.int64),
          "response_start": tf.io.FixedLenFeature([2], tf.int64),
          "margin": tf.io.FixedLenFeature([1], tf.float32)}

  @tf.autograph.experimental.do_not_convert
  def parse(serialized):
    ex = tf.io.parse_example(serialized, spec)
    lengths = tf.stack([ex["chosen_ids"].row_lengths(), ex["rejected_ids"].row_lengths()], axis=1)
    tokens = tf.concat([ex["chosen_ids"], ex["rejected_ids"]], axis=1).flat_values
    return tokens, lengths, ex["response_start"], ex["margin"][:, 0]

  dataset = (tf.data.TFRecordDataset([str(f) for f in files]).shard(count, index).batch(4096)
             .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
  parts = [PairArrays.from_lengths(*batch) for batch in dataset.as_numpy_iterator()]
  return PairArrays.concatenate(parts)


def _synthetic_batch(cfg, indices: np.ndarray, seed: int, seq_len: int) -> PairArrays:
  tokens = np.stack([np.random.default_rng([seed, 1 << 20, int(i)]).integers(
      0, cfg.vocab_size, (2, seq_len), dtype=np.int32) for i in indices])
  n = len(indices)
  return PairArrays.from_lengths(tokens.reshape(-1), np.full((n, 2), seq_len),
                                 np.full((n, 2), seq_len // 2), np.zeros(n, np.float32))


def collate(arrays: PairArrays, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """The batch layout of docs/CONTRACTS.md from `arrays` (every pair), padded to `length`."""
  positions = np.arange(length)
  lengths = arrays.lengths[:, :, None]
  attention = positions < lengths
  gather = np.minimum(arrays.offsets[:, :, None] + positions, max(len(arrays.tokens) - 1, 0))
  ids = np.where(attention, arrays.tokens[gather] if len(arrays.tokens) else pad_id, pad_id)
  start = np.maximum(arrays.response_start[:, :1, None], 1)
  lm = attention[:, :1] & (positions >= start)
  lm_mask = np.concatenate([lm, np.zeros_like(lm)], axis=1)
  return {"input_ids": ids.astype(np.int32), "attention_mask": attention.astype(np.int32),
          "lm_mask": lm_mask.astype(np.int32), "margin": arrays.margin.astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class _Item:
  epoch: int
  batch: int
  data: dict[str, np.ndarray]


class PairBatches:
  """An iterator of batches with `get_state()` / `set_state()` for exact resumption.

  `num_pairs` is the number of pairs in the split (all processes); `steps_per_epoch` the
  batches every process yields per epoch; `dropped_pairs` counts pairs of this process that
  did not fill a batch so far.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, split: str, global_batch: int, seq_len: int,
               sharding: jax.sharding.NamedSharding | None, seed: int, repeat: bool,
               process_index: int, process_count: int):
    if cfg.source not in SOURCES:
      raise ValueError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")
    if global_batch % process_count:
      raise ValueError(f"global_batch {global_batch} is not divisible by {process_count} processes")
    self.split, self.seq_len, self.seed, self.repeat = split, seq_len, seed, repeat
    self.global_batch = global_batch
    self.batch = global_batch // process_count
    self.process_index, self.process_count = process_index, process_count
    self._cfg, self._sharding = cfg, sharding
    if cfg.source == "synthetic":
      self._part = _Part(None, np.full(cfg.synthetic_pairs, seq_len, np.int32), cfg.pad_id)
    elif cfg.source == "in_memory":
      self._part = _in_memory_part(cfg, split, process_index, process_count)
    else:
      self._part = _prepared_part(cfg, split, seq_len, process_index, process_count)
    if len(self._part.global_lengths) and self._part.global_lengths.max() > seq_len:
      raise ValueError(f"data.{cfg.source}: sequences up to {self._part.global_lengths.max()} "
                       f"tokens do not fit seq_len {seq_len}")
    self.num_pairs = len(self._part.global_lengths)
    self.steps_per_epoch = (self.num_pairs // process_count) // self.batch
    if not self.steps_per_epoch:
      message = f"split {split!r} has {self.num_pairs} pairs: not one batch of {global_batch}"
      if repeat:
        raise ValueError(message)
      logging.warning("data[%s]: %s; it yields nothing", split, message)
    self.dropped_pairs = 0
    self._position = (0, 0)
    self._epoch_plan: tuple[int, dict[int, np.ndarray], np.ndarray] | None = None
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._finished = False

  def _local_count(self, process: int) -> int:
    return len(range(process, self.num_pairs, self.process_count))

  def _plan(self, epoch: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Permutations of epoch `epoch` (this process's; every process's when bucketing, so that
    all agree on each batch's length) and each batch's padded length."""
    if self._epoch_plan is None or self._epoch_plan[0] != epoch:
      processes = range(self.process_count) if self._cfg.bucket else [self.process_index]
      orders = {}
      for process in processes:
        n = self._local_count(process)
        orders[process] = (np.random.default_rng([self.seed, epoch, process]).permutation(n)
                           if self._cfg.shuffle_buffer else np.arange(n))
      used = self.steps_per_epoch * self.batch
      if self._cfg.bucket:
        longest = np.max([self._part.global_lengths[p + self.process_count * o[:used]]
                          .reshape(self.steps_per_epoch, self.batch).max(axis=1)
                          for p, o in orders.items()], axis=0)
        lengths = np.minimum(-(-longest // BUCKET) * BUCKET, self.seq_len)
      else:
        lengths = np.full(self.steps_per_epoch, self.seq_len)
      self._epoch_plan = (epoch, orders, lengths)
    return self._epoch_plan[1], self._epoch_plan[2]

  def _host_batch(self, epoch: int, batch: int) -> dict[str, np.ndarray]:
    orders, lengths = self._plan(epoch)
    local = orders[self.process_index][batch * self.batch:(batch + 1) * self.batch]
    if self._part.local is None:
      arrays = _synthetic_batch(self._cfg, self.process_index + self.process_count * local,
                                self.seed, self.seq_len)
    else:
      arrays = _take(self._part.local, local)
    return collate(arrays, int(lengths[batch]), self._part.pad_id)

  def _produce(self, epoch: int, batch: int) -> None:
    try:
      while not self._stop.is_set():
        if batch == self.steps_per_epoch:
          epoch, batch = epoch + 1, 0
          if not self.repeat:
            self._put(_END)
            return
        self._put(_Item(epoch, batch, self._host_batch(epoch, batch)))
        batch += 1
    except Exception as e:  # handed to the consumer, which re-raises it
      self._put(e)

  def _put(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def _next_host(self) -> _Item | None:
    epoch, batch = self._position
    if self._cfg.prefetch <= 0:
      if batch == self.steps_per_epoch:
        if not self.repeat:
          return None
        epoch, batch = epoch + 1, 0
      return _Item(epoch, batch, self._host_batch(epoch, batch))
    if self._thread is None:
      self._queue = queue.Queue(maxsize=self._cfg.prefetch)
      self._stop.clear()
      self._thread = threading.Thread(target=self._produce, args=(epoch, batch), daemon=True,
                                      name=f"data-{self.split}")
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, Exception):
      raise item
    return None if item is _END else item

  def __iter__(self) -> PairBatches:
    return self

  def __next__(self) -> dict:
    if self._finished:
      raise StopIteration
    item = self._next_host()
    if item is None:
      self._finished = True
      self._count_dropped()
      logging.info("data[%s]: end of data after epoch %d (%d batches); %d pairs did not fill a "
                   "batch and were dropped", self.split, self._position[0], self.steps_per_epoch,
                   self._local_count(self.process_index) - self.steps_per_epoch * self.batch)
      raise StopIteration
    if item.epoch != self._position[0]:
      self._count_dropped()
      logging.info("data[%s]: epoch %d done, epoch %d begins (%d pairs of this process did not "
                   "fill a batch)", self.split, self._position[0], item.epoch,
                   self._local_count(self.process_index) - self.steps_per_epoch * self.batch)
    self._position = (item.epoch, item.batch + 1)
    return self._to_global(item.data)

  def _count_dropped(self) -> None:
    self.dropped_pairs += self._local_count(self.process_index) - self.steps_per_epoch * self.batch

  def _to_global(self, data: dict[str, np.ndarray]) -> dict:
    if self._sharding is None:
      return data
    pair_sharding = self._sharding
    margin_sharding = jax.sharding.NamedSharding(
        pair_sharding.mesh, jax.sharding.PartitionSpec(*pair_sharding.spec[:1]))
    out = {}
    for name, value in data.items():
      sharding = margin_sharding if value.ndim == 1 else pair_sharding
      out[name] = jax.make_array_from_process_local_data(
          sharding, value, (self.global_batch, *value.shape[1:]))
    return out

  def get_state(self) -> dict:
    """The position after the last batch returned, as JSON-serializable values."""
    epoch, batch = self._position
    return {"epoch": epoch, "batch": batch, "seed": self.seed, "num_pairs": self.num_pairs,
            "global_batch": self.global_batch, "process_count": self.process_count,
            "dropped_pairs": self.dropped_pairs, "finished": self._finished}

  def set_state(self, state: Mapping) -> None:
    """Continue exactly after the batch at which `state` was taken."""
    for key in ("seed", "num_pairs", "global_batch"):
      if state[key] != getattr(self, key):
        raise ValueError(f"data state has {key}={state[key]}, but this pipeline has "
                         f"{getattr(self, key)}: it is not the same data order")
    if state["process_count"] != self.process_count:
      logging.warning("data[%s]: resuming with %d processes instead of %d: the epoch position is "
                      "kept but the order of the rest of the epoch differs", self.split,
                      self.process_count, state["process_count"])
    self.close()
    self._position = (int(state["epoch"]), int(state["batch"]))
    self.dropped_pairs = int(state["dropped_pairs"])
    self._finished = bool(state["finished"])

  def close(self) -> None:
    """Stop the prefetch thread (a later `next` restarts it at the current position)."""
    if getattr(self, "_thread", None) is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def __del__(self):
    self.close()


def build_pipeline(cfg: ml_collections.ConfigDict, *, split: str, global_batch: int, seq_len: int,
                   sharding: jax.sharding.NamedSharding | None, seed: int, repeat: bool) -> PairBatches:
  """Batches of `split` for this process (`jax.process_index()` of `jax.process_count()`).

  With a `sharding` (for the `[B, 2, L]` arrays; `margin` uses its first axis) the batches are
  global jax Arrays of `global_batch` pairs; with None they are this process's numpy arrays.
  `repeat=False` stops after one epoch.
  """
  return PairBatches(cfg, split=split, global_batch=global_batch, seq_len=seq_len, sharding=sharding,
                     seed=seed, repeat=repeat, process_index=jax.process_index(),
                     process_count=jax.process_count())

