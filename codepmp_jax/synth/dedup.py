"""Exact (content hash) and near-duplicate (MinHash LSH over word shingles) deduplication.

Signatures are computed in worker processes (`signature`); the order-dependent decision of which
copy to keep (`Deduplicator.check`, the first one seen) runs in one process, so it is repeatable.
Across the workers of a `--num_shards` run: `band_hashes` per worker, then `cross_worker_removals`.
"""
from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

_TOKENS = re.compile(r"\w+|[^\w\s]")
SCHEME = "affine32"


def signature(text: str, num_perm: int = 128, shingle: int = 5) -> np.ndarray:
  """MinHash values of the set of `shingle`-token windows of `text` (code-aware tokens)."""
  tokens = _TOKENS.findall(text)
  grams = {" ".join(tokens[i:i + shingle]).encode("utf-8", "surrogatepass")
           for i in range(max(1, len(tokens) - shingle + 1))}
  m = MinHash(num_perm=num_perm, seed=1, scheme=SCHEME, hashfunc=zlib.crc32)
  m.update_batch(sorted(grams))
  return m.hashvalues


class Deduplicator:
  """Keeps the first document of each exact or near-identical (Jaccard >= threshold) group."""

  def __init__(self, threshold: float = 0.85, num_perm: int = 128):
    self.num_perm = num_perm
    self._hashes: set[str] = set()
    self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if threshold < 1.0 else None

  def check(self, key: str, content_sha256: str, hashvalues: np.ndarray | None) -> str | None:
    """'exact_duplicate', 'near_duplicate', or None (then `key` is remembered as kept)."""
    if content_sha256 in self._hashes:
      return "exact_duplicate"
    if self._lsh is not None:
      m = MinHash(num_perm=self.num_perm, seed=1, hashvalues=hashvalues, scheme=SCHEME)
      if self._lsh.query(m):
        return "near_duplicate"
      self._lsh.insert(key, m)
    self._hashes.add(content_sha256)
    return None


# Across workers: each worker writes the band hashes of the documents it kept (`band_hashes`);
# one process then buckets every worker's documents by exact content hash and by each LSH band,
# joins colliding documents into components (union-find) and keeps the first document of each
# component (lowest worker index, then that worker's document order). Each worker then drops the
# documents of its own keep-list's complement before it synthesizes pairs. This is the multi-stage
# MinHash of large code corpora (e.g. datatrove's minhash stages), with datasketch's band layout,
# so a pair that datasketch's `MinHashLSH` would call a candidate inside one worker is one here too.


def lsh_layout(threshold: float, num_perm: int = 128) -> tuple[int, int]:
  """(bands, rows per band) that datasketch picks for `threshold`."""
  lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
  return lsh.b, lsh.r


def band_hashes(hashvalues: np.ndarray, bands: int, rows: int) -> np.ndarray:
  """64-bit hashes of each band of one MinHash signature (uint64 [bands])."""
  values = np.asarray(hashvalues, np.uint64)
  return np.array([int.from_bytes(hashlib.blake2b(values[i * rows:(i + 1) * rows].tobytes(),
                                                  digest_size=8).digest(), "little")
                   for i in range(bands)], np.uint64)


def _equal_groups(keys: np.ndarray) -> list[np.ndarray]:
  """Index groups (of 2 or more) whose keys are equal."""
  order = np.argsort(keys, kind="stable")
  ordered = keys[order]
  cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
  return [g for g in np.split(order, cuts) if len(g) > 1]


def cross_worker_removals(sha256: np.ndarray, bands: np.ndarray) -> dict[int, str]:
  """Documents (by global index, workers concatenated in order) to drop, with the reason:
  'cross_worker_exact_duplicate' (same content as the kept one) or 'cross_worker_near_duplicate'."""
  parent = list(range(len(sha256)))

  def find(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for keys in [sha256] + [bands[:, j] for j in range(bands.shape[1])]:
    for group in _equal_groups(keys):
      roots = sorted({find(int(i)) for i in group})
      for root in roots[1:]:
        parent[root] = roots[0]  # the lowest index is every component's root: the kept document
  removed = {}
  for i in range(len(parent)):
    root = find(i)
    if root != i:
      removed[i] = ("cross_worker_exact_duplicate" if sha256[i] == sha256[root]
                    else "cross_worker_near_duplicate")
  return removed
