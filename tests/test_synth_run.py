"""The synth CLI with the mutate strategy: output, resume after a crash, --max_pairs, worker
splits with merge, the check step, and determinism across worker counts."""
from __future__ import annotations

import ast
import gzip
import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

from codepmp_jax.synth import __main__ as synth_main
from codepmp_jax.synth import merge

MODULES = ("heapq", "bisect", "textwrap", "colorsys", "fnmatch", "shlex", "calendar", "statistics")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("corpus") / "lib"
  root.mkdir()
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  for m in MODULES:
    shutil.copy(stdlib / f"{m}.py", root / f"{m}.py")
  shutil.copy(stdlib / "heapq.py", root / "heapq_copy.py")  # an exact duplicate
  return root


def _run(corpus: pathlib.Path, out: pathlib.Path, *extra: str) -> int:
  return synth_main.main([f"--source={corpus}", f"--out={out}", "--workers=1", "--docs_per_shard=2",
                          "--decontam_sets=", "--mutants_per_function=2", *extra])


def _records(out: pathlib.Path) -> list[dict]:
  return [json.loads(line) for p in sorted(out.glob("**/pairs-*.jsonl.gz")) for line in gzip.open(p, "rt")]


def _manifest(out: pathlib.Path) -> dict:
  return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def full(corpus, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("full")
  assert _run(corpus, out) == 0
  return out


def test_full_run(full):
  records, manifest = _records(full), _manifest(full)
  assert manifest["complete"] and manifest["counts"]["pairs_written"] == len(records) > 150
  assert manifest["counts"]["corpus"] == {"documents": 9, "exact_duplicate": 1, "kept": 8}
  assert len(manifest["shards"]) == manifest["planned_shards"] == 4
  assert {s["file"] for s in manifest["shards"]} == {f"pairs-{k:05d}-of-00004.jsonl.gz" for k in range(4)}
  assert len({r["id"] for r in records}) == len(records)
  for r in records:
    assert ast.dump(ast.parse(r["chosen"])) != ast.dump(ast.parse(r["rejected"]))
  lengths = manifest["lengths"]
  assert lengths["pairs"] == len(records)
  assert lengths["chosen_mean_chars"] == pytest.approx(sum(len(r["chosen"]) for r in records) / len(records))
  assert lengths["mean_abs_diff_fraction_of_chosen"] < 0.05
  assert merge.check_run(full)["counts"]["pairs_written"] == len(records)


def test_help_documents_flags():
  out = subprocess.run([sys.executable, "-m", "codepmp_jax.synth", "--help"], capture_output=True,
                       text=True, cwd=pathlib.Path(__file__).resolve().parents[1], check=True).stdout
  for flag in ("--source", "--strategy", "--max_pairs", "--shard_index", "--num_shards", "--merge",
               "--check", "--base_url", "--api_key_env", "--near_dup_threshold", "--decontam_sets"):
    assert flag in out


def test_resume_after_crash_equals_uninterrupted(corpus, full, tmp_path):
  out = tmp_path / "crashed"
  shutil.copytree(full, out)
  for name in ("pairs-00001-of-00004.jsonl.gz", "pairs-00003-of-00004.stats.json",
               "pairs-00003-of-00004.jsonl.gz"):
    (out / name).unlink()
  (out / ".pairs-00001-of-00004.jsonl.gz.tmp-123").write_bytes(b"half a shard")
  manifest = _manifest(out)
  (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
  assert _run(corpus, out) == 0
  assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in full.iterdir())
  assert _records(out) == _records(full)
  assert _manifest(out)["shards"] == _manifest(full)["shards"]
  assert _manifest(out)["counts"] == _manifest(full)["counts"]


def test_max_pairs_is_a_stable_prefix(corpus, full, tmp_path):
  records = _records(full)
  first = _manifest(full)["shards"][0]["records"]
  n = first + 7  # cuts inside the second shard
  out = tmp_path / "cut"
  assert _run(corpus, out, f"--max_pairs={n}") == 0
  assert _records(out) == records[:n]
  assert _manifest(out)["counts"]["strategy"]["pairs_cut_by_max_pairs"] > 0
  assert _run(corpus, out, f"--max_pairs={n}") == 0
  assert _records(out) == records[:n]
  assert _run(corpus, out, f"--max_pairs={n + 40}") == 0
  assert _records(out) == records[:n + 40]
  assert _run(corpus, out, "--max_pairs=5") == 0
  assert _records(out) == records[:5] and len(list(out.glob("pairs-*"))) == 2
  merge.check_run(out)


def test_worker_split_and_merge(corpus, full, tmp_path):
  out = tmp_path / "split"
  for i in range(2):
    assert _run(corpus, out, "--num_shards=2", f"--shard_index={i}") == 0
  merged = merge.merge(out)
  ids = {r["id"] for r in _records(out)}
  assert len(ids) == len(_records(out))
  # Each worker deduplicates only its own part, so the exact duplicate may survive in the union.
  full_ids = {r["id"] for r in _records(full)}
  assert full_ids <= ids
  assert merged["counts"]["pairs_written"] == len(ids)
  assert merged["counts"]["corpus"]["documents"] == 9
  assert merge.check_run(out)["merged_parts"] == 2
  assert synth_main.main([f"--out={out}", "--merge"]) == 0
  shutil.rmtree(out / "part-00001-of-00002")
  with pytest.raises(merge.CheckError, match=r"parts \[0\] present, expected 0..1"):
    merge.merge(out)


def test_check_finds_tampering_and_settings_change(corpus, full, tmp_path):
  out = tmp_path / "tampered"
  shutil.copytree(full, out)
  shard = out / "pairs-00002-of-00004.jsonl.gz"
  lines = gzip.open(shard, "rt").read().splitlines()
  shard.write_bytes(gzip.compress(("\n".join(lines[:-1]) + "\n").encode()))
  with pytest.raises(merge.CheckError, match="pairs-00002-of-00004.jsonl.gz: sha256 differs"):
    merge.check_run(out)
  assert synth_main.main([f"--out={out}", "--check"]) == 1
  assert _run(corpus, out, "--mutants_per_function=3") == 1  # a different run in the same --out


def test_two_workers_write_the_same_bytes(corpus, full, tmp_path):
  out = tmp_path / "pool"
  assert synth_main.main([f"--source={corpus}", f"--out={out}", "--workers=2", "--docs_per_shard=2",
                          "--decontam_sets=", "--mutants_per_function=2"]) == 0
  assert _manifest(out)["shards"] == _manifest(full)["shards"]
