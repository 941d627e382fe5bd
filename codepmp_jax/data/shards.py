"""The prepared-shard format: flat int32 token files with a fixed-size index, read at random.

One shard `<split>-<i>-of-<K>` of a prepared directory is four files:
  `<name>.tokens`      every pair's chosen then rejected token ids back to back, little-endian int32
  `<name>.index.npy`   one `INDEX_DTYPE` row per pair: `offset` (in tokens, of the chosen sequence;
                       the rejected one follows it), `lengths` [2], `response_start` [2], `margin`,
                       `shared_prompt` (`PairArrays.shared_prompt`: packing lays it out once)
  `<name>.lengths.npy` int32 max(chosen, rejected) length per pair (for bucketing without the index)
  `<name>.stats.json`  counts and hashes; written last, so its presence marks a complete shard.

Why this and not ArrayRecord or TFRecord: a pair is a slice of one file at an offset the index gives,
so reading a batch is one seek + read per pair (no parsing, no TensorFlow, no dependency beyond
numpy), a process touches only the bytes of the pairs it trains on, and opening a shard costs the
same whatever its size. The index (32 bytes a pair) is memory-mapped; token files are read, not
mapped (see `gather`). Local and remote (`gs://...`, through `etils.epath`) files read the same way.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from etils import epath

from codepmp_jax.data.encode import PairArrays

INDEX_DTYPE = np.dtype([("offset", "<i8"), ("lengths", "<i4", (2,)),
                        ("response_start", "<i4", (2,)), ("margin", "<f4"), ("shared_prompt", "<i4")])
# Manifest version 2 wrote no `shared_prompt`; its shards are still read, as sharing nothing.
V2_INDEX_DTYPE = np.dtype([(name, INDEX_DTYPE.fields[name][0]) for name in INDEX_DTYPE.names
                           if name != "shared_prompt"])
TOKENS, INDEX, LENGTHS, STATS = ".tokens", ".index.npy", ".lengths.npy", ".stats.json"
SUFFIXES = (TOKENS, INDEX, LENGTHS, STATS)


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}"


def is_local(path: epath.Path | str) -> bool:
  return "://" not in str(path)


def index_rows(arrays: PairArrays, first_offset: int = 0) -> np.ndarray:
  """The index rows of `arrays`' pairs, stored back to back from token `first_offset` on."""
  rows = np.zeros(len(arrays), INDEX_DTYPE)
  rows["offset"] = first_offset + arrays.offsets[:, 0]
  rows["lengths"] = arrays.lengths
  rows["response_start"] = arrays.response_start
  rows["margin"] = arrays.margin
  rows["shared_prompt"] = arrays.shared_prompt()
  return rows


class Shard:
  """Random access to the pairs of one shard; files are opened on first use (see `opened`)."""

  opened: list[str] = []  # every token file any Shard opened in this process (for tests)

  def __init__(self, base: epath.Path, pairs: int, index_dtype: np.dtype = INDEX_DTYPE):
    self.base, self.pairs, self.index_dtype = base, pairs, index_dtype
    self._index = self._tokens = None

  def _open(self) -> None:
    if self._index is not None:
      return
    index_path = epath.Path(f"{self.base}{INDEX}")
    tokens_path = epath.Path(f"{self.base}{TOKENS}")
    if is_local(self.base):
      index = np.load(index_path, mmap_mode="r")
    else:
      with index_path.open("rb") as f:
        index = np.load(f)
    size = tokens_path.stat().length // 4
    if index.dtype != self.index_dtype or len(index) != self.pairs:
      raise ValueError(f"{index_path}: {len(index)} rows of {index.dtype}, the manifest says "
                       f"{self.pairs} of {self.index_dtype}; prepare the data again")
    end = int(index["offset"][-1] + index["lengths"][-1].sum()) if len(index) else 0
    if end != size:
      raise ValueError(f"{tokens_path}: {size} tokens, its index needs {end}; prepare the data again")
    Shard.opened.append(str(tokens_path))
    self._index, self._tokens = index, tokens_path.open("rb")

  def index(self) -> np.ndarray:
    """The index rows (`index_dtype`) alone: the token file stays closed (memory-mapped where
    local)."""
    if self._index is not None:
      return self._index
    index_path = epath.Path(f"{self.base}{INDEX}")
    if is_local(self.base):
      return np.load(index_path, mmap_mode="r")
    with index_path.open("rb") as f:
      return np.load(f)

  def take(self, local: np.ndarray) -> PairArrays:
    """Pairs `local` (indices into this shard) as flat arrays."""
    self._open()
    return gather(self._index, self._tokens, local)


def gather(index: np.ndarray, tokens: BinaryIO, local: np.ndarray) -> PairArrays:
  """Pairs `local` of a shard from its `index` rows and its open `.tokens` file.

  One seek + read per pair, not a memory map: the kernel maps ~64 KB around every page a mapped
  read touches (fault-around), and those pages count in the reader's RSS, so a map would grow
  the resident memory of a training process towards the size of its shards over an epoch.
  """
  rows = index[np.asarray(local, np.int64)]
  parts = []
  for offset, total in zip(rows["offset"].tolist(), rows["lengths"].sum(axis=1).tolist()):
    tokens.seek(4 * offset)
    parts.append(np.frombuffer(tokens.read(4 * total), "<i4"))
  flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
  return PairArrays.from_lengths(flat, rows["lengths"], rows["response_start"], rows["margin"])


def read_lengths(bases: Sequence[epath.Path]) -> list[np.ndarray]:
  """The `.lengths.npy` of each shard (memory-mapped where local)."""
  out = []
  for base in bases:
    path = epath.Path(f"{base}{LENGTHS}")
    if is_local(base):
      out.append(np.load(path, mmap_mode="r"))
    else:
      with path.open("rb") as f:
        out.append(np.load(f))
  return out
