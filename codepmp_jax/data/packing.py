"""Packed pair batches: several preference pairs per row, so a step computes on real tokens, not padding.

A padded batch `[B, 2, L]` spends the compute of `2 B L` tokens whatever the pairs' lengths; packing
puts the sequences back to back in fixed `[R, row_len]` rows instead. A pair's chosen and rejected
sequences always sit side by side in ONE row (`[c1 r1 c2 r2 ...]`), so the pair stays on one device
under data parallelism. Per token the batch says which sequence it belongs to (`segment_ids`,
1, 2, ... within a row, 0 = padding) and its position within it (`positions`, restarting at 0), so
the model attends only within segments and rotates by the segment's own positions; each pair has a
slot (row r, slot k < `max_pairs_per_row`) naming the columns of its chosen and rejected last
tokens, where the rewards are read; and each row lists the columns of its LM targets (`lm_index`),
so the LM head runs only there, not over the rejected sequences and padding that share the row.
Shapes are static (`R`, `row_len`, `max_pairs_per_row`, `M` LM slots); unused slots have
`pair_valid = 0` and `lm_index = 0`.

`pack_pairs(arrays, row_len=..., max_pairs_per_row=..., pad_id=..., num_rows=R)` is pure numpy and
deterministic: first-fit decreasing (pairs sorted by total length, longest first, ties by index;
each goes to the first row with room) or first fit in the given order. With `num_rows` fixed,
pairs that do not fit are returned as left over (the caller carries them into the next batch);
without it, as many rows are used as the pairs need. The batch layout:

  input_ids    [R, L] int32   tokens, `pad_id` after the last segment of a row
  segment_ids  [R, L] int32   1, 2, ... per sequence in the row; 0 = padding
  positions    [R, L] int32   position within the segment (0 on padding)
  lm_mask      [R, L] int32   1 on the chosen responses' tokens (as `pipeline.collate`: a token is
                              predicted from the one before it, never the first of a segment)
  lm_index     [R, M] int32   the columns where `lm_mask` is 1, ascending, then 0 (never a target:
                              column 0 starts a segment or is padding)
  reward_index [R, 2K] int32  columns of (chosen, rejected) last tokens, slot by slot: c0 r0 c1 r1 ..
  pair_valid   [R, K] float32 1 where the slot holds a pair
  margin       [R, K] float32 the pair's margin (0 in empty slots)

`pack_batch` is the form a training pipeline wants: ALL of a batch's pairs (so a step still trains
on a fixed number of pairs, as the padded step does, and resuming stays exact), in as many rows as
they need, the row count rounded up to a multiple of `row_multiple` (the devices the rows are split
over, times the microbatches) in a few sizes per octave, and `M` to a few sizes per octave too
(`round_lm_slots`), so only a few shapes are compiled.
`codepmp_jax.step.make_packed_train_step` trains on it with the same loss and gradients as the
padded step on the same pairs.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from codepmp_jax.data.encode import PairArrays, bucket_length

ORDERS = ("ffd", "first_fit")
PACKED_KEYS = ("input_ids", "segment_ids", "positions", "lm_mask", "lm_index", "reward_index",
               "pair_valid", "margin")
LM_SLOTS_PER_OCTAVE = 4


@dataclasses.dataclass(frozen=True)
class PackResult:
  """A packed batch; `slots` [R, K]: the index of the pair in each slot (-1: empty); the pairs left
  over (ascending indices); and its packing efficiency (real tokens / row tokens)."""
  batch: dict[str, np.ndarray]
  slots: np.ndarray
  left_over: np.ndarray

  @property
  def efficiency(self) -> float:
    return packing_efficiency(self.batch)


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
  """Real (non-padding) tokens / all row tokens of a packed batch."""
  segments = np.asarray(batch["segment_ids"])
  return float((segments > 0).sum() / max(segments.size, 1))


def lm_target_counts(lengths: np.ndarray, response_start: np.ndarray) -> np.ndarray:
  """[n] tokens the LM loss predicts per pair: its chosen response, less a segment's first token
  (`lengths`, `response_start` [n, 2] as in `PairArrays`)."""
  lengths, starts = np.asarray(lengths, np.int64), np.asarray(response_start, np.int64)
  return np.maximum(lengths[:, 0] - np.maximum(starts[:, 0], 1), 0)


def round_lm_slots(count: int, row_len: int, steps_per_octave: int = LM_SLOTS_PER_OCTAVE) -> int:
  """LM slots (`lm_index` columns) for rows of at most `count` LM targets: `count` rounded up to
  `steps_per_octave` sizes per octave (from 16), never more than `row_len`."""
  return min(bucket_length(max(int(count), 1), 16, steps_per_octave), row_len)


def assign_rows(pair_lengths: np.ndarray, row_len: int, max_pairs_per_row: int,
                num_rows: int | None = None, order: str = "ffd") -> np.ndarray:
  """Row of each pair (-1: did not fit in `num_rows` rows); `pair_lengths` [n] are chosen + rejected.

  First-fit: every pair goes to the lowest-numbered row with room for its tokens and a free slot;
  `ffd` visits pairs longest first (ties in index order), `first_fit` in the given order. Without
  `num_rows`, a new row opens whenever no open row has room, so every pair is placed.
  """
  if order not in ORDERS:
    raise ValueError(f"packing order must be one of {ORDERS}, got {order!r}")
  if max_pairs_per_row < 1:
    raise ValueError(f"max_pairs_per_row must be at least 1, got {max_pairs_per_row}")
  pair_lengths = np.asarray(pair_lengths, np.int64)
  too_long = np.flatnonzero(pair_lengths > row_len)
  if len(too_long):
    i = int(too_long[0])
    raise ValueError(f"pair {i} has {int(pair_lengths[i])} tokens (chosen + rejected), more than "
                     f"row_len={row_len}: rows must hold a whole pair (row_len >= 2 * seq_len)")
  n = len(pair_lengths)
  visit = np.argsort(-pair_lengths, kind="stable") if order == "ffd" else np.arange(n)
  capacity = n if num_rows is None else num_rows
  free = np.full(capacity, row_len, np.int64)
  slots = np.zeros(capacity, np.int64)
  rows = np.full(n, -1, np.int64)
  opened = 0 if num_rows is None else capacity
  for i in visit:
    fits = np.flatnonzero((free[:opened] >= pair_lengths[i]) & (slots[:opened] < max_pairs_per_row))
    if len(fits):
      row = int(fits[0])
    elif num_rows is None:
      row, opened = opened, opened + 1
    else:
      continue
    rows[i] = row
    free[row] -= pair_lengths[i]
    slots[row] += 1
  return rows


def pack_pairs(arrays: PairArrays, *, row_len: int, max_pairs_per_row: int, pad_id: int,
               num_rows: int | None = None, lm_slots: int | None = None,
               order: str = "ffd") -> PackResult:
  """Packs `arrays` into `[num_rows, row_len]` rows (see the module docstring for the layout).

  Within a row, pairs follow in the order they were assigned. Pairs that do not fit are returned
  in `left_over` (ascending indices): none is dropped without being listed there. `lm_slots` is
  `M` (default: the most LM targets of any row, at least 1); a row with more is an error.
  """
  pair_lengths = arrays.lengths.astype(np.int64).sum(axis=1)
  rows = assign_rows(pair_lengths, row_len, max_pairs_per_row, num_rows, order)
  visit = np.argsort(-pair_lengths, kind="stable") if order == "ffd" else np.arange(len(arrays))
  placed = np.array([i for i in visit if rows[i] >= 0], np.int64)
  num_rows = (int(rows.max()) + 1 if len(placed) else 0) if num_rows is None else num_rows
  k = max_pairs_per_row
  batch = {
      "input_ids": np.full((num_rows, row_len), pad_id, np.int32),
      "segment_ids": np.zeros((num_rows, row_len), np.int32),
      "positions": np.zeros((num_rows, row_len), np.int32),
      "lm_mask": np.zeros((num_rows, row_len), np.int32),
      "reward_index": np.zeros((num_rows, 2 * k), np.int32),
      "pair_valid": np.zeros((num_rows, k), np.float32),
      "margin": np.zeros((num_rows, k), np.float32),
  }
  slots = np.full((num_rows, k), -1, np.int64)
  used = np.zeros(num_rows, np.int64)  # columns taken per row
  slot = np.zeros(num_rows, np.int64)  # pairs placed per row
  for i in placed:
    row = rows[i]
    for which in (0, 1):
      length = int(arrays.lengths[i, which])
      start, end = used[row], used[row] + length
      batch["input_ids"][row, start:end] = arrays.sequence(i, which)
      batch["segment_ids"][row, start:end] = 2 * slot[row] + which + 1
      batch["positions"][row, start:end] = np.arange(length)
      if which == 0:
        response = max(int(arrays.response_start[i, 0]), 1)
        batch["lm_mask"][row, start + response:end] = 1
      batch["reward_index"][row, 2 * slot[row] + which] = end - 1
      used[row] = end
    batch["pair_valid"][row, slot[row]] = 1.0
    batch["margin"][row, slot[row]] = arrays.margin[i]
    slots[row, slot[row]] = i
    slot[row] += 1
  batch["lm_index"] = _lm_index(batch["lm_mask"], lm_slots)
  return PackResult(batch, slots, np.flatnonzero(rows < 0))


def _lm_index(lm_mask: np.ndarray, lm_slots: int | None) -> np.ndarray:
  """[R, M] columns where `lm_mask` is 1, ascending per row, padded with 0."""
  counts = lm_mask.sum(axis=1)
  most = int(counts.max(initial=0))
  lm_slots = max(most, 1) if lm_slots is None else lm_slots
  if most > lm_slots:
    row = int(np.argmax(counts))
    raise ValueError(f"packed row {row} has {most} LM targets, more than lm_slots={lm_slots}")
  index = np.zeros((len(lm_mask), lm_slots), np.int32)
  rows, columns = np.nonzero(lm_mask)
  index[rows, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)] = columns
  return index


def pack_batch(arrays: PairArrays, *, row_len: int, max_pairs_per_row: int, pad_id: int,
               row_multiple: int = 1, steps_per_octave: int = 4, order: str = "ffd") -> PackResult:
  """Every pair of `arrays` packed, the rows padded with empty ones to `row_multiple` x a bucket.

  The bucket is `encode.bucket_length(rows / row_multiple, minimum=1, steps_per_octave)`, so a
  padded row count wastes under `1 / steps_per_octave` of the rows and a run compiles a few
  shapes. Empty rows are all padding (`segment_ids` 0, no valid pair slot). `M` is
  `round_lm_slots` of the most LM targets in a row.
  """
  if row_multiple < 1:
    raise ValueError(f"row_multiple must be at least 1, got {row_multiple}")
  packed = pack_pairs(arrays, row_len=row_len, max_pairs_per_row=max_pairs_per_row, pad_id=pad_id,
                      order=order)
  most = int(packed.batch["lm_mask"].sum(axis=1).max(initial=0))
  packed.batch["lm_index"] = _lm_index(packed.batch["lm_mask"], round_lm_slots(most, row_len))
  rows = len(packed.slots)
  target = row_multiple * bucket_length(max(-(-rows // row_multiple), 1), 1, steps_per_octave)
  extra = target - rows
  batch = {key: np.concatenate([value, np.full((extra,) + value.shape[1:],
                                               pad_id if key == "input_ids" else 0, value.dtype)])
           for key, value in packed.batch.items()}
  slots = np.concatenate([packed.slots, np.full((extra, max_pairs_per_row), -1, np.int64)])
  return PackResult(batch, slots, packed.left_over)
