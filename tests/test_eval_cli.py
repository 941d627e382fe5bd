"""`python -m codepmp_jax.eval bon` from a scores file: report, table, plot and entry point."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from codepmp_jax import cli
from codepmp_jax.eval import __main__ as eval_main
from codepmp_jax.eval import bon

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bon_from_scores_writes_report_table_and_plot(tmp_path, capsys):
  candidates, scores = tmp_path / "cand.jsonl", tmp_path / "scores.jsonl"
  rows = [
      ("a", "\\boxed{\\frac{1}{2}}", ["so \\boxed{0.5}", "\\boxed{1}", "The answer is: 1/2"],
       [0.1, 0.9, 0.5]),
      ("b", "3", ["\\boxed{3}", "no idea", "\\boxed{4}"], [0.2, 0.3, 0.1]),
  ]
  with open(candidates, "w") as fc, open(scores, "w") as fs:
    for qid, ref, cands, rewards in rows:
      fc.write(json.dumps({"id": qid, "question": "?", "reference": ref, "candidates": cands}) + "\n")
      fs.write(json.dumps({"id": qid, "rewards": rewards}) + "\n")
  out = tmp_path / "report.json"
  cli.call(eval_main.main, eval_main.define_flags, ["bon", f"--candidates={candidates}", f"--scores={scores}", "--task=math",
            "--n=1,2,3", "--draws=10", f"--out={out}"])
  report = json.loads(out.read_text())
  assert set(report["bon"]) == {"1", "2", "3"}
  assert set(report["bon"]["2"]) == {*bon.METHODS, "rm_ci95", "baselines"}
  # N=3 takes every candidate: rm picks "\boxed{1}" (wrong) and "no idea" (wrong) -> 0;
  # majority: a has 1/2 twice -> right, b has 3 and 4 once each, a uniform pick -> 1/2.
  assert report["bon"]["3"] == {"rm": 0.0, "random": pytest.approx(0.5), "majority": 0.75,
                                "oracle": 1.0, "rm_ci95": [0.0, 0.0],  # wrong in both questions
                                # a: "The answer is: 1/2" longest (right), "\boxed{1}" shortest;
                                # b: "\boxed{3}" and "\boxed{4}" longest (a uniform pick: 1/2),
                                # "no idea" shortest
                                "baselines": {"longest": 0.75, "shortest": 0.0}}
  assert report["truncation"] is None and report["per_item"]["rm@3"] == [0.0, 0.0]
  assert report["candidates_without_answer"] == 1
  assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
  printed = capsys.readouterr().out
  assert "majority" in printed and "oracle" in printed and "100.0" in printed


def test_bad_candidates_file_is_a_clear_error(tmp_path, capsys):
  candidates = tmp_path / "cand.jsonl"
  candidates.write_text('{"id": "a", "reference": "3"}\n')
  with pytest.raises(SystemExit) as exit_info:
    cli.call(eval_main.main, eval_main.define_flags, ["bon", f"--candidates={candidates}", f"--scores={candidates}", "--task=gsm8k",
              "--n=1", f"--out={tmp_path / 'r.json'}"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "cand.jsonl:1: missing field 'candidates'" in err
  assert len(err.strip().splitlines()) == 1
  with pytest.raises(SystemExit) as exit_info:  # a bad flag: one line too
    cli.call(eval_main.main, eval_main.define_flags, ["bon", "--task=gsm8k", "--n=x", f"--out={tmp_path / 'r.json'}"])
  assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1
  for argv, message in ((["bon", "--task=gsm8k", "--scores=s"], "bon: --out is required"),
                        (["--out=r.json"], "expected one mode, pairwise|bon|mc"),
                        (["mc", "--out=r", "--checkpoint=c", "--data=d", "--format=gsm8k"],
                         "mc: --format must be one of"),
                        (["bon", "--out=r", "--candidates=c", "--task=math"], "one of --checkpoint")):
    with pytest.raises(SystemExit):
      cli.call(eval_main.main, eval_main.define_flags, argv)
    assert message in capsys.readouterr().err


def test_module_entry_point_runs_without_jax(tmp_path):
  candidates, scores = tmp_path / "c.jsonl", tmp_path / "s.jsonl"
  candidates.write_text(json.dumps({"id": 7, "question": "?", "answer": "#### 4",
                                    "candidates": ["The answer is 4", "#### 5"]}) + "\n")
  scores.write_text(json.dumps({"id": 7, "rewards": [0.0, 1.0]}) + "\n")
  code = ("import runpy, sys; sys.argv = ['eval'] + sys.argv[1:]; "
          "runpy.run_module('codepmp_jax.eval', run_name='__main__'); "
          "assert 'jax' not in sys.modules, 'bon from scores must not load JAX'")
  result = subprocess.run(
      [sys.executable, "-c", code, "bon", f"--candidates={candidates}", f"--scores={scores}",
       "--task=gsm8k", "--n=1,2", f"--out={tmp_path / 'r.json'}"],
      capture_output=True, text=True, cwd=ROOT, check=True, timeout=120)
  assert "oracle" in result.stdout
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["bon"]["2"] == {"rm": 0.0, "random": 0.5, "majority": 0.5, "oracle": 1.0,  # 4, 5 tie
                                "rm_ci95": [0.0, 0.0],  # one question: a point interval
                                "baselines": {"longest": 1.0, "shortest": 0.0}}


def test_module_usage_error_is_one_line(tmp_path):
  for args, message in ((["bon", "--task=gsm8k", "--scores=s.jsonl", f"--out={tmp_path / 'r.json'}"],
                         "error: bon: --candidates is required"),
                        (["pairwise", "--chekpoint=c"], "error: Unknown command line flag 'chekpoint'. Did you mean: checkpoint ?")):
    result = subprocess.run([sys.executable, "-m", "codepmp_jax.eval", *args], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [message], result.stderr
