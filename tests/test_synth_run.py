"""Synthesis with the mutate strategy: output, resume after a crash, max_pairs, worker splits with
dedup across workers and merge, the check step, determinism across worker counts, and the CLI."""
from __future__ import annotations

import ast
import gzip
import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from codepmp_jax import cli
from codepmp_jax.synth import __main__ as synth_main
from codepmp_jax.synth import corpus as corpus_lib
from codepmp_jax.synth import dedup
from codepmp_jax.synth import merge
from codepmp_jax.synth.synthesize import SynthSettings, dedup_workers, synthesize, write_signatures

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


def _settings(corpus: pathlib.Path, out: pathlib.Path, **overrides) -> SynthSettings:
  return SynthSettings(**{"source": (str(corpus),), "out": str(out), "workers": 1, "docs_per_shard": 2,
                          "decontam_sets": (), "mutants_per_function": 2, **overrides})


def _run(corpus: pathlib.Path, out: pathlib.Path, **overrides) -> dict:
  return synthesize(_settings(corpus, out, **overrides))


def synth_cli(argv: list[str]) -> None:
  """`python -m codepmp_jax.synth ARGV` in this process."""
  cli.call(synth_main.main, synth_main.define_flags, argv)


def _records(out: pathlib.Path) -> list[dict]:
  return [json.loads(line) for p in sorted(out.glob("**/pairs-*.jsonl.gz")) for line in gzip.open(p, "rt")]


def _manifest(out: pathlib.Path) -> dict:
  return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def full(corpus, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("full")
  _run(corpus, out)
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
  proc = subprocess.run([sys.executable, "-m", "codepmp_jax.synth", "--help"], capture_output=True,
                        text=True, cwd=pathlib.Path(__file__).resolve().parents[1], timeout=120)
  assert proc.returncode == 1, proc.stderr  # absl's --help exit status
  for flag in ("--source", "--strategy", "--max_pairs", "--shard_index", "--num_shards", "--[no]merge", "--stage",
               "--[no]check", "--base_url", "--api_key_env", "--near_dup_threshold", "--decontam_sets",
               "--classify_model", "--[no]cross_worker_dedup", "--[no]execution_check"):
    assert flag in proc.stdout
  assert "--strategy=llm \\\n      --base_url=http://localhost:8000" in proc.stdout  # the examples as written


def test_cli_errors_are_one_line(tmp_path, capsys):
  for argv, message in (([], "error: flag --out=None: Flag --out must have a value other than None.\n"),
                        ([f"--out={tmp_path}", "--strategy=nope"], "error: flag --strategy=nope: value should be"),
                        ([f"--out={tmp_path}", "--classify_ratios=engineering"], "error: --classify_ratios must be")):
    with pytest.raises(SystemExit) as exit_:
      synth_cli(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(message)


def test_resume_after_crash_equals_uninterrupted(corpus, full, tmp_path):
  out = tmp_path / "crashed"
  shutil.copytree(full, out)
  for name in ("pairs-00001-of-00004.jsonl.gz", "pairs-00003-of-00004.stats.json",
               "pairs-00003-of-00004.jsonl.gz"):
    (out / name).unlink()
  (out / ".pairs-00001-of-00004.jsonl.gz.tmp-123").write_bytes(b"half a shard")
  manifest = _manifest(out)
  (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
  _run(corpus, out)
  assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in full.iterdir())
  assert _records(out) == _records(full)
  assert _manifest(out)["shards"] == _manifest(full)["shards"]
  assert _manifest(out)["counts"] == _manifest(full)["counts"]


def test_max_pairs_is_a_stable_prefix(corpus, full, tmp_path):
  records = _records(full)
  first = _manifest(full)["shards"][0]["records"]
  n = first + 7  # cuts inside the second shard
  out = tmp_path / "cut"
  _run(corpus, out, max_pairs=n)
  assert _records(out) == records[:n]
  assert _manifest(out)["counts"]["strategy"]["pairs_cut_by_max_pairs"] > 0
  _run(corpus, out, max_pairs=n)
  assert _records(out) == records[:n]
  _run(corpus, out, max_pairs=n + 40)
  assert _records(out) == records[:n + 40]
  _run(corpus, out, max_pairs=5)
  assert _records(out) == records[:5] and len(list(out.glob("pairs-*"))) == 2
  merge.check_run(out)


def test_worker_split_and_merge(corpus, full, tmp_path):
  out = tmp_path / "split"
  for i in range(2):
    _run(corpus, out, num_shards=2, shard_index=i, cross_worker_dedup=False)
  merged = merge.merge(out)
  ids = {r["id"] for r in _records(out)}
  assert len(ids) == len(_records(out))
  # Each worker deduplicates only its own part, so the exact duplicate may survive in the union.
  full_ids = {r["id"] for r in _records(full)}
  assert full_ids <= ids
  assert merged["counts"]["pairs_written"] == len(ids)
  assert merged["counts"]["corpus"]["documents"] == 9
  assert merge.check_run(out)["merged_parts"] == 2
  synth_cli([f"--out={out}", "--merge"])
  shutil.rmtree(out / "part-00001-of-00002")
  with pytest.raises(merge.CheckError, match=r"parts \[0\] present, expected 0..1"):
    merge.merge(out)


def test_check_finds_tampering_and_settings_change(corpus, full, tmp_path, capsys):
  out = tmp_path / "tampered"
  shutil.copytree(full, out)
  shard = out / "pairs-00002-of-00004.jsonl.gz"
  lines = gzip.open(shard, "rt").read().splitlines()
  shard.write_bytes(gzip.compress(("\n".join(lines[:-1]) + "\n").encode()))
  with pytest.raises(merge.CheckError, match="pairs-00002-of-00004.jsonl.gz: sha256 differs"):
    merge.check_run(out)
  with pytest.raises(SystemExit) as exit_:
    synth_cli([f"--out={out}", "--check"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err  # one problem a line, no traceback
  assert err.startswith(f"error: {out / 'pairs-00002-of-00004.jsonl.gz'}: sha256 differs from the manifest\n")
  assert "Traceback" not in err
  with pytest.raises(ValueError, match="different settings"):  # a different run in the same out
    _run(corpus, out, mutants_per_function=3)


def test_two_workers_write_the_same_bytes(corpus, full, tmp_path):
  out = tmp_path / "pool"
  _run(corpus, out, workers=2)
  assert _manifest(out)["shards"] == _manifest(full)["shards"]


def _worker_of(source_id: str, num_shards: int) -> int:
  return next(i for i in range(num_shards) if corpus_lib.in_split(source_id, i, num_shards))


@pytest.fixture(scope="module")
def near_dup_corpus(tmp_path_factory) -> pathlib.Path:
  """Four modules and a copy of textwrap.py with one line changed, owned by another worker of 4."""
  root = tmp_path_factory.mktemp("near") / "lib"
  root.mkdir()
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  for m in ("textwrap", "colorsys", "bisect", "shlex"):
    shutil.copy(stdlib / f"{m}.py", root / f"{m}.py")
  original = _worker_of(f"{root.name}/textwrap.py", 4)
  name = next(f"textwrap_{k}.py" for k in range(100) if _worker_of(f"{root.name}/textwrap_{k}.py", 4) != original)
  text = (stdlib / "textwrap.py").read_text()
  (root / name).write_text(text.replace("class TextWrapper:", "class TextWrapper:  # a local copy", 1))
  return root


def test_dedup_across_workers_removes_a_near_duplicate_that_per_worker_dedup_keeps(near_dup_corpus, tmp_path):
  per_worker = tmp_path / "per_worker"
  for i in range(4):
    _run(near_dup_corpus, per_worker, num_shards=4, shard_index=i, cross_worker_dedup=False)
  kept_before = merge.merge(per_worker)["counts"]["corpus"]
  assert kept_before["kept"] == 5 and "near_duplicate" not in kept_before

  out = tmp_path / "across"
  with pytest.raises(ValueError, match="--stage=signatures"):
    _run(near_dup_corpus, out, num_shards=4, shard_index=0)
  for i in range(4):
    assert write_signatures(_settings(near_dup_corpus, out, num_shards=4, shard_index=i))["documents"] >= 0
  summary = dedup_workers(str(out))
  assert summary["removed"] == {"cross_worker_exact_duplicate": 0, "cross_worker_near_duplicate": 1}
  for i in range(4):
    _run(near_dup_corpus, out, num_shards=4, shard_index=i)
  merged = merge.merge(out)
  assert merged["counts"]["corpus"]["kept"] == 4
  assert merged["counts"]["corpus"]["cross_worker_near_duplicate"] == 1
  assert merged["cross_worker_dedup"]["removed"]["cross_worker_near_duplicate"] == 1
  sources = {r["meta"]["source"] for r in _records(out)}
  assert len({s for s in sources if s.split("/")[-1].startswith("textwrap")}) == 1
  assert dedup_workers(str(out)) == summary  # deterministic: a rerun gives the same keep-list


def test_cross_worker_removals_keep_the_first_of_each_component():
  sha = np.array([b"a", b"b", b"a", b"c", b"d"], "S64")
  bands = np.array([[1, 10], [2, 20], [3, 30], [4, 20], [5, 50]], np.uint64)
  # 2 repeats 0's content; 3 shares a band with 1; 4 collides with nobody.
  assert dedup.cross_worker_removals(sha, bands) == {2: "cross_worker_exact_duplicate",
                                                     3: "cross_worker_near_duplicate"}


def test_slurm_launcher_chains_the_four_stages():
  root = pathlib.Path(__file__).resolve().parents[1]
  script = root / "launch" / "synth_slurm.sbatch"
  env = {"PATH": "/usr/bin:/bin", "CODEPMP_ROOT": str(root), "PYTHON": "py"}
  lines = subprocess.run(["bash", str(script), "--submit", "3", "--dry-run", "--out=/s/p"], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
  assert lines == [
      f"sbatch --parsable --array=0-2 {script} --task signatures 3 --out=/s/p",
      f"sbatch --parsable --dependency=afterok:JOB_signatures {script} --task dedup 3 --out=/s/p",
      f"sbatch --parsable --dependency=afterok:JOB_dedup --array=0-2 {script} --task pairs 3 --out=/s/p",
      f"sbatch --parsable --dependency=afterok:JOB_pairs {script} --task merge 3 --out=/s/p"]
  task = subprocess.run(["bash", str(script), "--task", "pairs", "3", "--dry-run", "--out=/s/p"],
                        env={**env, "SLURM_ARRAY_TASK_ID": "1"}, capture_output=True, text=True, check=True, timeout=60)
  assert task.stdout.strip() == "py -m codepmp_jax.synth --out=/s/p --stage=pairs --shard_index=1 --num_shards=3"
