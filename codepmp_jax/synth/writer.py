"""Sharded, resumable output: `pairs-XXXXX-of-YYYYY.jsonl.gz` files plus `manifest.json`.

A shard and its stats sidecar are written under temporary names and renamed when complete (the
sidecar first), so after a crash or kill every visible shard is whole; a rerun keeps them and
redoes the rest. Gzip headers carry no time or name, so the same records give the same bytes.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from typing import Any

from etils import epath

MANIFEST = "manifest.json"
FORMAT = "codepmp_jax.synth/1"


def settings_hash(settings: dict[str, Any]) -> str:
  """A fingerprint of everything that decides the output's content."""
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write(path: epath.Path, data: bytes) -> None:
  """Write-then-rename locally; object stores (`gs://`) make a single write atomic themselves."""
  if "://" in str(path):
    path.write_bytes(data)
    return
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def gzip_jsonl(records: list[dict]) -> bytes:
  """Records as deterministic gzipped JSON lines."""
  buf = io.BytesIO()
  with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as f:
    for r in records:
      f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
  return buf.getvalue()


class ShardWriter:
  """The shards of one worker's output directory, and its manifest."""

  def __init__(self, out_dir: str | epath.PathLike, settings: dict[str, Any], num_planned: int):
    self.dir = epath.Path(out_dir)
    self.settings = settings
    self.num_planned = num_planned
    self.dir.mkdir(parents=True, exist_ok=True)
    for stale in self.dir.glob(".*.tmp-*"):
      stale.unlink()
    previous = self.dir / MANIFEST
    if previous.exists():
      old = json.loads(previous.read_text())
      if old.get("settings_hash") != settings_hash(settings):
        raise ValueError(f"{previous}: this directory holds a run with different settings "
                         f"(settings_hash {old.get('settings_hash')} != {settings_hash(settings)}); "
                         "use another --out or delete it")

  def check_sources(self, sources: list[dict]) -> None:
    """Refuse to resume when the corpus changed since the shards here were written."""
    previous = self.dir / MANIFEST
    old = json.loads(previous.read_text()).get("sources") if previous.exists() else None
    if old is not None and old != sources:
      raise ValueError(f"{previous}: the corpus changed since this run started ({old} != {sources}); "
                       "use another --out or delete it")

  def name(self, k: int) -> str:
    return f"pairs-{k:05d}-of-{self.num_planned:05d}.jsonl.gz"

  def _stats_path(self, k: int) -> epath.Path:
    return self.dir / f"pairs-{k:05d}-of-{self.num_planned:05d}.stats.json"

  def finished(self, k: int) -> dict | None:
    """The stats of shard `k` if it was completely written, else None."""
    if (self.dir / self.name(k)).exists() and self._stats_path(k).exists():
      return json.loads(self._stats_path(k).read_text())
    return None

  def write(self, k: int, records: list[dict], available: int, counts: dict[str, int]) -> dict:
    """Write shard `k` (`available` = records before a --max_pairs cut) and return its stats."""
    data = gzip_jsonl(records)
    stats = {"file": self.name(k), "records": len(records), "available": available,
             "sha256": hashlib.sha256(data).hexdigest(), "counts": dict(sorted(counts.items())),
             "lengths": length_sums(records)}
    _atomic_write(self._stats_path(k), json.dumps(stats, indent=1).encode())
    _atomic_write(self.dir / self.name(k), data)
    return stats

  def read(self, k: int) -> list[dict]:
    """The records of written shard `k`."""
    with (self.dir / self.name(k)).open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
      return [json.loads(line) for line in f]

  def remove(self, k: int) -> None:
    """Delete shard `k` (a leftover beyond a smaller --max_pairs)."""
    for p in (self.dir / self.name(k), self._stats_path(k)):
      p.unlink(missing_ok=True)

  def write_manifest(self, manifest: dict[str, Any]) -> epath.Path:
    """Write `manifest.json` with the format tag and settings fingerprint added."""
    full = {"format": FORMAT, "settings_hash": settings_hash(self.settings),
            "settings": self.settings, **manifest}
    path = self.dir / MANIFEST
    _atomic_write(path, json.dumps(full, indent=1).encode())
    return path


def length_sums(records: list[dict]) -> dict[str, int]:
  """Character-length sums of chosen and rejected, to detect length as a preference cue."""
  c = [len(r["chosen"]) for r in records]
  r = [len(x["rejected"]) for x in records]
  return {"n": len(records), "chosen_chars": sum(c), "rejected_chars": sum(r),
          "abs_diff_chars": sum(abs(a - b) for a, b in zip(c, r)),
          "rejected_shorter": sum(b < a for a, b in zip(c, r)),
          "rejected_longer": sum(b > a for a, b in zip(c, r))}


def length_summary(sums: dict[str, int]) -> dict[str, float]:
  """Means and fractions from summed `length_sums`."""
  n = max(sums.get("n", 0), 1)
  return {"pairs": sums.get("n", 0), "chosen_mean_chars": sums.get("chosen_chars", 0) / n,
          "rejected_mean_chars": sums.get("rejected_chars", 0) / n,
          "mean_abs_diff_chars": sums.get("abs_diff_chars", 0) / n,
          "mean_abs_diff_fraction_of_chosen": sums.get("abs_diff_chars", 0) / max(sums.get("chosen_chars", 0), 1),
          "fraction_rejected_shorter": sums.get("rejected_shorter", 0) / n,
          "fraction_rejected_longer": sums.get("rejected_longer", 0) / n}
