"""The training input pipeline: batches of preference pairs as global jax Arrays, exactly resumable.

`build_pipeline(cfg, split=..., global_batch=..., seq_len=..., sharding=..., seed=..., repeat=...)`
returns a `PairBatches` iterator of the batch layout in docs/CONTRACTS.md.

How it stays exact and cheap: the split's `N` pairs (the shards concatenated in manifest order)
are cut into `G` contiguous read groups (`data.read_groups`; 0 = one per process), group `g` owning
`[g*N//G, (g+1)*N//G)`; batch `k` of epoch `e` takes `global_batch / G` pairs from each group, a
slice of a permutation of the group drawn from `(seed, e, g)`, in group order. Process `p` of `P`
reads the `G/P` consecutive groups `[p*G/P, (p+1)*G/P)`, so its part of the split is one contiguous
range. With the same `G`, batches are the same for every process count that divides `G` (a run
can resume on another topology, and a pod run equals a one-process run). Prepared
shards are random-access files (`shards.py`): a process opens only the shards its range overlaps and
reads only the pairs of its batches, so start-up time and resident memory do not grow with the data set
(beyond the permutation, 8 bytes per own pair, and with buckets the 4-byte lengths of every pair).
The state is just `(epoch, batch)`, so saving it is free and a resumed run produces the same
batches without replaying any data. Every process takes the same number of batches per epoch
(`(N // P) // per-process batch`) and the pairs left over in an epoch are counted and logged. A
background thread assembles `prefetch` batches ahead. Prepare writes each shard in a seeded random
order, so every process's range is a uniform sample of the split.

Config fields read (`default_data_config()` has them all):
  source          "prepared" (shards from `python -m codepmp_jax.data.prepare`), "synthetic"
                  (random tokens, every sequence `seq_len` long, a pair's two sharing their first
                  half as the prompt) or "in_memory" (`records`).
  path            prepared: the directory holding manifest.json.
  vocab_size      synthetic: tokens are drawn from [0, vocab_size).
  synthetic_pairs synthetic: pairs per split (the epoch length).
  records         in_memory: `PairArrays`, a list of `EncodedPair`, or a dict split -> either
                  (a bare collection serves every split); see `in_memory_config`.
  pad_id          synthetic / in_memory: the padding id (prepared data take it from the manifest).
  bucket          pad each batch only up to the next multiple of 128 of its longest sequence
                  (capped at seq_len; all processes agree) instead of to seq_len.
  pack            yield packed batches (`packing`: several pairs per row, a pair's two sequences
                  in one row) instead of `[B, 2, L]` ones; `bucket` is then not used. Each batch
                  still holds exactly the same pairs as unpacked, so the (epoch, batch) state and
                  resumption are unchanged.
  pack_row_len    tokens per packed row (0: 2 * seq_len, so the longest pair always fits).
  pack_pairs_per_row  pair slots per packed row (`packing`'s `max_pairs_per_row`).
  pack_share_prompt  lay each pair's shared prompt out once in its packed row (`packing`: the
                  same loss and gradients, less compute); False lays both sequences out whole.
                  Prepared data of manifest version 2 has no shared-prompt lengths and shares none.
  read_groups     contiguous groups of the split read in parallel (see above); 0: one per process.
                  Must be a multiple of the process count and divide global_batch.
  shuffle_buffer  0 keeps the stored order (for evaluation); any other value shuffles the whole
                  split every epoch: random access makes a perfect shuffle free, so no buffer
                  size is needed.
  prefetch        batches assembled ahead in a background thread (0: none).
No source imports TensorFlow.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Protocol

import jax
import ml_collections
import numpy as np
from etils import epath

from codepmp_jax.data import packing, shards
from codepmp_jax.data.encode import EncodedPair, PairArrays, bucket_length

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
      "pack": False,
      "pack_row_len": 0,
      "pack_pairs_per_row": 8,
      "pack_share_prompt": True,
      "read_groups": 0,
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


class _Pairs(Protocol):
  """The pairs of one split by global index: `num_pairs`, `pad_id`, `lengths(start, stop)` (the
  max(chosen, rejected) length of pairs `start..stop-1`), `pack_sizes(start, stop, share_prompt)`
  (`packing.pair_sizes`, with their shared prompts or none) and `take(indices)` (`PairArrays`)."""
  num_pairs: int
  pad_id: int

  def lengths(self, start: int, stop: int) -> np.ndarray: ...

  def pack_sizes(self, start: int, stop: int, share_prompt: bool) -> np.ndarray: ...

  def take(self, indices: np.ndarray) -> PairArrays: ...


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


class _InMemory:
  def __init__(self, cfg, split: str, seq_len: int):
    records = cfg.records
    if records is None:
      raise ValueError("data.source=in_memory needs data.records (see pipeline.in_memory_config)")
    if isinstance(records, (Mapping, ml_collections.ConfigDict)):  # a config turns dicts into ConfigDicts
      if split not in records:
        raise ValueError(f"in_memory records have no split {split!r}; they have {sorted(records.keys())}")
      records = records[split]
    self._arrays = _as_arrays(records)
    self._lengths = self._arrays.lengths.max(axis=1, initial=0)
    self._shared_prompt: np.ndarray | None = None
    self.num_pairs, self.pad_id = len(self._arrays), cfg.pad_id
    if len(self._lengths) and self._lengths.max() > seq_len:
      raise ValueError(f"data.in_memory: sequences up to {self._lengths.max()} tokens do not fit "
                       f"seq_len {seq_len}")

  def lengths(self, start: int, stop: int) -> np.ndarray:
    return self._lengths[start:stop]

  def pack_sizes(self, start: int, stop: int, share_prompt: bool) -> np.ndarray:
    if share_prompt and self._shared_prompt is None:
      self._shared_prompt = self._arrays.shared_prompt()
    return packing.pair_sizes(self._arrays.lengths[start:stop],
                              self._arrays.response_start[start:stop],
                              self._shared_prompt[start:stop] if share_prompt else None)

  def take(self, indices: np.ndarray) -> PairArrays:
    return _take(self._arrays, indices)


class _Synthetic:
  def __init__(self, cfg, seed: int, seq_len: int):
    self._cfg, self._seed, self._seq_len = cfg, seed, seq_len
    self.num_pairs, self.pad_id = cfg.synthetic_pairs, cfg.pad_id

  def lengths(self, start: int, stop: int) -> np.ndarray:
    return np.full(stop - start, self._seq_len, np.int32)

  def pack_sizes(self, start: int, stop: int, share_prompt: bool) -> np.ndarray:
    n, prompt = stop - start, self._seq_len // 2
    return packing.pair_sizes(np.full((n, 2), self._seq_len), np.full((n, 2), prompt),
                              np.full(n, prompt) if share_prompt else None)

  def take(self, indices: np.ndarray) -> PairArrays:
    return _synthetic_batch(self._cfg, indices, self._seed, self._seq_len)


class _Prepared:
  """The shards of a prepared split, concatenated in manifest order; a shard's files are opened
  only when a pair (or, for buckets, a length) in it is first needed."""

  def __init__(self, cfg, split: str, seq_len: int):
    from codepmp_jax.data.prepare import read_manifest  # keeps absl flags out of other sources
    directory = epath.Path(cfg.path)
    manifest = read_manifest(directory)
    version = manifest.get("version", 1)
    if version < 2:
      raise ValueError(f"{directory} holds TFRecord shards (manifest version 1), which this version "
                       "no longer reads; prepare the data again")
    self._directory, self._version = directory, version
    if split not in manifest["splits"]:
      raise ValueError(f"{directory} has no split {split!r}; it has {sorted(manifest['splits'])}")
    if manifest["seq_len"] > seq_len:
      raise ValueError(f"{directory} was prepared with seq_len {manifest['seq_len']} > this run's {seq_len}")
    infos = manifest["splits"][split]["shards"]
    dtype = shards.V2_INDEX_DTYPE if version == 2 else shards.INDEX_DTYPE
    self._shards = [shards.Shard(directory / s["file"], s["pairs"], dtype) for s in infos]
    self._starts = np.cumsum([0] + [s["pairs"] for s in infos])
    self._lengths: dict[int, np.ndarray] = {}
    self._pack_sizes: dict[tuple[int, bool], np.ndarray] = {}
    self.num_pairs, self.pad_id = int(self._starts[-1]), manifest["tokenizer"]["pad_id"]

  def _overlapping(self, start: int, stop: int) -> range:
    first = int(np.searchsorted(self._starts, start, "right")) - 1
    last = int(np.searchsorted(self._starts, max(stop - 1, start), "right")) - 1
    return range(max(first, 0), min(last, len(self._shards) - 1) + 1)

  def lengths(self, start: int, stop: int) -> np.ndarray:
    return self._per_pair(self._lengths, lambda shard: shards.read_lengths([shard.base])[0],
                          start, stop)

  def pack_sizes(self, start: int, stop: int, share_prompt: bool) -> np.ndarray:
    if share_prompt and self._version == 2 and not self._pack_sizes:
      logging.warning("data: %s was prepared with manifest version 2, whose index has no shared-prompt "
                      "lengths: packed rows lay every prompt out twice (prepare it again to share "
                      "them)", self._directory)

    def read(shard):
      index = shard.index()
      shared = index["shared_prompt"] if share_prompt and self._version > 2 else None
      return packing.pair_sizes(index["lengths"], index["response_start"], shared)
    return self._per_pair(self._pack_sizes, read, start, stop, share_prompt)

  def _per_pair(self, cache: dict, read, start: int, stop: int, *key) -> np.ndarray:
    """A per-pair array of pairs `start..stop-1`, read (`read(shard)`) once per shard (and `key`)."""
    parts = []
    for k in self._overlapping(start, stop):
      if (k, *key) not in cache:
        cache[(k, *key)] = read(self._shards[k])
      lo, hi = max(start, self._starts[k]), min(stop, self._starts[k + 1])
      parts.append(cache[(k, *key)][lo - self._starts[k]:hi - self._starts[k]])
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)

  def take(self, indices: np.ndarray) -> PairArrays:
    which = np.searchsorted(self._starts, indices, "right") - 1
    parts, positions = [], []
    for k in np.unique(which):
      mine = np.flatnonzero(which == k)
      parts.append(self._shards[k].take(indices[mine] - self._starts[k]))
      positions.append(mine)
    merged = PairArrays.concatenate(parts)
    return _take(merged, np.argsort(np.concatenate(positions), kind="stable")) if len(parts) > 1 else merged


def _synthetic_batch(cfg, indices: np.ndarray, seed: int, seq_len: int) -> PairArrays:
  """Random pairs of `seq_len` tokens whose two sequences share their first half (the prompt)."""
  tokens = np.stack([np.random.default_rng([seed, 1 << 20, int(i)]).integers(
      0, cfg.vocab_size, (2, seq_len), dtype=np.int32) for i in indices])
  tokens[:, 1, :seq_len // 2] = tokens[:, 0, :seq_len // 2]
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

  Packed (`cfg.pack`): batch `k` holds the same pairs as unpacked, packed into `[R, L]` rows of
  at most `row_len` tokens (`packing.pack_pairs`, balanced over the rows) where `R` is the same on every process: each
  process packs every process's batch `k` from the pairs' lengths alone (cheap: no tokens are
  read), takes the most rows any needs, and rounds that up to a multiple of `row_multiple` x its
  devices of the batch axis, in a few sizes per octave (`packing.PackedShape.rounded`). So no
  pair is ever left out and every process's rows split evenly over its devices and the step's
  microbatches. The row length `L`, the LM and the sequence slots per row are agreed the same way.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, split: str, global_batch: int, seq_len: int,
               sharding: jax.sharding.NamedSharding | None, seed: int, repeat: bool,
               process_index: int, process_count: int, row_multiple: int = 1):
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
      self._pairs: _Pairs = _Synthetic(cfg, seed, seq_len)
    elif cfg.source == "in_memory":
      self._pairs = _InMemory(cfg, split, seq_len)
    else:
      self._pairs = _Prepared(cfg, split, seq_len)
    self.num_pairs = self._pairs.num_pairs
    self.groups = cfg.get("read_groups", 0) or process_count
    if self.groups % process_count or global_batch % self.groups:
      raise ValueError(f"data.read_groups={self.groups} must be a multiple of the {process_count} "
                       f"processes and divide global_batch {global_batch}")
    self.group_batch = global_batch // self.groups
    self.steps_per_epoch = (self.num_pairs // self.groups) // self.group_batch
    if not self.steps_per_epoch:
      message = f"split {split!r} has {self.num_pairs} pairs: not one batch of {global_batch}"
      if repeat:
        raise ValueError(message)
      logging.warning("data[%s]: %s; it yields nothing", split, message)
    self.pack = bool(cfg.get("pack", False))
    if self.pack:
      self.row_len = cfg.pack_row_len or 2 * seq_len
      self.pairs_per_row = cfg.pack_pairs_per_row
      self.share_prompt = bool(cfg.get("pack_share_prompt", True))
      if self.pairs_per_row < 1:
        raise ValueError(f"data.pack_pairs_per_row must be at least 1, got {self.pairs_per_row}")
      self.row_multiple = row_multiple * local_batch_shards(sharding, process_count)
      self._orders: tuple[int, list[np.ndarray]] | None = None
      self._pack_sizes: list[np.ndarray] | None = None
    self.dropped_pairs = 0
    self._position = (0, 0)
    self._epoch_plan: tuple[int, np.ndarray, np.ndarray] | None = None
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._finished = False

  def _group_start(self, group: int) -> int:
    return group * self.num_pairs // self.groups

  def _groups_of(self, process: int) -> range:
    per_process = self.groups // self.process_count
    return range(process * per_process, (process + 1) * per_process)

  def _range(self, process: int) -> tuple[int, int]:
    """The contiguous part of the split's pairs that `process` reads (its read groups)."""
    groups = self._groups_of(process)
    return self._group_start(groups.start), self._group_start(groups.stop)

  def _local_count(self, process: int) -> int:
    start, stop = self._range(process)
    return stop - start

  def _order(self, epoch: int, process: int) -> np.ndarray:
    """`process`'s pairs of epoch `epoch` in batch order, as indices within its range: batch `k`
    is `order[k*batch:(k+1)*batch]`, `group_batch` pairs of each of its groups in group order."""
    start = self._range(process)[0]
    parts = []
    for group in self._groups_of(process):
      n = self._group_start(group + 1) - self._group_start(group)
      order = (np.random.default_rng([self.seed, epoch, group]).permutation(n)
               if self._cfg.shuffle_buffer else np.arange(n))
      used = order[:self.steps_per_epoch * self.group_batch] + (self._group_start(group) - start)
      parts.append(used.reshape(self.steps_per_epoch, self.group_batch))
    if not parts or not self.steps_per_epoch:
      return np.zeros(0, np.int64)
    return np.concatenate(parts, axis=1).reshape(-1)

  def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's permutation of its pairs in epoch `epoch`, and each batch's padded length
    (with buckets: the longest pair of that batch on any process, so that all agree)."""
    if self._epoch_plan is None or self._epoch_plan[0] != epoch:
      used = self.steps_per_epoch * self.batch
      if self._cfg.bucket:
        longest = np.zeros(self.steps_per_epoch, np.int64)
        for process in range(self.process_count):
          start, stop = self._range(process)
          lengths = self._pairs.lengths(start, stop)[self._order(epoch, process)[:used]]
          longest = np.maximum(longest, lengths.reshape(self.steps_per_epoch, self.batch).max(
              axis=1, initial=0))
        lengths = np.minimum(-(-longest // BUCKET) * BUCKET, self.seq_len)
      else:
        lengths = np.full(self.steps_per_epoch, self.seq_len)
      self._epoch_plan = (epoch, self._order(epoch, self.process_index), lengths)
    return self._epoch_plan[1], self._epoch_plan[2]

  def _host_batch(self, epoch: int, batch: int) -> dict[str, np.ndarray]:
    if self.pack:
      return self._packed_host_batch(epoch, batch)
    order, lengths = self._plan(epoch)
    local = order[batch * self.batch:(batch + 1) * self.batch]
    arrays = self._pairs.take(self._range(self.process_index)[0] + local)
    return collate(arrays, int(lengths[batch]), self._pairs.pad_id)

  def _local_batch(self, epoch: int, batch: int, process: int) -> np.ndarray:
    """Indices within `process`'s range of the pairs of its batch `batch` in epoch `epoch`.

    Packed runs keep every process's order of the epoch and every pair's `packing.pair_sizes`
    (16 bytes a pair of the split), to pack any process's batch without reading its tokens."""
    if self._orders is None or self._orders[0] != epoch:
      if self._pack_sizes is None:
        self._pack_sizes = [self._pairs.pack_sizes(*self._range(p), self.share_prompt)
                            for p in range(self.process_count)]
      self._orders = (epoch, [self._order(epoch, p).astype(np.int32)
                              for p in range(self.process_count)])
    return self._orders[1][process][batch * self.batch:(batch + 1) * self.batch].astype(np.int64)

  def packed_shape(self, epoch: int, batch: int) -> packing.PackedShape:
    """The shape of every process's packed batch `batch` of epoch `epoch` (all processes agree)."""
    batches = [self._local_batch(epoch, batch, p) for p in range(self.process_count)]
    return packing.batch_shape([sizes[b] for sizes, b in zip(self._pack_sizes, batches)],
                               self.row_len, self.pairs_per_row, self.row_multiple)

  def _packed_host_batch(self, epoch: int, batch: int) -> dict[str, np.ndarray]:
    shape = self.packed_shape(epoch, batch)
    local = self._local_batch(epoch, batch, self.process_index)
    arrays = self._pairs.take(self._range(self.process_index)[0] + local)
    packed = packing.pack_pairs(arrays, row_len=self.row_len, max_pairs_per_row=self.pairs_per_row,
                                pad_id=self._pairs.pad_id, shape=shape, order="balanced",
                                shared_prompt=self._pack_sizes[self.process_index][local, 3])
    if packed.left_over.size:  # cannot happen: `shape` holds every process's packing
      raise RuntimeError(f"data[{self.split}]: {packed.left_over.size} pairs of batch {batch} "
                         f"(epoch {epoch}) did not fit {shape.rows} packed rows")
    return packed.batch

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
      # Packed arrays are [rows, ...], split over their rows like margin over its pairs.
      sharding = margin_sharding if value.ndim == 1 or self.pack else pair_sharding
      leading = value.shape[0] * self.process_count if self.pack else self.global_batch
      out[name] = jax.make_array_from_process_local_data(
          sharding, value, (leading, *value.shape[1:]))
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


def local_batch_shards(sharding: jax.sharding.NamedSharding | None, process_count: int) -> int:
  """How many pieces `sharding` cuts the batch axis into, per process (at least 1)."""
  if sharding is None or not sharding.spec or sharding.spec[0] is None:
    return 1
  axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
  total = int(np.prod([sharding.mesh.shape[a] for a in axes]))
  return max(total // process_count, 1)


def build_pipeline(cfg: ml_collections.ConfigDict, *, split: str, global_batch: int, seq_len: int,
                   sharding: jax.sharding.NamedSharding | None, seed: int, repeat: bool,
                   row_multiple: int = 1) -> PairBatches:
  """Batches of `split` for this process (`jax.process_index()` of `jax.process_count()`).

  With a `sharding` (for the `[B, 2, L]` arrays; `margin` and packed arrays use its first axis)
  the batches are global jax Arrays of `global_batch` pairs; with None they are this process's
  numpy arrays. `repeat=False` stops after one epoch. `row_multiple` (packed: the step's
  microbatches) multiplies the devices a process's rows are split over.
  """
  return PairBatches(cfg, split=split, global_batch=global_batch, seq_len=seq_len, sharding=sharding,
                     seed=seed, repeat=repeat, process_index=jax.process_index(),
                     process_count=jax.process_count(), row_multiple=row_multiple)

