"""Token ids of preference pairs: prompt + response + end token, cut safely to `seq_len`.

Each sequence is tokenized as one text (`Tokenizer.encode_joined`), as transformers, TRL and
RewardBench tokenize it, and the response boundary comes from the tokenizer's offsets.

One truncation policy (`TRUNCATION`) is chosen per data set, recorded in the prepared data's
manifest and with the checkpoint (`save_truncation`), and used by prepare, training, `score` and `eval` alike. The
reward is read at the last real token, so the end token always survives. A sequence that does not
fit first loses prompt tokens from the left, the SAME number from both sequences of a pair (the
larger of the two excesses), so chosen and rejected still see one prompt; then response tokens:
- `keep_end` (the default) cuts the response's START: a solution's answer is at its end, and a
  reward model that never sees it can only judge style;
- `keep_head` cuts the response's end (the reference CodePMP trainer's right truncation);
- `drop` drops the pair instead.
Cuts are counted; so are pairs whose two sequences become token-identical (no ranking signal:
`fit_pair` drops them).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from codepmp_jax.data.records import PairRecord

TRUNCATION = ("keep_end", "keep_head", "drop")
DEFAULT_TRUNCATION = "keep_end"
TRUNCATION_FILE = "truncation.json"


def bucket_length(length: int, minimum: int = 16, steps_per_octave: int = 1) -> int:
  """The padded length for a batch whose longest sequence has `length` tokens.

  Padding to a few fixed lengths bounds how many programs jit compiles. Lengths up to `minimum`
  pad to `minimum`; above it every octave (64..128, 128..256, ...) has `steps_per_octave` equally
  spaced buckets (a power of two), so padding wastes under `1 / steps_per_octave` of the compute.
  """
  if steps_per_octave < 1 or steps_per_octave & (steps_per_octave - 1):
    raise ValueError(f"steps_per_octave must be a power of two, got {steps_per_octave}")
  if length <= minimum:
    return minimum
  octave_start = 1 << ((length - 1).bit_length() - 1)
  step = max(octave_start // steps_per_octave, 1)
  return -(-length // step) * step


@dataclasses.dataclass(frozen=True)
class EncodedSequence:
  """`ids` = prompt + response + eos; the response starts at `response_start`.

  `prompt_cut` / `response_cut` count the tokens removed to fit (0 when it fit).
  """
  ids: tuple[int, ...]
  response_start: int
  prompt_cut: int = 0
  response_cut: int = 0


@dataclasses.dataclass(frozen=True)
class EncodedPair:
  """A tokenized preference pair; `margin` is 0 where the data has none."""
  chosen: EncodedSequence
  rejected: EncodedSequence
  margin: float = 0.0


@dataclasses.dataclass
class EncodeStats:
  """Pairs kept, how many needed their prompt or response cut, and how many were dropped: too
  long under `truncation="drop"`, or token-identical sides after tokenization and truncation."""
  pairs: int = 0
  truncated_prompt: int = 0
  truncated_response: int = 0
  dropped_overlong: int = 0
  dropped_identical: int = 0

  def add(self, other: EncodeStats) -> None:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


Tokenized = tuple[Sequence[int], int]  # (ids of prompt + response, index where the response starts)


def check_truncation(truncation: str) -> str:
  if truncation not in TRUNCATION:
    raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
  return truncation


def _cut(ids: Sequence[int], response_start: int, prompt_cut: int, total_cut: int, eos_id: int,
         truncation: str) -> EncodedSequence:
  """`ids` + eos with `total_cut` tokens removed: `prompt_cut` from the left, the rest from the
  response (its start for `keep_end`, its end for `keep_head`)."""
  response_len = len(ids) - response_start
  response_cut = total_cut - prompt_cut
  if response_cut > response_len:  # more than the response holds: the rest comes off the prompt
    prompt_cut += response_cut - response_len
    response_cut = response_len
  if truncation == "keep_end":
    kept = [*ids[prompt_cut:response_start], *ids[response_start + response_cut:]]
  else:
    kept = list(ids[prompt_cut:len(ids) - response_cut])
  return EncodedSequence((*kept, eos_id), response_start - prompt_cut, prompt_cut, response_cut)


def fit_sequence(ids: Sequence[int], response_start: int, eos_id: int, seq_len: int,
                 truncation: str = DEFAULT_TRUNCATION) -> EncodedSequence | None:
  """prompt + response + eos within `seq_len` tokens, or None if too long under `truncation="drop"`."""
  return _fit([(ids, response_start)], eos_id, seq_len, truncation)[0]


def _fit(sequences: Sequence[Tokenized], eos_id: int, seq_len: int,
         truncation: str) -> list[EncodedSequence | None]:
  """Fit sequences that share a prompt: each loses the same number of prompt tokens."""
  check_truncation(truncation)
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2, got {seq_len}")
  excess = [len(ids) + 1 - seq_len for ids, _ in sequences]
  if max(excess) <= 0:
    return [EncodedSequence((*ids, eos_id), start) for ids, start in sequences]
  if truncation == "drop":
    return [None] * len(sequences)
  prompt_cut = min(max(excess), *(start for _, start in sequences))
  return [_cut(ids, start, prompt_cut, max(e, prompt_cut), eos_id, truncation)
          for (ids, start), e in zip(sequences, excess)]


def encode_sequence(tokenizer, prompt: str, response: str, seq_len: int,
                    truncation: str = DEFAULT_TRUNCATION) -> EncodedSequence | None:
  """Token ids of one prompt + response + eos (see `fit_sequence`)."""
  ids, start = tokenizer.encode_joined(prompt, response)
  return fit_sequence(ids, start, tokenizer.eos_id, seq_len, truncation)


def fit_pair(chosen: Tokenized, rejected: Tokenized, margin: float | None, eos_id: int, seq_len: int,
             truncation: str, stats: EncodeStats) -> EncodedPair | None:
  """One pair from its two tokenized sequences, counted in `stats`; None if dropped (too long
  under `truncation="drop"`, or its two sequences token-identical once fitted).

  Both sequences lose the same number of prompt tokens (the larger excess, at most the prompt),
  so a pair's two sequences keep the same prompt tokens.
  """
  fitted = _fit([chosen, rejected], eos_id, seq_len, truncation)
  if None in fitted:
    stats.dropped_overlong += 1
    return None
  if fitted[0].ids == fitted[1].ids:
    stats.dropped_identical += 1
    return None
  stats.pairs += 1
  stats.truncated_prompt += any(s.prompt_cut for s in fitted)
  stats.truncated_response += any(s.response_cut for s in fitted)
  return EncodedPair(fitted[0], fitted[1], 0.0 if margin is None else float(margin))


def encode_pair(tokenizer, record: PairRecord, seq_len: int, truncation: str = DEFAULT_TRUNCATION,
                stats: EncodeStats | None = None) -> EncodedPair | None:
  """A tokenized pair (chosen and rejected keep one prompt), or None if dropped (see `fit_pair`)."""
  pairs = encode_records(tokenizer, [record], seq_len, truncation, stats)
  return pairs[0] if pairs else None


def encode_records(tokenizer, records: Sequence[PairRecord], seq_len: int,
                   truncation: str = DEFAULT_TRUNCATION,
                   stats: EncodeStats | None = None) -> list[EncodedPair]:
  """`encode_pair` of many records with one batched tokenizer call (fast: all cores)."""
  stats = stats if stats is not None else EncodeStats()
  prompts = [r.prompt for r in records for _ in range(2)]
  responses = [text for r in records for text in (r.chosen, r.rejected)]
  encoded = tokenizer.encode_joined_batch(prompts, responses)
  pairs = []
  for i, record in enumerate(records):
    pair = fit_pair(encoded[2 * i], encoded[2 * i + 1], record.margin, tokenizer.eos_id, seq_len,
                    truncation, stats)
    if pair is not None:
      pairs.append(pair)
  return pairs


@dataclasses.dataclass(frozen=True)
class PairArrays:
  """Many encoded pairs in flat numpy arrays, for fast transfer, storage and random access.

  `tokens` holds every sequence back to back (chosen then rejected, pair by pair); `offsets`,
  `lengths` and `response_start` are `[n, 2]` (index 1: 0 = chosen, 1 = rejected); `margin` is `[n]`.
  """
  tokens: np.ndarray
  offsets: np.ndarray
  lengths: np.ndarray
  response_start: np.ndarray
  margin: np.ndarray

  def __len__(self) -> int:
    return len(self.margin)

  @classmethod
  def from_pairs(cls, pairs: Sequence[EncodedPair]) -> PairArrays:
    seqs = [s for p in pairs for s in (p.chosen, p.rejected)]
    lengths = np.array([len(s.ids) for s in seqs], np.int64).reshape(-1, 2)
    tokens = np.fromiter((t for s in seqs for t in s.ids), np.int32, count=int(lengths.sum()))
    starts = np.array([s.response_start for s in seqs], np.int32).reshape(-1, 2)
    return cls.from_lengths(tokens, lengths, starts, np.array([p.margin for p in pairs], np.float32))

  @classmethod
  def from_lengths(cls, tokens: np.ndarray, lengths: np.ndarray, response_start: np.ndarray,
                   margin: np.ndarray) -> PairArrays:
    """Arrays from back-to-back tokens and the `[n, 2]` sequence lengths."""
    lengths = np.asarray(lengths, np.int64).reshape(-1, 2)
    ends = np.cumsum(lengths.reshape(-1))
    offsets = (ends - lengths.reshape(-1)).reshape(-1, 2)
    return cls(np.asarray(tokens, np.int32), offsets, lengths.astype(np.int32),
               np.asarray(response_start, np.int32).reshape(-1, 2), np.asarray(margin, np.float32))

  @classmethod
  def concatenate(cls, parts: Sequence[PairArrays]) -> PairArrays:
    return cls.from_lengths(np.concatenate([p.tokens for p in parts] or [np.zeros(0, np.int32)]),
                            np.concatenate([p.lengths for p in parts] or [np.zeros((0, 2))]),
                            np.concatenate([p.response_start for p in parts] or [np.zeros((0, 2))]),
                            np.concatenate([p.margin for p in parts] or [np.zeros(0)]))

  def shared_prompt(self) -> np.ndarray:
    """[n] int32: how many leading tokens each pair's two sequences have in common within both
    prompts (at most the shorter `response_start`, and one short of the shorter sequence): the
    prompt a packed row can hold once for both (`packing.pack_pairs(shared_prompt=...)`)."""
    caps = np.maximum(np.minimum(self.response_start.min(axis=1), self.lengths.min(axis=1) - 1), 0)
    shared = caps.astype(np.int32)
    chunk = 4096  # prompts at a time: bounds the index arrays
    for lo in range(0, len(self), chunk):
      cap = caps[lo:lo + chunk]
      within = np.arange(int(cap.sum())) - np.repeat(np.cumsum(cap) - cap, cap)
      chosen, rejected = (self.tokens[np.repeat(self.offsets[lo:lo + chunk, which], cap) + within]
                          for which in (0, 1))
      differ = np.flatnonzero(chosen != rejected)
      np.minimum.at(shared, lo + np.repeat(np.arange(len(cap)), cap)[differ], within[differ])
    return shared

  def sequence(self, index: int, which: int) -> np.ndarray:
    """The token ids of pair `index`, chosen (`which=0`) or rejected (1)."""
    start = self.offsets[index, which]
    return self.tokens[start:start + self.lengths[index, which]]

  def sequence_rows(self, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sequence alone in its own row, right-padded to `length` (chosen, rejected, chosen,
    ...: the layout a transformers reward model scores): ids `[2n, length]` int32, their lengths
    `[2n]`, and the LM mask `[2n, length]` (1 on the chosen responses' tokens, from
    `max(response_start, 1)`; 0 in the rejected rows)."""
    lengths = self.lengths.reshape(-1)
    columns = np.arange(length)
    real = columns < lengths[:, None]
    index = np.minimum(self.offsets.reshape(-1)[:, None] + columns, max(len(self.tokens) - 1, 0))
    ids = np.where(real, self.tokens[index] if len(self.tokens) else pad_id, pad_id).astype(np.int32)
    start = np.maximum(self.response_start.reshape(-1), 1)[:, None]
    lm_mask = (real & (columns >= start)).astype(np.int32)
    lm_mask[1::2] = 0
    return ids, lengths, lm_mask


def truncation_report(sequences: Sequence[EncodedSequence]) -> dict:
  """How many scored sequences lost tokens, and in which part: `{"sequences", "prompt", "response",
  "share"}` (`share`: the fraction that lost any tokens). Every evaluation reports it."""
  prompt = sum(1 for s in sequences if s.prompt_cut)
  response = sum(1 for s in sequences if s.response_cut)
  cut = sum(1 for s in sequences if s.prompt_cut or s.response_cut)
  return {"sequences": len(sequences), "prompt": prompt, "response": response,
          "share": cut / len(sequences) if sequences else 0.0}


def save_truncation(directory, truncation: str) -> None:
  """Record with prepared data, a workdir, a checkpoint or an export how its inputs are cut."""
  from etils import epath
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / TRUNCATION_FILE).write_text(json.dumps({"truncation": check_truncation(truncation)}) + "\n")


def load_truncation(directory) -> str:
  """The truncation policy stored under `directory`, else `DEFAULT_TRUNCATION` (older runs)."""
  from etils import epath
  file = epath.Path(directory) / TRUNCATION_FILE
  if not file.is_file():
    return DEFAULT_TRUNCATION
  try:
    stored = json.loads(file.read_text())["truncation"]
  except (json.JSONDecodeError, KeyError, TypeError):
    raise ValueError(f"{file}: expected {{\"truncation\": one of {list(TRUNCATION)}}}") from None
  if stored not in TRUNCATION:
    raise ValueError(f"{file}: unknown truncation {stored!r}; known: {list(TRUNCATION)}")
  return stored
