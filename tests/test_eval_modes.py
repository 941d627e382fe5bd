"""The pairwise and mc modes on real LogiQA 2.0 / GSM8K data, with a scorer of known rewards."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from codepmp_jax.data import templates
from codepmp_jax.eval import __main__ as cli
from codepmp_jax.eval import modes


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
  report = modes.multiple_choice(scorer, str(path), "logiqa2", limit=60)
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
  report = modes.pairwise(scorer, str(shared_data / "gsm8k" / "test.jsonl"), "gsm8k", limit=40)
  chosen, rejected = zip(*[(len(c), len(r)) for (_, c), (_, r) in zip(*scorer.calls)])
  chosen, rejected = np.array(chosen), np.array(rejected)
  assert report["n"] == 40
  assert report["accuracy"] == pytest.approx(np.mean(chosen > rejected))  # ties count wrong
  assert report["mean_margin"] == pytest.approx(np.mean(chosen - rejected))
  assert report["ci95"][0] <= report["accuracy"] <= report["ci95"][1]
  assert list(report["breakdown"]) == [modes.NO_GROUP]  # GSM8K pairs carry no meta.source


def test_render_prints_the_per_type_table(shared_data):
  report = modes.multiple_choice(LengthScorer(), str(shared_data / "logiqa2" / "dev.jsonl"),
                                 "logiqa2", limit=20)
  table = cli.render(report)
  assert "Categorical Reasoning" in table and "95% CI" in table
