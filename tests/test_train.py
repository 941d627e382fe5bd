"""The trainer as users run it: NaN stop, real data, decay_from, the truncation policy. (kill -9 and
its resume: tests/test_faults.py; SIGTERM and several processes: tests/test_pod.py.)"""
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from codepmp_jax import checkpoint, score, train
from codepmp_jax.config import default_config
from codepmp_jax.data import prepare, templates
from codepmp_jax.data.tokenizer import train_sentencepiece

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A small synthetic run: every flag a user could pass on the command line.
SMALL = [
    "--config=configs/tiny.py", "--config.data.builtin.name=", "--config.data.source=synthetic",
    "--config.data.vocab_size=256", "--config.data.synthetic_pairs=512", "--config.model.vocab_size=256",
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_layers=2",
    "--config.train.global_batch=8", "--config.train.seq_len=32", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.optimizer.lr=1e-3", "--config.mesh_shape=(-1,1,1)",
]


def _train(workdir, *overrides, env=None, wait=True):
  cmd = [sys.executable, "-m", "codepmp_jax.train", f"--workdir={workdir}", *SMALL, *overrides]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env or os.environ.copy(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if wait:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
  return proc


def _metrics(workdir) -> dict[int, dict]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {row["step"]: row for row in map(json.loads, lines)}


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving(tmp_path):
  proc = _train(tmp_path, "--config.train.total_steps=50", "--config.checkpoint.save_every=1",
                "--config.optimizer.lr=1e30", "--config.optimizer.grad_clip=0",
                "--config.optimizer.warmup_ratio=0", wait=False)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  match = re.search(r"NonFiniteLoss: non-finite \[.*\] at step (\d+)", out)
  assert match, out[-3000:]
  bad_step = int(match.group(1))
  assert checkpoint.latest_train_step(tmp_path) == bad_step - 1


@pytest.mark.slow
def test_trains_on_real_gsm8k_pairs(tmp_path, shared_data):
  """Levanter-style: a tiny reward model really learns from real preference pairs in-process."""
  questions = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").open()][:400]
  tokenizer = train_sentencepiece((q["question"] + q["answer"] for q in questions), 512, tmp_path / "spm")
  subset = tmp_path / "gsm8k.jsonl"
  subset.write_text("".join(json.dumps(q) + "\n" for q in questions))
  prepare.prepare(prepare.PrepareSettings(
      inputs=(str(subset),), format="gsm8k", tokenizer=str(tmp_path / "spm.model"), seq_len=256,
      out=str(tmp_path / "prepared"), split="train:0.9,eval:0.1", num_workers=1))
  config = default_config()
  config.data.path = str(tmp_path / "prepared")
  config.model.update(vocab_size=0, hidden_size=64, intermediate_size=128, num_layers=2)
  config.optimizer.update(lr=3e-3, warmup_ratio=0.05, weight_decay=0.0)
  config.train.update(global_batch=16, seq_len=256, total_steps=60, log_every=10, eval_every=60)
  config.mesh_shape = (-1, 1, 1)
  final = train.train(config, tmp_path / "run")
  rows = _metrics(tmp_path / "run")
  assert rows[60]["loss"] < rows[10]["loss"]
  assert final["lm_loss"] < np.log(tokenizer.vocab_size) - 1.0  # it learned the language of GSM8K
  assert "eval/accuracy" in final
  # The run records the prompt format of its data (GSM8K: math), and scoring uses it by default.
  assert json.loads((tmp_path / "run" / "prompt_format.json").read_text())["template"] == "math"
  scorer = score.RewardScorer(tmp_path / "run", batch_size=2, max_length=256, show_progress=False)
  assert scorer.prompt_format == "math"
  # ... and the truncation policy its prepared data were cut with, which scoring applies too.
  assert json.loads((tmp_path / "run" / "truncation.json").read_text()) == {"truncation": "keep_end"}
  assert scorer.truncation == "keep_end"
  records = tmp_path / "score_in.jsonl"
  records.write_text("".join(json.dumps({"prompt": q["question"], "response": q["answer"]}) + "\n"
                             for q in questions[:2]))
  score.score_file(scorer, records, tmp_path / "score_out.jsonl", scorer.prompt_format)
  scored = [json.loads(line)["reward"] for line in (tmp_path / "score_out.jsonl").read_text().splitlines()]
  expected = scorer.score_texts([templates.render("math", question=q["question"]) for q in questions[:2]],
                                [q["answer"] for q in questions[:2]])
  np.testing.assert_allclose(scored, expected, rtol=1e-6)


@pytest.mark.slow
def test_decay_from_a_stable_checkpoint_equals_a_run_decaying_there(tmp_path):
  """Scaling curves the cheap way: decaying from a kept stable-phase checkpoint of a long run gives
  exactly the run whose warmup-stable-decay schedule decays at that step."""
  common = ("--config.optimizer.schedule=wsd", "--config.optimizer.warmup_ratio=0")
  _train(tmp_path / "short", *common, "--config.train.total_steps=10", "--config.optimizer.decay_ratio=0.3")
  _train(tmp_path / "long", *common, "--config.train.total_steps=14", "--config.optimizer.decay_ratio=0.1",
         "--config.checkpoint.keep_steps=(7,)", "--config.checkpoint.keep=1",
         "--config.checkpoint.save_every=100")
  assert (tmp_path / "long" / "checkpoints" / "7").is_dir()
  _train(tmp_path / "decayed", *common, f"--config.decay_from={tmp_path / 'long'}:7",
         "--config.train.decay_steps=3")
  want, got = _metrics(tmp_path / "short"), _metrics(tmp_path / "decayed")
  assert sorted(got) == [8, 9, 10]
  for step in (8, 9, 10):
    assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-6)
    assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               checkpoint.load_model(tmp_path / "decayed")[0], checkpoint.load_model(tmp_path / "short")[0])


def test_the_truncation_policy_comes_from_the_prepared_data(tmp_path):
  from codepmp_jax.config import default_config
  from codepmp_jax.data import prepared
  config = default_config()
  config.data.source = "prepared"
  config.data.path = str(tmp_path)
  (tmp_path / "manifest.json").write_text(json.dumps({"version": prepared.MANIFEST_VERSION,
                                                     "truncation": "keep_head"}))
  assert train.resolve_truncation(config) == "keep_head"
  config.data.truncation = "keep_end"
  with pytest.raises(ValueError, match="prepared with 'keep_head'; prepare it again with --truncation=keep_end"):
    train.resolve_truncation(config)
  config.data.source = "synthetic"
  assert train.resolve_truncation(config) == "keep_end"
  config.data.truncation = ""
  assert train.resolve_truncation(config) == "keep_end"
