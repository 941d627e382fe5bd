"""The experiments under launch/experiments/ called as functions: the demo end to end at a tiny
size, and the shared report helpers."""
from __future__ import annotations

import json

import pytest

from absl import flags

from launch.experiments import demo, report, sample_efficiency, settings_flags

TINY_MODEL = {"model.num_layers": 1, "model.hidden_size": 32, "model.intermediate_size": 64,
              "model.num_heads": 2, "model.num_kv_heads": 1}
SMALL_TRAIN = {"train.global_batch": 8, "train.eval_batch": 8, "train.eval_batches": 1}


@pytest.mark.slow
def test_demo_runs_end_to_end_at_a_tiny_size_and_reuses_its_stages(tmp_path, shared_data, capsys):
  settings = demo.DemoSettings(
      out=str(tmp_path / "demo"), rm_questions=40, rm_steps=2, eval_questions=6,
      shared_data=str(shared_data),
      pmp_overrides={**TINY_MODEL, **SMALL_TRAIN, "train.total_steps": 4, "train.log_every": 2,
                     "train.eval_every": 4, "checkpoint.save_every": 4,
                     "data.builtin.max_pairs": 150, "data.builtin.vocab_size": 500},
      rm_overrides={**TINY_MODEL, **SMALL_TRAIN})
  reports = demo.run(settings)
  assert list(reports) == ["PMP-initialized", "scratch"]
  out = tmp_path / "demo"
  for arm, workdir in (("PMP-initialized", "rm_pmp"), ("scratch", "rm_scratch")):
    r = reports[arm]
    assert r["train"]["step"] == 2 and r["train"]["finished"]
    assert r["pairwise"]["n"] == 6 and 0 <= r["pairwise"]["accuracy"] <= 1
    assert r["mc"]["n"] == 6 and set(r["bon"]) == {"1", "2", "4"}
    config = json.loads((out / workdir / "config.json").read_text())
    assert config["init_from"] == (str(out / "pmp") if workdir == "rm_pmp" else "")
    assert (config["train"]["total_steps"], config["loss"]["lm_coef"]) == (2, 0.0)
  table = (out / "results.md").read_text().splitlines()
  assert table[0] == "| metric | PMP-initialized | scratch |" and len(table) == 6
  assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(reports))
  capsys.readouterr()
  assert demo.run(settings) == json.loads(json.dumps(reports))  # every stage reused
  assert "| GSM8K Best-of-4 accuracy |" in capsys.readouterr().out


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
  values(["x", "--rm_steps=3"])
  assert settings_flags.from_flags(demo.DemoSettings, values) == demo.DemoSettings(rm_steps=3)
  with pytest.raises(ValueError, match="needs base and pmp"):
    sample_efficiency.run(cls(preset="smollm2_135m", out="unused"))
