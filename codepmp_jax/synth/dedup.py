"""Exact (content hash) and near-duplicate (MinHash LSH over word shingles) deduplication.

Signatures are computed in worker processes (`signature`); the order-dependent decision of which
copy to keep (`Deduplicator.check`, the first one seen) runs in one process, so it is repeatable.
"""
from __future__ import annotations

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
