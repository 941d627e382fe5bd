"""The training input pipeline: batches of preference pairs as global jax Arrays, exactly resumable.

`build_pipeline(cfg, split=..., global_batch=..., seq_len=..., sharding=..., seed=..., repeat=...)`
returns `PairBatches`, an iterator of the batch layout in docs/contracts.md. It is a chain of
small stages:

  source   the split's pairs by global index: `prepared.PreparedSplit` (a TFDS ArrayRecord
           directory written by `python -m codepmp_jax.data.prepare`), synthetic or in-memory
           pairs; each knows every pair's sizes without reading it
  sampler  which pairs step `k` of epoch `e` reads (`sampler.py`: read groups, epoch orders,
           fixed-shape packing plans with carry), from the sizes alone
  packer   the host batch of those pairs: `packing.pack_pairs` into the run's one packed shape,
           or one pair a row (`packing.pair_rows`) padded to one of a few bucket lengths
  loader   steps in order, prefetched by Grain (`data.reader="grain"`, no TensorFlow) or by
           tf.data (`"tfdata"`), made into global arrays over the mesh

Resuming is exact: a step's pairs are a pure function of (seed, epoch, step), so the state is the
next step's index (Grain's `{"next_index": k}`, saved in the orbax checkpoint beside the model).
With the same `data.read_groups`, batches are the same for every process count that divides it.

Config fields read (`default_data_config()` has them all):
  source          "prepared", "synthetic" (random tokens, every sequence `seq_len` long, a pair's
                  two sharing their first half as the prompt) or "in_memory" (`records`).
  path            prepared: the directory holding manifest.json.
  reader          "grain" or "tfdata": the loader stage (the same batches either way; tfdata
                  imports TensorFlow).
  vocab_size      synthetic: tokens are drawn from [0, vocab_size).
  synthetic_pairs synthetic: pairs per split (the epoch length).
  records         in_memory: `PairArrays`, a list of `EncodedPair`, or a dict split -> either
                  (a bare collection serves every split); see `in_memory_config`.
  pad_id          synthetic / in_memory: the padding id (prepared data take it from the manifest).
  bucket          unpacked (one pair a row): pad each batch's sequences to the least of
                  `sampler.bucket_lengths(seq_len)` that holds its longest (all processes
                  agree), not to seq_len.
  pack            packed rows (`packing`: several pairs per row, a pair's two sequences in one
                  row), every step of ONE shape: `pack_rows` rows of `pack_row_len` tokens. A
                  step holds as many pairs as fit (about `global_batch`); the pairs that do not
                  fit are carried into the next step, none dropped, none seen twice in an epoch.
  pack_rows       rows of a packed step, all processes (0: enough for `global_batch` pairs of the
                  split's mean size, rounded up to what the devices, microbatches and read
                  groups divide).
  pack_row_len    tokens per packed row (0: 2 * seq_len, so the longest pair always fits).
  pack_pairs_per_row  pair slots per packed row.
  pack_share_prompt  lay each pair's shared prompt out once in its packed row (`packing`: the
                  same loss and gradients, less compute).
  read_groups     contiguous groups of the split read in parallel (see `sampler`); 0: one per
                  process. Must be a multiple of the process count (and divide global_batch
                  unpacked, pack_rows packed).
  shuffle_buffer  0 keeps the stored order (for evaluation); any other value shuffles the whole
                  split every epoch (random access makes a perfect shuffle free).
  prefetch        steps assembled ahead by the reader's threads (0: none).
  batch_timeout_s a step's batch not ready after this many seconds is an error naming the step,
                  so a hung reader stops the run instead of stalling it (0: wait forever).
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from codepmp_jax.data import packing, prepared, sampler
from codepmp_jax.data.encode import EncodedPair, PairArrays

SOURCES = ("prepared", "synthetic", "in_memory")
READERS = ("grain", "tfdata")
FLOAT_KEYS = ("pair_valid", "margin")
FOREVER = 1 << 40  # steps of a repeating pipeline (Grain indexes them lazily)


def default_data_config() -> ml_collections.ConfigDict:
  """Every field `build_pipeline` reads, with defaults (see the module docstring)."""
  return ml_collections.ConfigDict({
      "source": "prepared",
      "path": "",
      "reader": "grain",
      "vocab_size": 32000,
      "synthetic_pairs": 1 << 16,
      "records": None,
      "pad_id": 0,
      "bucket": False,
      "pack": False,
      "pack_rows": 0,
      "pack_row_len": 0,
      "pack_pairs_per_row": 8,
      "pack_share_prompt": True,
      "read_groups": 0,
      "shuffle_buffer": 1,
      "prefetch": 2,
      "batch_timeout_s": 600,
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
    self.sizes = prepared.sizes_of(self._arrays)
    self.num_pairs, self.pad_id = len(self._arrays), cfg.pad_id
    longest = int(self._arrays.lengths.max(initial=0))
    if longest > seq_len:
      raise ValueError(f"data.in_memory: sequences up to {longest} tokens do not fit seq_len {seq_len}")

  def take(self, indices: np.ndarray) -> PairArrays:
    return _take(self._arrays, indices)


class _Synthetic:
  def __init__(self, cfg, seed: int, seq_len: int):
    self._cfg, self._seed, self._seq_len = cfg, seed, seq_len
    self.num_pairs, self.pad_id = cfg.synthetic_pairs, cfg.pad_id
    self.sizes = np.zeros(self.num_pairs, prepared.SIZES_DTYPE)
    self.sizes["lengths"] = seq_len
    self.sizes["response_start"] = seq_len // 2
    self.sizes["shared_prompt"] = seq_len // 2

  def take(self, indices: np.ndarray) -> PairArrays:
    return _synthetic_batch(self._cfg, indices, self._seed, self._seq_len)


def open_source(cfg: ml_collections.ConfigDict, split: str, seq_len: int, seed: int):
  """The source stage: the split's pairs by global index (`num_pairs`, `pad_id`, `sizes`
  (`prepared.SIZES_DTYPE` per pair) and `take(indices) -> PairArrays`)."""
  if cfg.source == "synthetic":
    return _Synthetic(cfg, seed, seq_len)
  if cfg.source == "in_memory":
    return _InMemory(cfg, split, seq_len)
  if cfg.source != "prepared":
    raise ValueError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")
  if not cfg.path:
    raise ValueError("data.source=prepared needs data.path (a directory written by "
                     "python -m codepmp_jax.data.prepare)")
  manifest = prepared.read_manifest(cfg.path)
  if manifest["seq_len"] > seq_len:
    raise ValueError(f"{cfg.path} was prepared with seq_len {manifest['seq_len']} > this run's {seq_len}")
  return prepared.PreparedSplit(cfg.path, manifest, split)


def pair_sizes(sizes: np.ndarray, share_prompt: bool) -> np.ndarray:
  """`packing.pair_sizes` of a source's `sizes`."""
  return packing.pair_sizes(sizes["lengths"], sizes["response_start"],
                            sizes["shared_prompt"] if share_prompt else None)


def rows_multiple(groups: int, process_count: int, row_multiple: int, local_shards: int) -> int:
  """What the packed rows of a step must be a multiple of: the read groups (each fills its share)
  and every process's devices times the step's microbatches."""
  return math.lcm(groups, process_count * row_multiple * local_shards)


def pack_settings(cfg: ml_collections.ConfigDict, sizes: np.ndarray, global_batch: int,
                  seq_len: int, multiple: int) -> sampler.PackSettings:
  """The run's one packed shape: `cfg.pack_rows` rows (0: enough for `global_batch` pairs of the
  mean size of `sizes`, `pair_sizes`) rounded up to a multiple of `multiple`; LM slots for
  half a row (at least a whole sequence), sequence slots of `seq_len`."""
  row_len = cfg.pack_row_len or 2 * seq_len
  rows = cfg.pack_rows
  if not rows:
    mean = float(sizes[:, 0].mean()) if len(sizes) else float(row_len)
    rows = max(1, math.ceil(global_batch * mean / row_len))
  rows = -(-rows // multiple) * multiple
  if cfg.pack_pairs_per_row < 1:
    raise ValueError(f"data.pack_pairs_per_row must be at least 1, got {cfg.pack_pairs_per_row}")
  return sampler.PackSettings(rows=rows, row_len=row_len, pairs_per_row=cfg.pack_pairs_per_row,
                              lm_slots=min(row_len, max(seq_len, row_len // 2)),
                              sequence_len=min(seq_len, row_len))


def packed_shape(cfg: ml_collections.ConfigDict, *, split: str, global_batch: int, seq_len: int,
                 seed: int, row_multiple: int, sharding: jax.sharding.NamedSharding | None,
                 process_count: int = 1) -> packing.PackedShape:
  """The one packed shape of every step of `split` (one process's part of `process_count`), as
  `PairBatches` derives it (`plan` compiles it): `sharding` is the batch's, `row_multiple` the
  step's microbatches."""
  multiple = rows_multiple(cfg.read_groups or process_count, process_count, row_multiple,
                           local_batch_shards(sharding, process_count))
  if cfg.pack_rows:  # the data's sizes are needed only to derive the rows
    sizes = np.zeros((0, 4), np.int32)
  else:
    try:
      source = open_source(cfg, split, seq_len, seed)
    except (FileNotFoundError, ValueError) as e:
      raise ValueError(f"data.pack_rows=0 derives the packed rows from the data's pair sizes, and "
                       f"the data cannot be read ({e}); set --config.data.pack_rows") from e
    sizes = pair_sizes(source.sizes, bool(cfg.pack_share_prompt))
  return pack_settings(cfg, sizes, global_batch, seq_len, multiple).shape(process_count)


class PairBatches:
  """The loader stage: an iterator of global batches with `get_state()` / `set_state()`.

  `num_pairs` counts the split's pairs (all processes); `steps_per_epoch` the steps of the first
  epoch (packed epochs can differ by a step or so); `shape` the one packed shape of every step
  (packed) or None; `left_over_pairs` the pairs of this process an unpacked epoch leaves out;
  `source` the source stage it reads (`open_source`).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, split: str, global_batch: int, seq_len: int,
               sharding: jax.sharding.NamedSharding | None, seed: int, repeat: bool,
               process_index: int, process_count: int, row_multiple: int = 1):
    if cfg.reader not in READERS:
      raise ValueError(f"data.reader must be one of {READERS}, got {cfg.reader!r}")
    if global_batch % process_count:
      raise ValueError(f"global_batch {global_batch} is not divisible by {process_count} processes")
    self.split, self.seq_len, self.seed, self.repeat = split, seq_len, seed, repeat
    self.global_batch = global_batch
    self.process_index, self.process_count = process_index, process_count
    self._cfg, self._sharding = cfg, sharding
    self.source = open_source(cfg, split, seq_len, seed)
    self.num_pairs, self.pad_id = self.source.num_pairs, self.source.pad_id
    groups = sampler.ReadGroups(self.num_pairs, cfg.read_groups or process_count, process_count)
    shuffle = bool(cfg.shuffle_buffer)
    self.pack = bool(cfg.pack)
    self.shape = None
    if self.pack:
      self._share_prompt = bool(cfg.pack_share_prompt)
      sizes = pair_sizes(self.source.sizes, self._share_prompt)
      multiple = rows_multiple(groups.groups, process_count, row_multiple,
                               local_batch_shards(sharding, process_count))
      self.settings = pack_settings(cfg, sizes, global_batch, seq_len, multiple)
      self.shape = self.settings.shape(process_count)
      self._plan = sampler.PackPlan(groups, sizes, self.settings, seed, shuffle)
      self.steps_per_epoch = self._plan.steps_per_epoch(0)
      self.left_over_pairs = 0
    else:
      self._plan = sampler.BatchPlan(groups, global_batch, self.source.sizes["lengths"].max(axis=1),
                                     seq_len, bool(cfg.bucket), seed, shuffle)
      self.steps_per_epoch = self._plan.steps_per_epoch
      self.left_over_pairs = self._plan.left_over(process_index)
    if not self.steps_per_epoch:
      message = f"split {split!r} has {self.num_pairs} pairs: not one batch of {global_batch}"
      if repeat:
        raise ValueError(message)
      logging.warning("data[%s]: %s; it yields nothing", split, message)
    self._epoch_starts = [0]  # the first step index of each epoch planned so far
    self._lock = threading.Lock()
    self._next = 0
    self._iterator: Iterator | None = None

  def locate(self, index: int) -> tuple[int, int]:
    """(epoch, step within it) of the run's step `index` (0-based, over epochs)."""
    with self._lock:
      while self._epoch_starts[-1] <= index:
        epoch = len(self._epoch_starts) - 1
        steps = self._plan.steps_per_epoch(epoch) if self.pack else self.steps_per_epoch
        if not steps:
          raise IndexError(f"data[{self.split}]: no steps")
        self._epoch_starts.append(self._epoch_starts[-1] + steps)
      epoch = int(np.searchsorted(self._epoch_starts, index, "right")) - 1
      return epoch, index - self._epoch_starts[epoch]

  def host_batch(self, index: int) -> dict[str, np.ndarray]:
    """The packer stage: this process's numpy batch of the run's step `index`."""
    epoch, step = self.locate(index)
    if self.pack:
      pairs, rows = self._plan.step(epoch, step, self.process_index)
      arrays = self.source.take(pairs)
      shared = self.source.sizes["shared_prompt"][pairs] if self._share_prompt else None
      return packing.pack_pairs(arrays, row_len=self.settings.row_len,
                                max_pairs_per_row=self.settings.pairs_per_row, pad_id=self.pad_id,
                                shape=self.shape, shared_prompt=shared, rows=rows).batch
    pairs, length = self._plan.step(epoch, step, self.process_index)
    return packing.pair_rows(self.source.take(pairs), length, self.pad_id)

  def _steps(self) -> int:
    return FOREVER if self.repeat else self.steps_per_epoch

  def _open(self) -> Iterator:
    prefetch = max(int(self._cfg.prefetch), 0)
    if self._cfg.reader == "tfdata":
      return _tfdata_steps(self, self._next, self._steps(), prefetch)
    import grain
    steps = grain.MapDataset.range(self._steps()).map(self.host_batch)
    iterator = iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                                            prefetch_buffer_size=prefetch)))
    iterator.set_state({"next_index": self._next})
    return iterator

  def __iter__(self) -> PairBatches:
    return self

  def __next__(self) -> dict:
    if self._next >= self._steps():
      raise StopIteration
    if self._iterator is None:
      self._iterator = self._open()
    data = self._next_within(self._cfg.batch_timeout_s)
    epoch, step = self.locate(self._next)
    if step == 0 and epoch:
      logging.info("data[%s]: epoch %d begins", self.split, epoch)
    self._next += 1
    return self._to_global(data)

  def _next_within(self, timeout: float) -> dict[str, np.ndarray]:
    """The reader's next host batch, waited for in a daemon thread at most `timeout` seconds (0:
    in this thread, forever), so a stuck reader raises here and never blocks the process's exit."""
    if not timeout:
      return next(self._iterator)
    result = {}

    def run():
      try:
        result["batch"] = next(self._iterator)
      except BaseException as e:  # handed to the caller below
        result["error"] = e
    waiter = threading.Thread(target=run, name="data-next", daemon=True)
    waiter.start()
    waiter.join(timeout)
    if waiter.is_alive():
      self._iterator = None  # still inside the reader: dropped, not closed under it
      raise TimeoutError(f"data[{self.split}]: the batch of step {self._next} was not ready after "
                         f"{timeout} s (data.batch_timeout_s): the reader is stuck")
    if "error" in result:
      raise result["error"]
    return result["batch"]

  def _to_global(self, data: dict[str, np.ndarray]) -> dict:
    if self._sharding is None:
      return data
    return {name: jax.make_array_from_process_local_data(
        self._sharding, value, (value.shape[0] * self.process_count, *value.shape[1:]))
            for name, value in data.items()}

  def get_state(self) -> dict:
    """The position after the last batch returned (Grain's iterator state), as JSON values."""
    return {"next_index": self._next, "seed": self.seed,
            "num_pairs": self.num_pairs, "global_batch": self.global_batch,
            "process_count": self.process_count,
            "pack_rows": self.settings.rows if self.pack else 0}

  def set_state(self, state: Mapping) -> None:
    """Continue exactly after the batch at which `state` was taken."""
    for key in ("seed", "num_pairs", "global_batch", "pack_rows"):
      mine = self.get_state()[key]
      if state.get(key, mine) != mine:
        raise ValueError(f"data state has {key}={state[key]}, but this pipeline has {mine}: it is "
                         f"not the same data order")
    self.close()
    self._next = int(state["next_index"])

  def close(self) -> None:
    """Stop the reader's threads (a later `next` restarts them at the current position)."""
    iterator, self._iterator = getattr(self, "_iterator", None), None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()

  def __del__(self):
    self.close()


def _tfdata_steps(batches: PairBatches, start: int, stop: int, prefetch: int) -> Iterator[dict]:
  """The tf.data loader: `batches.host_batch` of steps `start..stop-1`, mapped and prefetched by
  tf.data in order (the same batches as Grain's)."""
  import tensorflow as tf
  keys = packing.PACKED_KEYS
  types = tuple(tf.float32 if k in FLOAT_KEYS else tf.int32 for k in keys)

  def load(index):
    batch = batches.host_batch(int(index))
    return tuple(batch[k] for k in keys)
  steps = tf.data.Dataset.range(start, stop).map(
      lambda index: tf.numpy_function(load, [index], types, stateful=False),
      num_parallel_calls=max(prefetch, 1), deterministic=True)
  if prefetch:
    steps = steps.prefetch(prefetch)
  for values in steps.as_numpy_iterator():
    yield dict(zip(keys, values))


def _synthetic_batch(cfg, indices: np.ndarray, seed: int, seq_len: int) -> PairArrays:
  """Random pairs of `seq_len` tokens whose two sequences share their first half (the prompt)."""
  tokens = np.stack([np.random.default_rng([seed, 1 << 20, int(i)]).integers(
      0, cfg.vocab_size, (2, seq_len), dtype=np.int32) for i in indices])
  tokens[:, 1, :seq_len // 2] = tokens[:, 0, :seq_len // 2]
  n = len(indices)
  return PairArrays.from_lengths(tokens.reshape(-1), np.full((n, 2), seq_len),
                                 np.full((n, 2), seq_len // 2), np.zeros(n, np.float32))


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

  With a `sharding` (of the batch's rows; `step.batch_shardings`) the batches are global jax
  Arrays; with None they are this process's numpy arrays.
  `repeat=False` stops after one epoch. `row_multiple` (packed: the step's microbatches)
  multiplies the devices a process's rows are split over.
  """
  return PairBatches(cfg, split=split, global_batch=global_batch, seq_len=seq_len, sharding=sharding,
                     seed=seed, repeat=repeat, process_index=jax.process_index(),
                     process_count=jax.process_count(), row_multiple=row_multiple)
