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
  """Every stage of `make demo` at a tiny size; PMP on synthetic pairs with a small tokenizer
  instead of the built-in stdlib synthesis (tested on its own), so the test stays short."""
  from codepmp_jax.data.tokenizer import train_sentencepiece

  train_sentencepiece(["def add(a, b):\n  return a + b\n", "Question: 2 + 3?\nAnswer: 5"] * 20, 300,
                      tmp_path / "spm")
  settings = demo.DemoSettings(
      out=str(tmp_path / "demo"), rm_questions=40, rm_steps=2, eval_questions=6,
      shared_data=str(shared_data),
      pmp_overrides={**TINY_MODEL, **SMALL_TRAIN, "train.total_steps": 4, "train.log_every": 2,
                     "train.eval_every": 4, "checkpoint.save_every": 4, "data.builtin.name": "",
                     "data.source": "synthetic", "data.vocab_size": 256,
                     "data.synthetic_pairs": 256, "model.vocab_size": 320,
                     "tokenizer": str(tmp_path / "spm.model")},
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


def test_demo_table_and_plot_of_two_arms(tmp_path):
  arm = {"pairwise": {"accuracy": 0.7}, "mc": {"accuracy": 0.25}, "bon": {"4": {"rm": 0.5}},
         "train": {"loss": 0.6931}}
  table = demo.results_table({"PMP-initialized": arm, "scratch": {**arm, "mc": {"accuracy": 0.3}}})
  assert table.splitlines() == [
      "| metric | PMP-initialized | scratch |", "|---|---:|---:|",
      "| GSM8K pairwise accuracy (held-out test) | 0.700 | 0.700 |",
      "| LogiQA 2.0 multiple-choice accuracy | 0.250 | 0.300 |",
      "| GSM8K Best-of-4 accuracy | 0.500 | 0.500 |",
      "| RM fine-tune final train loss | 0.693 | 0.693 |"]
  path = demo.plot_results({"a": arm, "b": arm}, tmp_path / "r.png")
  assert path.read_bytes()[:4] == b"\x89PNG"


def test_recipes_reuse_finished_work_and_build_best_of_n_candidates(tmp_path, shared_data):
  from etils import epath

  from launch.experiments import recipes

  workdir = epath.Path(tmp_path / "run")
  workdir.mkdir()
  (workdir / "summary.json").write_text(json.dumps({"step": 3, "finished": True, "loss": 0.5}))
  assert recipes.train_once(None, workdir) == {"step": 3, "finished": True, "loss": 0.5}
  source = epath.Path(shared_data) / "gsm8k" / "test.jsonl"
  subset = recipes.first_lines(source, epath.Path(tmp_path / "first.jsonl"), 5)
  rows = [json.loads(line) for line in subset.read_text().splitlines()]
  assert rows == [json.loads(line) for line in source.read_text().splitlines()[:5]]
  path = recipes.bon_candidates(source, epath.Path(tmp_path / "bon.jsonl"), limit=20, n=4)
  questions = [json.loads(line) for line in path.read_text().splitlines()]
  assert 0 < len(questions) <= 20
  for q in questions:  # the reference solution once among four distinct candidates
    assert len(q["candidates"]) == 4 and len(set(q["candidates"])) == 4
    answer = q["reference"].split("####")[-1].strip()
    assert sum(c.endswith(f"The answer is {answer}") for c in q["candidates"]) == 1
