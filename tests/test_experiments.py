"""The experiments under launch/experiments/ called as functions: the demo end to end at a tiny
size, and the shared report helpers."""
from __future__ import annotations

import functools
import http.server
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from absl import flags

from codepmp_jax.data import registry
from tests import local_http
from launch.experiments import demo, report, sample_efficiency, settings_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
        "num_kv_heads": 1, "seq_len": 64, "batch": 8, "vocab_size": 300, "score_batch": 16,
        "score_length": 64, "rm_min_steps": 2}


def _code_pairs(path, n=64):
  """Small code pairs: a function and a version with a wrong operator."""
  with open(path, "w") as f:
    for i in range(n):
      good, bad = [("+", "-"), ("*", "+"), ("<", ">")][i % 3]
      body = f"def f{i}(a, b):\n  return a {good} b + {i}\n"
      f.write(json.dumps({"prompt": f"Write f{i}: combine a and b with {good}.\n",
                          "chosen": body, "rejected": body.replace(f" {good} ", f" {bad} ")}) + "\n")
  return path


@pytest.mark.slow
def test_demo_runs_end_to_end_at_a_tiny_size_and_reuses_its_stages(tmp_path, shared_data, capsys):
  """Every stage of `make demo` at a tiny size, on small code pairs instead of the stdlib synthesis
  (tested on its own), so the test stays short."""
  settings = demo.DemoSettings(
      out=str(tmp_path / "demo"), data_dir=str(shared_data),
      code_pairs_file=str(_code_pairs(tmp_path / "code.jsonl")), base_steps=2, pmp_steps=2,
      rm_questions=16, eval_questions=6, size_overrides=TINY)
  reports = demo.run(settings)
  printed = capsys.readouterr().out
  # TINY scores at 64 tokens: most sequences are cut, and each evaluation says so.
  assert printed.count("WARNING: ") == 2 and "truncated share" in printed
  assert "GSM8K RM pairs: 16 pairs at seq_len 64" in printed
  assert "CHAMP Best-of-4 without a reward model" in printed and "source:GPT-4" in printed
  assert list(reports) == ["base LM -> RM", "base + PMP -> RM"]
  out = tmp_path / "demo"
  for column, arm in zip(reports, ("base", "pmp")):
    r = reports[column]
    assert r["train"]["step"] == 2 and r["train"]["finished"]  # 16 questions / batch 8, one epoch
    for task in ("pairwise", "mc"):
      low, high = r[task]["ci95"]
      assert r[task]["n"] == 6 and low <= r[task]["accuracy"] <= high
      assert r[task]["truncation"]["share"] > 0.5 and "accuracy_tie_aware" in r[task]
    assert set(r["bon"]["bon"]) == {"1", "2", "4"} and r["score_length"] == 64
    config = json.loads((out / f"rm_{arm}" / "config.json").read_text())
    assert config["init_from"] == str(out / arm)  # both arms start from a pretrained checkpoint
    assert (config["loss"]["rm_coef"], config["loss"]["lm_coef"]) == (1.0, 0.0)
  base = json.loads((out / "base" / "config.json").read_text())
  pmp = json.loads((out / "pmp" / "config.json").read_text())
  assert (base["init_from"], base["loss"]["rm_coef"]) == ("", 0.0)  # the base LM: LM loss only
  assert (pmp["init_from"], pmp["loss"]["rm_coef"]) == (str(out / "base"), 1.0)
  table = (out / "results.md").read_text().splitlines()
  assert table[0] == ("| metric (points) | base LM -> RM | base + PMP -> RM "
                      "| base + PMP - base LM (paired) |") and len(table[:6]) == 6
  assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
  results = json.loads((out / "results.json").read_text())
  assert results["arms"] == json.loads(json.dumps(reports))
  assert results["data"]["gsm8k/test"] == str(shared_data / "gsm8k" / "test.jsonl")
  capsys.readouterr()
  assert demo.run(settings) == json.loads(json.dumps(reports))  # every stage reused
  assert "| CHAMP Best-of-4 accuracy (real candidates) |" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_synthesizes_stdlib_pairs_decontaminated_against_the_test_sets(tmp_path, shared_data):
  """The demo's stage 1 (the path `make demo` takes): offline `mutate` pairs from the standard
  library, checked against the resolved GSM8K and LogiQA 2.0 test files, in one reusable file."""
  data = demo.resolve_data(str(shared_data))
  pairs_file = demo.synthesize_code_pairs(24, data, tmp_path)
  records = [json.loads(line) for line in pairs_file.read_text().splitlines()]
  assert len(records) == 24
  for record in records:
    assert record["chosen"] != record["rejected"] and record["prompt"]
    compile(record["chosen"], "chosen", "exec")  # the chosen side is the library's own code
  for name in ("gsm8k/test", "logiqa2/test"):
    link = tmp_path / "decontamination_sets" / registry.DATASETS[name].file
    assert os.path.realpath(link) == os.path.realpath(data[name])  # (epath's resolve keeps symlinks)
  manifest = json.loads((tmp_path / "code_pairs" / "manifest.json").read_text())
  indexed = manifest["decontamination"]["indexed_ngrams"]  # both test sets were read
  assert indexed["gsm8k"] > 10_000 and indexed["logiqa2"] > 10_000, indexed
  before = pairs_file.stat().st_mtime_ns
  assert demo.synthesize_code_pairs(24, data, tmp_path) == pairs_file  # reused, not redone
  assert pairs_file.stat().st_mtime_ns == before


def _free_port() -> int:
  with socket.socket() as s:  # a port nobody listens on once closed
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_demo_without_data_or_network_prints_one_error_line_before_any_stage(tmp_path):
  """A fresh clone offline: no ../shared/data, an empty cache, the downloads refused."""
  empty = tmp_path / "empty"
  empty.mkdir()
  patch = ("import pathlib, runpy, sys; from codepmp_jax.data import registry; "
           "registry.SHARED_DATA = pathlib.Path(sys.argv.pop(1)); "
           "runpy.run_module('launch.experiments.demo', run_name='__main__')")
  env = {k: v for k, v in os.environ.items() if k != registry.DATA_ENV}
  env.update({registry.CACHE_ENV: str(empty / "cache"),
              registry.MIRROR_ENV: f"http://127.0.0.1:{_free_port()}"})
  start = time.time()
  done = subprocess.run([sys.executable, "-c", patch, str(empty), f"--out={tmp_path / 'out'}"],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert done.returncode == 2, done.stderr
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert errors == [done.stderr.strip().splitlines()[-1]] and len(errors) == 1, done.stderr
  assert errors[0].startswith("error: data set gsm8k/train not found (looked in ")
  assert "Traceback" not in done.stderr and "--data_dir=DIR" in errors[0]
  assert not (tmp_path / "out").exists()  # stopped before any stage wrote anything
  assert time.time() - start < 60


@pytest.fixture
def data_server(shared_data):
  """The real data files served over HTTP in the layout of ../shared/data (a local mirror)."""
  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

  with local_http.serve(functools.partial(Quiet, directory=str(shared_data))) as url:
    yield url


def test_demo_data_resolution_downloads_and_verifies_every_data_set(tmp_path, monkeypatch,
                                                                    data_server, shared_data):
  monkeypatch.setattr(registry, "SHARED_DATA", tmp_path / "no_shared")
  monkeypatch.delenv(registry.DATA_ENV, raising=False)
  monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv(registry.MIRROR_ENV, data_server)
  got = demo.resolve_data()
  assert list(got) == list(demo.DATASETS)
  for name, file in got.items():
    entry = registry.DATASETS[name]
    assert file == tmp_path / "cache" / entry.file
    assert (pathlib.Path(file).stat().st_size, registry.sha256_of(file)) == (entry.size, entry.sha256)
  monkeypatch.setenv(registry.MIRROR_ENV, f"http://127.0.0.1:{_free_port()}")
  assert demo.resolve_data() == got  # verified copies in the cache: no network needed again
  assert demo.resolve_data(str(shared_data)) == {n: shared_data / registry.DATASETS[n].file
                                                 for n in demo.DATASETS}  # --data_dir first


def test_report_tables_and_figure(tmp_path):
  assert report.to_markdown(["a", "b"], [[1, 0.123456], ["x", None]]) == (
      "| a | b |\n|---|---|\n| 1 | 0.1235 |\n| x |  |\n")
  assert report.to_markdown(["m", "v"], [["acc", 0.5]], cell=report.fixed3,
                            align=["---", "---:"]).splitlines()[1:] == ["|---|---:|", "| acc | 0.500 |"]
  assert report.to_csv(["a", "b"], [[1, None]]) == "a,b\n1,\n"
  assert report.format_cell(float("nan")) == "nan"
  assert report.lookup({"bon": {"4": {"rm": 0.25}}}, ("bon", "4", "rm")) == 0.25
  fig, ax = report.pyplot().subplots()
  ax.plot([1, 2], [3, 4])
  path = report.save_figure(fig, tmp_path / "sub" / "x.png")
  assert path.read_bytes()[:4] == b"\x89PNG"


def test_the_command_line_of_an_experiment_is_its_settings():
  values = flags.FlagValues()
  cls = sample_efficiency.SampleEfficiencySettings
  settings_flags.define_flags(cls, values)
  values(["x", "--ks=4,8", "--lr=0.5", "--preset=smollm2_135m"])
  assert settings_flags.from_flags(cls, values) == cls(ks=(4, 8), lr=0.5, preset="smollm2_135m")
  values = flags.FlagValues()
  settings_flags.define_flags(demo.DemoSettings, values)
  values(["x", "--pmp_steps=3", "--data_dir=/d"])
  assert settings_flags.from_flags(demo.DemoSettings, values) == demo.DemoSettings(pmp_steps=3, data_dir="/d")
  with pytest.raises(ValueError, match="needs base and pmp"):
    sample_efficiency.run(cls(preset="smollm2_135m", out="unused"))


def _arm(strict, tie_aware, options, bon):
  """An arm's report: pairwise on items a-d, multiple choice on m, n, Best-of-4 on x, y."""
  mean = lambda v: sum(v) / len(v)  # noqa: E731
  return {"pairwise": {"accuracy": mean(strict), "ci95": [0.1, 0.9],
                       "accuracy_tie_aware": mean(tie_aware), "ci95_tie_aware": [0.2, 0.8],
                       "per_item": {"id": list("abcd"), "strict": strict, "tie_aware": tie_aware}},
          "mc": {"accuracy": 0.0, "ci95": [0.0, 0.0], "accuracy_tie_aware": mean(options),
                 "ci95_tie_aware": [0.0, 1.0],
                 "per_item": {"id": ["m", "n"], "strict": [0, 0], "tie_aware": options}},
          "bon": {"bon": {"4": {"rm": mean(bon), "rm_ci95": [0.0, 1.0]}},
                  "per_item": {"id": ["x", "y"], "rm@4": bon}}}


def test_demo_table_and_plot_of_two_arms(tmp_path):
  base = _arm([1, 0, 0, 0], [1, 0.5, 0, 0], [0.25, 0.5], [0.0, 1.0])
  pmp = _arm([1, 1, 0, 1], [1, 1, 0, 1], [0.25, 0.5], [1.0, 1.0])
  table = demo.results_table({"base LM -> RM": base, "base + PMP -> RM": pmp})
  # The paired column is pmp - base over the same items: 0.5 strict, 0.375 tie-aware, 0 for the
  # multiple choice (every item equal, so every resample is 0), 0.5 for Best-of-4.
  assert table.splitlines()[:3] == [
      "| metric (points) | base LM -> RM | base + PMP -> RM | base + PMP - base LM (paired) |",
      "|---|---:|---:|---:|",
      "| GSM8K pairwise accuracy, strict (held-out test) | 25.0 [10.0, 90.0] | 75.0 [10.0, 90.0] "
      "| +50.0 [0.0, 100.0] |"]
  rows = [line.split(" | ") for line in table.splitlines()[3:]]
  assert [row[-1] for row in rows] == ["+37.5 [0.0, 75.0] |", "+0.0 [0.0, 0.0] |",
                                       "+50.0 [0.0, 100.0] |"]
  assert rows[1][1:3] == ["37.5 [0.0, 100.0]", "37.5 [0.0, 100.0]"]  # LogiQA, tie-aware
  path = demo.plot_results({"a": base, "b": pmp}, tmp_path / "r.png")
  assert path.read_bytes()[:4] == b"\x89PNG"


def test_stages_reuse_finished_work_and_build_best_of_n_candidates(tmp_path, shared_data):
  from etils import epath

  from launch.experiments import stages

  workdir = epath.Path(tmp_path / "run")
  workdir.mkdir()
  (workdir / "summary.json").write_text(json.dumps({"step": 3, "finished": True, "loss": 0.5}))
  assert stages.train_once(None, workdir) == {"step": 3, "finished": True, "loss": 0.5}
  source = epath.Path(shared_data) / "gsm8k" / "test.jsonl"
  subset = stages.first_lines(source, epath.Path(tmp_path / "first.jsonl"), 5)
  rows = [json.loads(line) for line in subset.read_text().splitlines()]
  assert rows == [json.loads(line) for line in source.read_text().splitlines()[:5]]
  path = stages.bon_candidates(source, epath.Path(tmp_path / "bon.jsonl"), limit=20, n=4)
  questions = [json.loads(line) for line in path.read_text().splitlines()]
  assert 0 < len(questions) <= 20
  for q in questions:  # the reference solution once among four distinct candidates
    assert len(q["candidates"]) == 4 and len(set(q["candidates"])) == 4
    answer = q["reference"].split("####")[-1].strip()
    assert sum(c.endswith(f"The answer is {answer}") for c in q["candidates"]) == 1
