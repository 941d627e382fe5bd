"""The PMP control experiment: statistics by hand, and the whole design end to end at smoke size."""
from __future__ import annotations

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
  values(["pmp_control", f"--out={tmp_path}", "--ks=8,16", "--seeds=3", "--eval_limit=5"])
  assert pmp_control.settings_from_flags(values) == pmp_control.ControlSettings(
      out=str(tmp_path), ks=(8, 16), seeds=(3,), eval_limit=5)
  values(["pmp_control", "--smoke", "--eval_limit=0"])
  assert pmp_control.settings_from_flags(values) == pmp_control.smoke_settings(str(tmp_path))
  with pytest.raises(SystemExit) as exit_:
    cli.call(pmp_control.main, pmp_control.define_flags, ["--ks=8,x"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == "error: --ks: expected comma-separated integers, got '8,x'\n"


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path, shared_data):
  settings = pmp_control.smoke_settings(str(tmp_path / "out"), str(_code_pairs(tmp_path / "c.jsonl")))
  results = pmp_control.run(settings)
  out = tmp_path / "out"
  assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
  table = (out / "results.md").read_text()
  assert "| gsm8k_pairwise | 8 |" in table and "Conclusion" in table
  assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
  # Three arms x one k x two seeds, each with every metric, and paired differences per k.
  assert len(results["runs"]) == 6
  for name in ("gsm8k_pairwise", "logiqa2_mc", "champ_bon2"):
    row = results["summary"][name]["8"]
    assert set(row) == {"base", "lm", "pmp", "pmp-base", "pmp-lm", "lm-base"}
    assert all(row[arm]["n"] == 2 for arm in row)
  # The base LM and the LM-only arm train with rm_coef 0: their loss is the LM loss alone.
  pre = results["pretraining"]
  assert pre["base"]["loss"] == pytest.approx(pre["base"]["lm_loss"])
  assert pre["lm"]["loss"] == pytest.approx(pre["lm"]["lm_loss"])
  assert pre["pmp"]["loss"] == pytest.approx(pre["pmp"]["lm_loss"] + pre["pmp"]["bt_loss"],
                                             rel=1e-5)
  assert results["champ"]["questions"] == settings.eval_limit
