"""Packed pair batches: several preference pairs per row, so a step computes on real tokens, not padding.

A padded batch `[B, 2, L]` spends the compute of `2 B L` tokens whatever the pairs' lengths; packing
puts the sequences back to back in `[R, L]` rows of at most `row_len` tokens instead. A pair's chosen and rejected
sequences always sit side by side in ONE row (`[c1 r1 c2 r2 ...]`), so the pair stays on one device
under data parallelism. Per token the batch says which sequence it belongs to (`segment_ids`,
1, 2, ... within a row, 0 = padding) and its position within it (`positions`, restarting at 0), so
the model attends only within segments and rotates by the segment's own positions; each pair has a
slot (row r, slot k < `max_pairs_per_row`) naming the columns of its chosen and rejected last
tokens, where the rewards are read. Each row also lists the columns of its LM targets (`lm_index`),
so the LM head runs only there, not over the rejected sequences and padding that share the row,
and the columns of each of its sequences (`sequence_index`), so attention runs sequence by
sequence (`attention.sequence_attention`) instead of over the whole row. Shapes are static (`R`,
`L` columns, `max_pairs_per_row` `K`, `M` LM slots, `S` sequence slots of `T` tokens); unused
slots have `pair_valid = 0`, `lm_index = 0` and `sequence_index = -1`.

`pack_pairs(arrays, row_len=..., max_pairs_per_row=..., pad_id=..., shape=PackedShape(...))` is
pure numpy and deterministic: first-fit decreasing (pairs sorted by total length, longest first,
ties by index; each goes to the first row with room) or first fit in the given order. With a
`shape` fixed, pairs that do not fit its rows are returned as left over (the caller carries them
into the next batch); without it, as many rows are used as the pairs need. The batch layout:

  input_ids    [R, L] int32   tokens, `pad_id` after the last segment of a row
  segment_ids  [R, L] int32   1, 2, ... per sequence in the row; 0 = padding
  positions    [R, L] int32   position within the segment (0 on padding)
  lm_mask      [R, L] int32   1 on the chosen responses' tokens (a token is
                              predicted from the one before it, never the first of a segment)
  lm_index     [R, M] int32   the columns where `lm_mask` is 1, ascending, then 0 (never a target:
                              column 0 starts a segment or is padding)
  sequence_index [R, S, T] int32  the columns of segment s + 1's tokens in order, then -1
  reward_index [R, 2K] int32  columns of (chosen, rejected) last tokens, slot by slot: c0 r0 c1 r1 ..
  pair_valid   [R, K] float32 1 where the slot holds a pair
  margin       [R, K] float32 the pair's margin (0 in empty slots)

Shared prompts (`pack_pairs(shared_prompt=PairArrays.shared_prompt())`,
`pack_batch(share_prompt=True)`, the input pipeline's `data.pack_share_prompt`): a pair's two
sequences usually begin with the same prompt tokens, and under causal attention those compute
the same states in both, so the row holds them once: `[prompt, chosen response, rejected response]`, the
prompt in the chosen segment, the rejected segment's positions going on from the prompt's end,
and `sequence_index` listing the prompt's columns in BOTH sequences' slots. Dense layers then run
on `c + r - p` tokens a pair instead of `c + r`; the loss and gradients are unchanged. Such rows
need `sequence_index` (a segment mask alone would hide the prompt from the rejected response).

The input pipeline packs every step into ONE shape (`sampler.PackPlan` plans each step's pairs
and their rows from sizes alone; `pack_pairs(rows=...)` lays them out), so a run compiles its step
once; unpacked, it lays one pair a row (`pair_rows`), padded to a bucket length. `pack_batch`
packs a given set of pairs whole into the least rounded shape that holds them (benchmarks and
tests). `codepmp_jax.step.make_train_step` trains on any of them with the same loss and gradients
for the same pairs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from codepmp_jax.data.encode import PairArrays, bucket_length

ORDERS = ("ffd", "first_fit", "balanced")
PACKED_KEYS = ("input_ids", "segment_ids", "positions", "lm_mask", "lm_index", "sequence_index",
               "reward_index", "pair_valid", "margin")
ROWS_PER_OCTAVE = 4
LM_SLOTS_PER_OCTAVE = 4
SEQUENCE_LEN_PER_OCTAVE = 4
MIN_SEQUENCE_LEN = 128


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


def pair_sizes(lengths: np.ndarray, response_start: np.ndarray,
               shared_prompt: np.ndarray | None = None) -> np.ndarray:
  """[n, 4] int32 per pair, what packing needs to know of it without its tokens: its tokens in a
  row (chosen + rejected, less the `shared_prompt` laid out once; `PairArrays.shared_prompt`), LM
  targets (its chosen response, less a segment's first token), its longer sequence, and its
  shared prompt (0 without `shared_prompt`) (`lengths`, `response_start` [n, 2] as in
  `PairArrays`)."""
  lengths, starts = np.asarray(lengths, np.int64), np.asarray(response_start, np.int64)
  shared = (np.zeros(len(lengths), np.int64) if shared_prompt is None
            else np.asarray(shared_prompt, np.int64))
  lm_targets = np.maximum(lengths[:, 0] - np.maximum(starts[:, 0], 1), 0)
  return np.stack([lengths.sum(axis=1) - shared, lm_targets, lengths.max(axis=1, initial=0),
                   shared], axis=1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PackedShape:
  """The static sizes of a packed batch: `rows` R of `columns` L tokens (at most `row_len`: the
  fullest row's tokens, so a batch of few or short pairs has short rows), `lm_slots` M,
  `sequence_slots` S of `sequence_len` T tokens (see the module docstring)."""
  rows: int
  lm_slots: int
  sequence_slots: int
  sequence_len: int
  columns: int

  @classmethod
  def of(cls, sizes: np.ndarray, row_len: int, max_pairs_per_row: int, order: str = "ffd",
         num_rows: int | None = None) -> PackedShape:
    """The least sizes that hold pairs of `sizes` ([n, 4], `pair_sizes`) packed by `pack_pairs`
    (into `num_rows` rows, or as many as they need)."""
    rows = assign_rows(sizes[:, 0], row_len, max_pairs_per_row, num_rows, order)
    return cls(rows=num_rows or int(rows.max(initial=-1)) + 1,
               lm_slots=int(np.bincount(rows, sizes[:, 1]).max(initial=0)),
               sequence_slots=2 * int(np.bincount(rows).max(initial=0)),
               sequence_len=int(sizes[:, 2].max(initial=0)),
               columns=int(np.bincount(rows, sizes[:, 0]).max(initial=0)))

  @classmethod
  def pair_rows(cls, rows: int, length: int) -> PackedShape:
    """The shape of `rows` pairs laid one a row (`pair_rows`), sequences of up to `length` tokens."""
    return cls(rows=rows, lm_slots=length, sequence_slots=2, sequence_len=length, columns=2 * length)

  def array_shapes(self, max_pairs_per_row: int) -> dict[str, tuple[int, ...]]:
    """The shape of each array of a packed batch of this shape (`PACKED_KEYS`)."""
    r, k = self.rows, max_pairs_per_row
    return {"input_ids": (r, self.columns), "segment_ids": (r, self.columns),
            "positions": (r, self.columns), "lm_mask": (r, self.columns),
            "lm_index": (r, self.lm_slots),
            "sequence_index": (r, self.sequence_slots, self.sequence_len),
            "reward_index": (r, 2 * k), "pair_valid": (r, k), "margin": (r, k)}

  def union(self, other: PackedShape) -> PackedShape:
    """Sizes that hold both (every process packs its own pairs into the same shape)."""
    return PackedShape(*(max(a, b) for a, b in zip(dataclasses.astuple(self),
                                                   dataclasses.astuple(other))))

  def rounded(self, row_len: int, row_multiple: int = 1,
              rows_per_octave: int = ROWS_PER_OCTAVE) -> PackedShape:
    """Rounded up to a few sizes each, so a run compiles few shapes: R to `row_multiple` x
    `rows_per_octave` sizes per octave, M to `LM_SLOTS_PER_OCTAVE` sizes per octave from 16, T and
    L to `SEQUENCE_LEN_PER_OCTAVE` sizes per octave from `MIN_SEQUENCE_LEN`, M, T and L never past
    `row_len`; S (even: 2 a pair, at most 2K) stays as it is."""
    if row_multiple < 1:
      raise ValueError(f"row_multiple must be at least 1, got {row_multiple}")
    rows = row_multiple * bucket_length(-(-max(self.rows, 1) // row_multiple), 1, rows_per_octave)
    lm_slots = bucket_length(max(self.lm_slots, 1), 16, LM_SLOTS_PER_OCTAVE)
    sequence_len, columns = (bucket_length(max(n, 1), MIN_SEQUENCE_LEN, SEQUENCE_LEN_PER_OCTAVE)
                             for n in (self.sequence_len, self.columns))
    return PackedShape(rows, min(lm_slots, row_len), max(self.sequence_slots, 1),
                       min(sequence_len, row_len), min(columns, row_len))


def batch_shape(sizes: Sequence[np.ndarray], row_len: int, max_pairs_per_row: int,
                row_multiple: int = 1, rows_per_octave: int = ROWS_PER_OCTAVE) -> PackedShape:
  """The `rounded` shape that every process's pairs (`sizes`, one `pair_sizes` array each) fit
  when packed `balanced` (what `pack_batch` and the input pipeline pack with): the rows `ffd`
  needs, rounded, then the slots of the balanced packing into that many rows."""
  rows = PackedShape(1, 1, 1, 1, 1)
  for part in sizes:
    rows = rows.union(PackedShape.of(part, row_len, max_pairs_per_row))
  num_rows = rows.rounded(row_len, row_multiple, rows_per_octave).rows
  shape = PackedShape(num_rows, 1, 1, 1, 1)
  for part in sizes:
    shape = shape.union(PackedShape.of(part, row_len, max_pairs_per_row, "balanced", num_rows))
  return shape.rounded(row_len, row_multiple, rows_per_octave)


def assign_rows(pair_lengths: np.ndarray, row_len: int, max_pairs_per_row: int,
                num_rows: int | None = None, order: str = "ffd",
                lm_targets: np.ndarray | None = None, lm_slots: int | None = None) -> np.ndarray:
  """Row of each pair (-1: did not fit in `num_rows` rows); `pair_lengths` [n] are chosen + rejected.

  First-fit: every pair goes to the lowest-numbered row with room for its tokens and a free slot;
  `ffd` visits pairs longest first (ties in index order), `first_fit` in the given order. Without
  `num_rows`, a new row opens whenever no open row has room, so every pair is placed.
  `balanced` (needs `num_rows`) visits pairs longest first and puts each in the row with room that
  holds the fewest pairs (then the most free tokens, then the lowest number), so sequences spread
  evenly over the rows and no row needs many sequence slots (`sequence_index`, the attention
  work); where that leaves a pair out it is `ffd` instead, which fits in `num_rows` rows whatever
  `ffd` without `num_rows` packs into as many. With `lm_targets` (per pair) and `lm_slots`, a row
  also holds at most `lm_slots` LM targets.
  """
  if order not in ORDERS:
    raise ValueError(f"packing order must be one of {ORDERS}, got {order!r}")
  if order == "balanced" and num_rows is None:
    raise ValueError("balanced packing needs num_rows")
  if max_pairs_per_row < 1:
    raise ValueError(f"max_pairs_per_row must be at least 1, got {max_pairs_per_row}")
  pair_lengths = np.asarray(pair_lengths, np.int64)
  too_long = np.flatnonzero(pair_lengths > row_len)
  if len(too_long):
    i = int(too_long[0])
    raise ValueError(f"pair {i} has {int(pair_lengths[i])} tokens (chosen + rejected), more than "
                     f"row_len={row_len}: rows must hold a whole pair (row_len >= 2 * seq_len)")
  n = len(pair_lengths)
  visit = _visit_order(pair_lengths, order)
  capacity = n if num_rows is None else num_rows
  free = np.full(capacity, row_len, np.int64)
  slots = np.zeros(capacity, np.int64)
  lm_free = np.full(capacity, np.iinfo(np.int64).max if lm_slots is None else lm_slots, np.int64)
  lm = np.zeros(n, np.int64) if lm_targets is None else np.asarray(lm_targets, np.int64)
  rows = np.full(n, -1, np.int64)
  opened = 0 if num_rows is None else capacity
  for i in visit:
    fits = np.flatnonzero((free[:opened] >= pair_lengths[i]) & (slots[:opened] < max_pairs_per_row)
                          & (lm_free[:opened] >= lm[i]))
    if len(fits) and order == "balanced":
      row = int(fits[np.lexsort((-free[fits], slots[fits]))[0]])
    elif len(fits):
      row = int(fits[0])
    elif num_rows is None:
      row, opened = opened, opened + 1
    else:
      continue
    rows[i] = row
    free[row] -= pair_lengths[i]
    slots[row] += 1
    lm_free[row] -= lm[i]
  if order == "balanced" and (rows < 0).any():
    return assign_rows(pair_lengths, row_len, max_pairs_per_row, num_rows, "ffd", lm_targets, lm_slots)
  return rows


def _visit_order(pair_lengths: np.ndarray, order: str) -> np.ndarray:
  """The order `assign_rows` places pairs in: as given, or longest first (ties by index)."""
  return (np.arange(len(pair_lengths)) if order == "first_fit" else
          np.argsort(-pair_lengths, kind="stable"))


def pack_pairs(arrays: PairArrays, *, row_len: int, max_pairs_per_row: int, pad_id: int,
               shape: PackedShape | None = None, order: str = "ffd",
               shared_prompt: np.ndarray | None = None, rows: np.ndarray | None = None) -> PackResult:
  """Packs `arrays` into `[shape.rows, shape.columns]` rows (see the module docstring for the
  layout; rows are assigned as if `row_len` long).

  Within a row, pairs follow in the order they were assigned. Pairs that do not fit in
  `shape.rows` rows are returned in `left_over` (ascending indices): none is dropped without
  being listed there. Without a `shape`, the least that holds every pair (`PackedShape.of`) in
  rows of `row_len`; a row with more tokens, LM targets or sequences than `shape` allows is an
  error. With `shared_prompt` ([n], `PairArrays.shared_prompt` or less), each pair's shared
  prompt is laid out once (see the module docstring); more than `PairArrays.shared_prompt` is
  an error. With `rows` (the row of each pair, as `sampler.PackPlan` planned them; needs a
  `shape`), pairs are placed there, in the given order, instead of by `order`.
  """
  num_rows = None if shape is None else shape.rows
  shared = np.zeros(len(arrays), np.int64) if shared_prompt is None else np.asarray(shared_prompt, np.int64)
  pair_lengths = arrays.lengths.astype(np.int64).sum(axis=1) - shared
  if shared.any():
    common = arrays.shared_prompt()
    beyond = np.flatnonzero(shared > common)
    if len(beyond):
      i = int(beyond[0])
      raise ValueError(f"pair {i}: shared_prompt={shared[i]} is more than the common beginning of "
                       f"its {arrays.lengths[i, 0]}- and {arrays.lengths[i, 1]}-token sequences "
                       f"({common[i]}; does the index match the tokens?)")
  if rows is None:
    rows = assign_rows(pair_lengths, row_len, max_pairs_per_row, num_rows, order)
    visit = _visit_order(pair_lengths, order)
  else:
    rows, visit = np.asarray(rows, np.int64), np.arange(len(pair_lengths))
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
  prompts = []  # (row, rejected slot, first column, tokens) of each shared prompt
  for i in placed:
    row = rows[i]
    for which in (0, 1):
      skip = int(shared[i]) if which == 1 else 0  # the rejected sequence's shared prompt is laid out once
      length = int(arrays.lengths[i, which])
      start, end = used[row], used[row] + length - skip
      batch["input_ids"][row, start:end] = arrays.sequence(i, which)[skip:]
      batch["segment_ids"][row, start:end] = 2 * slot[row] + which + 1
      batch["positions"][row, start:end] = np.arange(skip, length)
      if which == 0:
        response = max(int(arrays.response_start[i, 0]), 1)
        batch["lm_mask"][row, start + response:end] = 1
        prompts.append((row, 2 * slot[row] + 1, start, int(shared[i])))
      batch["reward_index"][row, 2 * slot[row] + which] = end - 1
      used[row] = end
    batch["pair_valid"][row, slot[row]] = 1.0
    batch["margin"][row, slot[row]] = arrays.margin[i]
    slots[row, slot[row]] = i
    slot[row] += 1
  if shape is not None:
    if used.max(initial=0) > shape.columns:
      raise ValueError(f"packed row {int(np.argmax(used))} has {int(used.max())} tokens, more than "
                       f"columns={shape.columns}")
    for key in ("input_ids", "segment_ids", "positions", "lm_mask"):
      batch[key] = batch[key][:, :shape.columns]
  batch["lm_index"] = _lm_index(batch["lm_mask"], None if shape is None else shape.lm_slots)
  batch["sequence_index"] = _sequence_index(
      batch["segment_ids"], batch["positions"],
      None if shape is None else (shape.sequence_slots, shape.sequence_len))
  for row, rejected, start, tokens in prompts:
    batch["sequence_index"][row, rejected, :tokens] = np.arange(start, start + tokens)
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


def _sequence_index(segment_ids: np.ndarray, positions: np.ndarray,
                    sequence_slots: tuple[int, int] | None) -> np.ndarray:
  """[R, S, T] columns of each row's segments 1..S, -1 past a segment's end."""
  rows, columns = np.nonzero(segment_ids)
  segment = segment_ids[rows, columns] - 1
  offset = positions[rows, columns]  # position within the segment
  most_slots = int(segment.max(initial=-1)) + 1
  longest = int(offset.max(initial=-1)) + 1
  slots, length = sequence_slots or (max(most_slots, 1), max(longest, 1))
  if most_slots > slots or longest > length:
    raise ValueError(f"packed rows hold up to {most_slots} sequences of up to {longest} tokens, "
                     f"more than sequence_slots=({slots}, {length})")
  index = np.full((len(segment_ids), slots, length), -1, np.int32)
  index[rows, segment, offset] = columns
  return index


def pair_rows(arrays: PairArrays, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """The batch layout with one pair a row, in the given order: each pair's chosen then rejected
  sequence in a row of `2 * length` columns (the unpacked, bucketed batches of the input pipeline;
  sequences of at most `length` tokens)."""
  return pack_pairs(arrays, row_len=2 * length, max_pairs_per_row=1, pad_id=pad_id,
                    shape=PackedShape.pair_rows(len(arrays), length), rows=np.arange(len(arrays))).batch


def pack_batch(arrays: PairArrays, *, row_len: int, max_pairs_per_row: int, pad_id: int,
               row_multiple: int = 1, rows_per_octave: int = ROWS_PER_OCTAVE,
               share_prompt: bool = False) -> PackResult:
  """Every pair of `arrays` packed `balanced` into the `batch_shape` that holds them.

  The row count is `row_multiple` x one of `rows_per_octave` sizes per octave, so padded rows
  waste under `1 / rows_per_octave` of them and a run compiles a few shapes. Rows left empty are
  all padding (`segment_ids` 0, no valid pair slot).
  """
  shared = arrays.shared_prompt() if share_prompt else None
  shape = batch_shape([pair_sizes(arrays.lengths, arrays.response_start, shared)], row_len,
                      max_pairs_per_row, row_multiple, rows_per_octave)
  return pack_pairs(arrays, row_len=row_len, max_pairs_per_row=max_pairs_per_row, pad_id=pad_id,
                    shape=shape, order="balanced", shared_prompt=shared)
