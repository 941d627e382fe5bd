"""The PMP control experiment: statistics by hand, and the whole design end to end at smoke size."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
from absl import flags

from codepmp_jax import cli
from launch.experiments import pmp_control


def test_t_interval_hand_computed():
  # mean 0.6, sample sd 0.1, t(0.975, df=2) = 4.302653 -> half width 0.1 * 4.302653 / sqrt(3).
  got = pmp_control.t_interval([0.5, 0.7, 0.6])
  half = 0.1 * 4.302653 / math.sqrt(3)
  assert got["mean"] == pytest.approx(0.6)
  assert got["ci95"] == pytest.approx([0.6 - half, 0.6 + half], abs=1e-6)
  assert math.isnan(pmp_control.t_interval([0.5])["ci95"][0])


def test_conclusion_names_wins_and_losses():
  row = lambda mean, low, high: {"mean": mean, "ci95": [low, high], "n": 3}
  summary = {"m": {"64": {"pmp-base": row(0.05, 0.01, 0.09), "pmp-lm": row(0.0, -0.02, 0.02)},
                   "256": {"pmp-base": row(-0.04, -0.06, -0.01), "pmp-lm": row(0.01, -0.1, 0.2)}}}
  text = pmp_control.conclusion(summary, 3)
  assert "m: pmp vs base: better at k=64; worse at k=256" in text
  assert "m: pmp vs lm: not distinguishable at any k" in text


def test_fitting_length_is_the_smallest_bucket_cutting_under_the_share():
  # Buckets of 4 per octave: 16, 20, 24, 28, 32, 40, ... One sequence in 100 longer than 20 is
  # 1%, not under it: the bucket must hold it. One in 101 is under 1%.
  assert pmp_control.fitting_length([10] * 99 + [21], 0.01) == 24
  assert pmp_control.fitting_length([10] * 100 + [21], 0.01) == 16
  assert pmp_control.fitting_length([100, 200, 300], 0.01) == 320
  assert pmp_control.fitting_length([17, 300], 0.6) == 20  # half may be cut


def test_the_scoring_length_is_measured_on_what_is_scored(tmp_path, shared_data):
  from etils import epath

  from codepmp_jax.data.encode import bucket_length
  from codepmp_jax.data.tokenizer import train_sentencepiece
  lines = _code_pairs(tmp_path / "c.jsonl").read_text().splitlines()
  train_sentencepiece([json.loads(x)["prompt"] + json.loads(x)["chosen"] for x in lines], 300,
                      str(tmp_path / "spm"))
  s = pmp_control.ControlSettings(eval_limit=5, logiqa=True, bon_ns=(1, 2),
                                  champ_models=("GPT-4", "PaLM 2 Medium"), champ_settings=("0-Shot",))
  champ, counts = pmp_control.champ_file(s, epath.Path(tmp_path))
  texts = pmp_control.scored_texts(s, champ, shared_data / "gsm8k" / "test.jsonl",
                                   shared_data / "logiqa2" / "test.jsonl")
  # Both sides of each GSM8K pair, every option of 5 LogiQA questions, every CHAMP candidate.
  assert len(texts["pairwise"][0]) % 2 == 0 and 0 < len(texts["pairwise"][0]) <= 10
  assert len(texts["mc"][1]) == 20 and len(texts["bon"][1]) == counts["candidates"]
  length, lengths = pmp_control.choose_score_length(s, tmp_path / "spm.model", texts)
  # Under 1% of fewer than 100 sequences is none: the scoring bucket that holds the longest.
  longest = max(v["max"] for v in lengths.values())
  assert length == bucket_length(longest, steps_per_octave=4) and longest > 256
  assert all(v["cut_share"] == 0 for v in lengths.values())
  fixed, cut = pmp_control.choose_score_length(
      dataclasses.replace(s, score_length=64), tmp_path / "spm.model", texts)
  assert fixed == 64 and cut["bon"]["cut_share"] == 1.0


def _report(strict, tie_aware, bon, share=0.0, ties=0, ids=None):
  ids = ids or [str(i) for i in range(len(strict))]
  t = {"sequences": 2 * len(strict), "prompt": 0, "response": int(share * 2 * len(strict)),
       "share": share}
  return {"score_length": 512,
          "pairwise": {"n": len(strict), "ties": ties, "identical_after_truncation": 1,
                       "truncation": t, "per_item": {"id": ids, "strict": strict, "tie_aware": tie_aware}},
          "bon": {"questions": len(bon), "truncation": {**t, "share": 0.0},
                  "bon": {"2": {"random": 0.5, "majority": 0.6, "oracle": 0.75,
                                "baselines": {"longest": 0.4, "source:GPT-4": 0.7}}},
                  "per_item": {"id": ["q0", "q1"], "rm@2": bon}}}


def test_metrics_paired_items_and_facts_from_per_item_scores():
  s = pmp_control.ControlSettings(ks=(8,), seeds=(0, 1), bon_ns=(1, 2))
  reports = {
      "base/k8/seed0": _report([1, 0, 0, 0], [1, 0.5, 0, 0], [0.0, 1.0]),
      "base/k8/seed1": _report([1, 0, 1, 0], [1, 0, 1, 0], [0.0, 0.0], ties=2),
      "lm/k8/seed0": _report([1, 1, 0, 0], [1, 1, 0, 0], [1.0, 1.0]),
      "lm/k8/seed1": _report([1, 1, 0, 0], [1, 1, 0, 0], [1.0, 1.0]),
      # Items in another order: paired by id, not position.
      "pmp/k8/seed0": _report([0, 1, 1, 1], [0, 1, 1, 1], [1.0, 1.0], ids=["3", "2", "1", "0"]),
      "pmp/k8/seed1": _report([1, 1, 1, 1], [1, 1, 1, 1], [1.0, 0.0], share=0.02),
  }
  assert pmp_control.metrics_of(s, reports["base/k8/seed0"]) == {
      "gsm8k_pairwise": 0.25, "gsm8k_pairwise_tie_aware": 0.375, "champ_bon2": 0.5}
  paired = pmp_control.paired_items(s, reports)
  # pmp per item (ids 0..3), averaged over seeds: [1, 1, 1, 0.5]; base: [1, 0.25, 0.5, 0].
  diff = paired["gsm8k_pairwise_tie_aware"]["8"]["pmp-base"]
  assert diff["difference"] == pytest.approx((0 + 0.75 + 0.5 + 0.5) / 4) and diff["n"] == 4
  assert paired["champ_bon2"]["8"]["lm-base"]["difference"] == pytest.approx(0.75)
  facts = pmp_control.evaluation_facts(list(reports.values()))
  assert facts["pairwise"]["ties"] == [0, 2] and facts["pairwise"]["truncation"]["share"] == 0.02
  table = pmp_control.facts_table(facts).splitlines()
  assert table[2] == "| GSM8K pairwise | 4 | 512 | 8 | 0 / 0 | 2.00% | 1 | 0-2 |"
  assert pmp_control.baselines_line(reports["base/k8/seed0"]["bon"], 2) == (
      "CHAMP Best-of-2 without a reward model (2 questions, same draws): random 50.0, "
      "majority 60.0, oracle 75.0, longest 40.0, source:GPT-4 70.0")
  assert not pmp_control.truncation_line("a", reports["base/k8/seed0"], 0.01).startswith("WARNING")
  warning = pmp_control.truncation_line("a", reports["pmp/k8/seed1"], 0.01)
  assert warning.startswith("WARNING: a: scored sequences truncated at 512 tokens: pairwise 2.00%")


def test_an_out_dir_of_other_settings_is_refused(tmp_path):
  s = pmp_control.ControlSettings(out=str(tmp_path))
  pmp_control.check_out_dir(s, tmp_path)
  pmp_control.check_out_dir(pmp_control.ControlSettings(out="elsewhere", seeds=(4,)), tmp_path)
  with pytest.raises(ValueError, match=r"other settings \(score_length, seq_len differ\)"):
    pmp_control.check_out_dir(pmp_control.ControlSettings(seq_len=128, score_length=128), tmp_path)


def _code_pairs(path, n=96):
  """Small ASCII code pairs: a function and a version with a wrong operator."""
  ops = [("+", "-"), ("*", "+"), ("<", ">"), ("and", "or")]
  with open(path, "w") as f:
    for i in range(n):
      good, bad = ops[i % len(ops)]
      body = f"def f{i}(a, b):\n  return a {good} b + {i}\n"
      f.write(json.dumps({"prompt": f"Write f{i}: combine a and b with {good}.\n",
                          "chosen": body, "rejected": body.replace(f" {good} ", f" {bad} ")}) + "\n")
  return path


def test_flags_give_the_settings(tmp_path, capsys):
  values = flags.FlagValues()
  pmp_control.define_flags(values)
  values(["pmp_control", f"--out={tmp_path}", "--ks=8,16", "--seeds=3", "--eval_limit=5",
          "--logiqa", "--score_length=256"])
  assert pmp_control.settings_from_flags(values) == pmp_control.ControlSettings(
      out=str(tmp_path), ks=(8, 16), seeds=(3,), eval_limit=5, logiqa=True, score_length=256)
  values(["pmp_control", "--smoke", "--eval_limit=0"])
  assert pmp_control.settings_from_flags(values) == pmp_control.smoke_settings(str(tmp_path))
  with pytest.raises(SystemExit) as exit_:
    cli.call(pmp_control.main, pmp_control.define_flags, ["--ks=8,x"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == "error: --ks: expected comma-separated integers, got '8,x'\n"


@pytest.mark.rehearse  # the suite's one experiment smoke run is the demo's (test_experiments.py)
def test_smoke_run_end_to_end(tmp_path, shared_data, capsys):
  settings = pmp_control.smoke_settings(str(tmp_path / "out"), str(_code_pairs(tmp_path / "c.jsonl")))
  results = pmp_control.run(settings)
  printed = capsys.readouterr().out
  out = tmp_path / "out"
  assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
  table = (out / "results.md").read_text()
  assert "| gsm8k_pairwise | 8 |" in table and "Conclusion" in table and "over items" in table
  assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
  # Three arms x one k x two seeds, each with every metric, and paired differences per k.
  assert len(results["runs"]) == 6
  for name in ("gsm8k_pairwise", "gsm8k_pairwise_tie_aware", "logiqa2_mc_tie_aware", "champ_bon2"):
    row = results["summary"][name]["8"]
    assert set(row) == {"base", "lm", "pmp", "pmp-base", "pmp-lm", "lm-base"}
    assert all(row[arm]["n"] == 2 for arm in row)
    assert set(results["paired_items"][name]["8"]) == {"pmp-base", "pmp-lm", "lm-base"}
  # Scoring at a fixed 64 tokens cuts most sequences: every evaluation says so, loudly.
  assert results["score_length"] == 64 and len(results["warnings"]) == 6
  assert printed.count("WARNING: ") == 6 and "truncated share" in printed
  assert results["evaluation"]["bon"]["truncation"]["share"] > 0.5
  assert "code pairs, base half" in results["prepared"] and "CHAMP Best-of-2 without" in printed
  # The base LM and the LM-only arm train with rm_coef 0: their loss is the LM loss alone.
  pre = results["pretraining"]
  assert pre["base"]["loss"] == pytest.approx(pre["base"]["lm_loss"])
  assert pre["lm"]["loss"] == pytest.approx(pre["lm"]["lm_loss"])
  assert pre["pmp"]["loss"] == pytest.approx(pre["pmp"]["lm_loss"] + pre["pmp"]["bt_loss"],
                                             rel=1e-5)
  assert results["champ"]["questions"] == settings.eval_limit
