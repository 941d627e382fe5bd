"""Which pairs each step reads: read groups, epoch orders, and fixed-shape packing plans with carry.

Everything here is decided from pair sizes alone (`prepared.SIZES_DTYPE`), never from tokens, so
every process plans every process's steps cheaply and all agree, and a step's pairs are a pure
function of (seed, epoch, step): resuming needs no replay and no saved carry.

Read groups: the split's `N` pairs are cut into `G` contiguous groups, group `g` owning
`[g*N//G, (g+1)*N//G)`; process `p` of `P` reads the `G/P` consecutive groups
`[p*G/P, (p+1)*G/P)`, one contiguous range. Each group is visited in a permutation drawn from
`(seed, epoch, g)` (or in stored order for evaluation). With the same `G`, steps are the same for
every process count that divides `G`.

Unpacked (`BatchPlan`): step `k` takes `global_batch / G` pairs of each group's order; the pairs
of an epoch that do not fill a batch are counted. Padded lengths come from a fixed small set
(`bucket_lengths`) when bucketing, else every batch is `seq_len` long.

Packed (`PackPlan`): every step has the same shape, `rows / G` rows of `row_len` tokens per group.
A group fills a step from its order: first the pairs carried over from its previous step, then
new ones until their tokens reach the rows' capacity, placed first-fit (longest first) under
each row's token, pair-slot and LM-target limits. The pairs that did not fit are carried into
the group's next step, so in an epoch no pair is dropped and none is seen twice. The epoch ends
when every group is done; a group that finished early contributes empty rows.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from codepmp_jax.data import packing
from codepmp_jax.data.encode import bucket_length

MIN_BUCKET = 128


@dataclasses.dataclass(frozen=True)
class ReadGroups:
  """The contiguous read groups of a split and which process reads which."""
  num_pairs: int
  groups: int
  process_count: int

  def __post_init__(self):
    if self.groups % self.process_count:
      raise ValueError(f"data.read_groups={self.groups} must be a multiple of the "
                       f"{self.process_count} processes")

  def start(self, group: int) -> int:
    return group * self.num_pairs // self.groups

  def of_process(self, process: int) -> range:
    per_process = self.groups // self.process_count
    return range(process * per_process, (process + 1) * per_process)

  def process_range(self, process: int) -> tuple[int, int]:
    groups = self.of_process(process)
    return self.start(groups.start), self.start(groups.stop)

  def order(self, seed: int, epoch: int, group: int, shuffle: bool) -> np.ndarray:
    """Global indices of `group`'s pairs in the order epoch `epoch` visits them."""
    n = self.start(group + 1) - self.start(group)
    local = np.random.default_rng([seed, epoch, group]).permutation(n) if shuffle else np.arange(n)
    return local + self.start(group)


def bucket_lengths(seq_len: int) -> tuple[int, ...]:
  """The padded lengths a bucketed run uses: powers of two from `MIN_BUCKET` below `seq_len`,
  and `seq_len` (so a run compiles at most log2(seq_len / 128) + 1 shapes)."""
  lengths, length = [], MIN_BUCKET
  while length < seq_len:
    lengths.append(length)
    length *= 2
  return (*lengths, seq_len)


class BatchPlan:
  """Unpacked steps: `global_batch` pairs each, `global_batch / G` from each group."""

  def __init__(self, groups: ReadGroups, global_batch: int, longest: np.ndarray, seq_len: int,
               bucket: bool, seed: int, shuffle: bool):
    if global_batch % groups.groups:
      raise ValueError(f"data.read_groups={groups.groups} must divide global_batch {global_batch}")
    self.groups, self.seed, self.shuffle = groups, seed, shuffle
    self.group_batch = global_batch // groups.groups
    self.steps_per_epoch = (groups.num_pairs // groups.groups) // self.group_batch
    self._longest, self._seq_len, self._bucket = longest, seq_len, bucket

  @functools.lru_cache(maxsize=2)
  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """[steps, G, group_batch] global indices, and each step's padded length."""
    used = self.steps_per_epoch * self.group_batch
    steps = np.stack([self.groups.order(self.seed, epoch, g, self.shuffle)[:used].reshape(
        self.steps_per_epoch, self.group_batch) for g in range(self.groups.groups)], axis=1)
    if self._bucket and steps.size:
      longest = self._longest[steps].reshape(self.steps_per_epoch, -1).max(axis=1)
      allowed = np.asarray(bucket_lengths(self._seq_len))
      lengths = allowed[np.searchsorted(allowed, np.minimum(longest, self._seq_len))]
    else:
      lengths = np.full(self.steps_per_epoch, self._seq_len)
    return steps, lengths

  def step(self, epoch: int, step: int, process: int) -> tuple[np.ndarray, int]:
    """`process`'s pairs of step `step` (global indices) and the length to pad them to."""
    steps, lengths = self._epoch(epoch)
    groups = self.groups.of_process(process)
    return steps[step, groups.start:groups.stop].reshape(-1), int(lengths[step])

  def left_over(self, process: int) -> int:
    """Pairs of `process` that no step of an epoch takes."""
    start, stop = self.groups.process_range(process)
    return stop - start - self.steps_per_epoch * self.group_batch * len(self.groups.of_process(process))


@dataclasses.dataclass(frozen=True)
class PackSettings:
  """The fixed packed shape: `rows` (all processes) of `row_len` tokens, at most
  `pairs_per_row` pairs, `lm_slots` LM targets and sequences of `sequence_len` tokens a row."""
  rows: int
  row_len: int
  pairs_per_row: int
  lm_slots: int
  sequence_len: int

  def shape(self, process_count: int) -> packing.PackedShape:
    """One process's `PackedShape` (the same for every step of the run)."""
    return packing.PackedShape(rows=self.rows // process_count, lm_slots=self.lm_slots,
                               sequence_slots=2 * self.pairs_per_row,
                               sequence_len=self.sequence_len, columns=self.row_len)


@dataclasses.dataclass(frozen=True)
class GroupSteps:
  """One group's steps of an epoch: step `k` places `pairs[starts[k]:starts[k+1]]` (global
  indices) in rows `rows[...]` (within the group's rows), in placement order."""
  pairs: np.ndarray
  rows: np.ndarray
  starts: np.ndarray

  @property
  def count(self) -> int:
    return len(self.starts) - 1


def fill_steps(order: np.ndarray, sizes: np.ndarray, pack: PackSettings, rows: int) -> GroupSteps:
  """`PackPlan`'s steps of one group: `order` (global indices) packed into steps of `rows` rows
  with carry (see the module docstring); `sizes` are `packing.pair_sizes` of the whole split."""
  capacity = rows * pack.row_len
  tokens = sizes[order, 0].astype(np.int64)
  reach = np.cumsum(tokens)
  pairs, placed_rows, starts = [], [], [0]
  carry = np.zeros(0, np.int64)  # positions in `order`
  taken = 0
  while taken < len(order) or len(carry):
    room = capacity - int(tokens[carry].sum())
    stop = taken
    if room > 0 and taken < len(order):  # new pairs until their tokens reach the room left
      base = reach[taken - 1] if taken else 0
      stop = min(int(np.searchsorted(reach, base + room, "left")) + 1, len(order))
    new = np.arange(taken, stop)
    taken = stop
    visit = np.concatenate([carry[np.argsort(-tokens[carry], kind="stable")],
                            new[np.argsort(-tokens[new], kind="stable")]])
    where = packing.assign_rows(tokens[visit], pack.row_len, pack.pairs_per_row, rows,
                                "first_fit", lm_targets=sizes[order[visit], 1],
                                lm_slots=pack.lm_slots)
    done = where >= 0
    pairs.append(order[visit[done]])
    placed_rows.append(where[done])
    starts.append(starts[-1] + int(done.sum()))
    carry = np.sort(visit[~done])
  return GroupSteps(np.concatenate(pairs) if pairs else np.zeros(0, np.int64),
                    np.concatenate(placed_rows) if placed_rows else np.zeros(0, np.int64),
                    np.asarray(starts, np.int64))


class PackPlan:
  """Packed steps of one fixed shape (`PackSettings`), planned an epoch at a time for every group."""

  def __init__(self, groups: ReadGroups, sizes: np.ndarray, pack: PackSettings, seed: int,
               shuffle: bool):
    if pack.rows % groups.groups:
      raise ValueError(f"data.pack_rows={pack.rows} must be a multiple of data.read_groups="
                       f"{groups.groups}")
    too_long = np.flatnonzero(sizes[:, 0] > pack.row_len)
    if len(too_long):
      raise ValueError(f"pair {int(too_long[0])} has {int(sizes[too_long[0], 0])} tokens, more "
                       f"than data.pack_row_len={pack.row_len}: a row must hold a whole pair")
    self.groups, self.pack, self.seed, self.shuffle = groups, pack, seed, shuffle
    self.rows_per_group = pack.rows // groups.groups
    self._sizes = sizes

  @functools.lru_cache(maxsize=2)
  def epoch(self, epoch: int) -> list[GroupSteps]:
    return [fill_steps(self.groups.order(self.seed, epoch, g, self.shuffle), self._sizes,
                       self.pack, self.rows_per_group) for g in range(self.groups.groups)]

  def steps_per_epoch(self, epoch: int = 0) -> int:
    return max((g.count for g in self.epoch(epoch)), default=0)

  def step(self, epoch: int, step: int, process: int) -> tuple[np.ndarray, np.ndarray]:
    """`process`'s pairs of step `step` (global indices) and the row of each (within the
    process's rows), group after group."""
    pairs, rows = [], []
    for position, group in enumerate(self.groups.of_process(process)):
      steps = self.epoch(epoch)[group]
      if step < steps.count:
        lo, hi = steps.starts[step], steps.starts[step + 1]
        pairs.append(steps.pairs[lo:hi])
        rows.append(steps.rows[lo:hi] + position * self.rows_per_group)
    if not pairs:
      return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(pairs), np.concatenate(rows)
