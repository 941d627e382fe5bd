"""Checking a finished run against its manifest, and merging the manifests of split workers.

`check_run` re-reads every shard: file hash, record count, record schema and id uniqueness.
`merge` checks all `part-XXXXX-of-YYYYY` worker directories of a `--num_shards` run (every part
present, complete, with the same settings) and writes the combined `manifest.json` above them.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import json

from etils import epath

from codepmp_jax.synth import writer as writer_lib

FIELDS = ("prompt", "chosen", "rejected", "id")


class CheckError(ValueError):
  """The output does not match its manifest; the message lists every problem found."""


def _load_manifest(d: epath.Path) -> dict:
  path = d / writer_lib.MANIFEST
  if not path.exists():
    raise CheckError(f"{path}: missing (the run never started here)")
  return json.loads(path.read_text())


def check_run(d: str | epath.PathLike, seen_ids: set[str] | None = None) -> dict:
  """The manifest of run directory `d` after verifying every shard it lists."""
  d = epath.Path(d)
  manifest = _load_manifest(d)
  problems = [] if manifest.get("complete") else [f"{d / writer_lib.MANIFEST}: run not complete; rerun it"]
  seen_ids = set() if seen_ids is None else seen_ids
  total = 0
  for shard in manifest.get("shards", []):
    path = d / shard["file"]
    if not path.exists():
      problems.append(f"{path}: listed in the manifest but missing")
      continue
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
      problems.append(f"{path}: sha256 differs from the manifest")
    lines = gzip.decompress(data).decode("utf-8").splitlines()
    if len(lines) != shard["records"]:
      problems.append(f"{path}: {len(lines)} records, manifest says {shard['records']}")
    for lineno, line in enumerate(lines, 1):
      record = json.loads(line)
      for field in FIELDS:
        if not isinstance(record.get(field), str) or not record[field]:
          problems.append(f"{path}:{lineno}: field {field!r} missing or empty")
      if record.get("id") in seen_ids:
        problems.append(f"{path}:{lineno}: duplicate id {record.get('id')}")
      seen_ids.add(record.get("id"))
    total += len(lines)
  if total != manifest.get("counts", {}).get("pairs_written"):
    problems.append(f"{d}: {total} records in shards, manifest counts.pairs_written = "
                    f"{manifest.get('counts', {}).get('pairs_written')}")
  if problems:
    raise CheckError("\n".join(problems[:50]))
  return manifest


def merge(out: str | epath.PathLike) -> dict:
  """Check every worker part under `out` and write the combined manifest; returns it (with the
  counts of the cross-worker dedup stage when it ran)."""
  out = epath.Path(out)
  parts = sorted(p for p in out.glob("part-*-of-*") if p.is_dir())
  if not parts:
    raise CheckError(f"{out}: no part-XXXXX-of-YYYYY directories to merge")
  manifests, seen = [], set()
  for part in parts:
    manifests.append(check_run(part, seen))
  num = manifests[0]["settings"]["num_shards"]
  problems = []
  indices = sorted(m["settings"]["shard_index"] for m in manifests)
  if indices != list(range(num)):
    problems.append(f"{out}: parts {indices} present, expected 0..{num - 1}")
  shared = [{k: v for k, v in m["settings"].items() if k != "shard_index"} for m in manifests]
  if any(s != shared[0] for s in shared):
    problems.append(f"{out}: parts were run with different settings")
  if problems:
    raise CheckError("\n".join(problems))
  corpus, strategy, lengths = collections.Counter(), collections.Counter(), collections.Counter()
  shards = []
  for part, m in zip(parts, manifests):
    corpus.update(m["counts"]["corpus"])
    strategy.update(m["counts"]["strategy"])
    lengths.update(m["length_sums"])
    shards += [{**s, "file": f"{part.name}/{s['file']}"} for s in m["shards"]]
  merged = {
      "format": writer_lib.FORMAT, "complete": True, "merged_parts": len(parts),
      "settings": {**shared[0], "shard_index": None}, "prompts": manifests[0]["prompts"],
      "models": manifests[0]["models"], "decontamination": manifests[0].get("decontamination"),
      "counts": {"corpus": dict(sorted(corpus.items())), "strategy": dict(sorted(strategy.items())),
                 "pairs_written": sum(s["records"] for s in shards)},
      "lengths": writer_lib.length_summary(lengths), "length_sums": dict(lengths), "shards": shards}
  dedup_summary = out / "dedup" / "summary.json"
  if dedup_summary.exists():
    merged["cross_worker_dedup"] = json.loads(dedup_summary.read_text())
  (out / writer_lib.MANIFEST).write_text(json.dumps(merged, indent=1))
  return merged
