"""eval/reward_tasks.py (pairwise, mc, bon) on real LogiQA 2.0 / GSM8K data: a rule-based scorer
whose picks are recomputed by hand, and a tiny checkpoint through the command line."""
from __future__ import annotations

import collections
import json
import pathlib
import sysconfig

import flax.linen as nn
import jax
import numpy as np
import pytest

from codepmp_jax import checkpoint
from codepmp_jax import cli as codepmp_cli
from codepmp_jax.data import loaders, templates
from codepmp_jax.data.records import BadRecords
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.eval import __main__ as cli
from codepmp_jax.eval import reward_tasks
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset
from codepmp_jax.score import RewardScorer


class LengthScorer:
  """Reward = length of the response in characters: a rule whose picks are easy to recompute."""

  def __init__(self):
    self.calls = []

  def score_texts(self, prompts, responses):
    assert len(prompts) == len(responses)
    self.calls.append(list(zip(prompts, responses)))
    return np.array([float(len(r)) for r in responses])


def test_mc_picks_the_highest_reward_and_reports_every_type(shared_data):
  path = shared_data / "logiqa2" / "dev.jsonl"
  scorer = LengthScorer()
  report = reward_tasks.multiple_choice(scorer, str(path), "logiqa2", limit=60)
  rows = [json.loads(line) for line in open(path)][:60]
  # Independent recomputation from the raw rows: the longest option (first among equals) wins.
  right = [int(np.argmax([len(o) for o in r["options"]])) == r["answer"] for r in rows]
  assert report["n"] == 60
  assert report["accuracy"] == pytest.approx(np.mean(right))
  per_type = collections.defaultdict(list)
  for r, ok in zip(rows, right):
    for name, flag in r["type"].items():
      if flag:
        per_type[name].append(ok)
  assert set(report["breakdown"]) == set(per_type)
  for name, oks in per_type.items():
    assert report["breakdown"][name]["n"] == len(oks)
    assert report["breakdown"][name]["accuracy"] == pytest.approx(np.mean(oks))
  # Every option was scored under the logic template.
  first_prompt = scorer.calls[0][0][0]
  assert first_prompt == templates.render("logic", context=rows[0]["text"],
                                          question=rows[0]["question"])
  assert len(scorer.calls[0]) == sum(len(r["options"]) for r in rows)


def test_pairwise_accuracy_and_margin_on_gsm8k_pairs(shared_data):
  scorer = LengthScorer()
  report = reward_tasks.pairwise(scorer, str(shared_data / "gsm8k" / "test.jsonl"), "gsm8k", limit=40)
  (scored,) = scorer.calls  # one call: the 40 chosen responses, then the 40 rejected ones
  assert [p for p, _ in scored[:40]] == [p for p, _ in scored[40:]]
  chosen = np.array([len(c) for _, c in scored[:40]])
  rejected = np.array([len(r) for _, r in scored[40:]])
  assert report["n"] == 40
  assert report["accuracy"] == pytest.approx(np.mean(chosen > rejected))  # ties count wrong
  assert report["mean_margin"] == pytest.approx(np.mean(chosen - rejected))
  assert report["ci95"][0] <= report["accuracy"] <= report["ci95"][1]
  assert list(report["breakdown"]) == [reward_tasks.NO_GROUP]  # GSM8K pairs carry no meta.source


def test_render_prints_the_per_type_table(shared_data):
  report = reward_tasks.multiple_choice(LengthScorer(), str(shared_data / "logiqa2" / "dev.jsonl"),
                                 "logiqa2", limit=20)
  table = cli.render(report)
  assert "Categorical Reasoning" in table and "95% CI" in table


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A random tiny model with a sentencepiece tokenizer, saved as a checkpoint."""
  root = tmp_path_factory.mktemp("eval_ckpt")
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
  tokenizer = train_sentencepiece(files, vocab_size=400, out_prefix=root / "sp")
  config = get_preset("tiny", vocab_size=400, eos_token_id=tokenizer.eos_id,
                      pad_token_id=tokenizer.pad_id)
  params = nn.unbox(transformer.init_params(config, jax.random.key(3)))
  return checkpoint.save_model(root / "ckpt", params, config, tokenizer)


def _eval(argv: list[str]) -> dict:
  """The eval CLI run in this process; the report it wrote to --out."""
  codepmp_cli.call(cli.main, cli.define_flags, argv)
  out = next(a for a in argv if a.startswith("--out=")).removeprefix("--out=")
  return json.loads(open(out).read())


@pytest.mark.slow
def test_cli_with_a_checkpoint(ckpt, shared_data, tmp_path, capsys):
  data = shared_data / "logiqa2" / "test.jsonl"
  out = tmp_path / "mc.json"
  report = _eval(["mc", f"--checkpoint={ckpt}", f"--data={data}", "--format=logiqa2",
                     "--limit=6", "--max_length=128", "--batch_size=8", f"--out={out}"])
  assert report["n"] == 6 and report["checkpoint"] == str(ckpt)
  assert "Categorical Reasoning" in capsys.readouterr().out
  # The same picks from the scorer used directly on the raw rows.
  rows = [json.loads(line) for line in open(data)][:6]
  scorer = RewardScorer(ckpt, batch_size=8, max_length=128, show_progress=False)
  right = []
  for r in rows:
    prompt = templates.render("logic", context=r["text"], question=r["question"])
    rewards = scorer.score_texts([prompt] * len(r["options"]), r["options"])
    right.append(int(np.argmax(rewards)) == r["answer"])
  assert report["accuracy"] == pytest.approx(np.mean(right))
  types = {name for r in rows for name, flag in r["type"].items() if flag}
  assert set(report["breakdown"]) == types

  # Best-of-N with the checkpoint; its saved rewards give the same report through --scores.
  cand = tmp_path / "cand.jsonl"
  cand.write_text("".join(json.dumps({"id": i, "question": f"What is {i} + {i}?",
                                      "answer": f"#### {2 * i}",
                                      "candidates": [f"The answer is {2 * i + k % 2}."
                                                     for k in range(4)]}) + "\n"
                          for i in range(3)))
  common = [f"--candidates={cand}", "--task=gsm8k", "--n=1,2,4", "--max_length=64"]
  first = _eval(["bon", f"--checkpoint={ckpt}", *common, f"--out={tmp_path / 'a.json'}",
                    f"--save_scores={tmp_path / 's.jsonl'}"])
  again = _eval(["bon", f"--scores={tmp_path / 's.jsonl'}", *common,
                    f"--out={tmp_path / 'b.json'}"])
  assert first["bon"] == again["bon"]
  assert first["bon"]["4"]["oracle"] == 1.0 and first["bon"]["1"]["random"] == 0.5

  pairwise = _eval(["pairwise", f"--checkpoint={ckpt}", f"--data={shared_data / 'gsm8k' / 'test.jsonl'}",
                       "--format=gsm8k", "--limit=4", "--max_length=128",
                       f"--out={tmp_path / 'p.json'}"])
  records = list(loaders.load_records([shared_data / "gsm8k" / "test.jsonl"], "gsm8k",
                                      BadRecords()))[:4]
  scorer = RewardScorer(ckpt, batch_size=8, max_length=128, show_progress=False)
  chosen = scorer.score_texts([r.prompt for r in records], [r.chosen for r in records])
  rejected = scorer.score_texts([r.prompt for r in records], [r.rejected for r in records])
  assert pairwise["n"] == 4
  assert pairwise["accuracy"] == pytest.approx(np.mean(chosen > rejected))
  assert pairwise["mean_margin"] == pytest.approx(np.mean(chosen - rejected), abs=1e-6)
