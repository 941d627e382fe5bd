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
from codepmp_jax.data.encode import fit_sequence
from codepmp_jax.data.records import BadRecords
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.eval import __main__ as cli
from codepmp_jax.eval import reward_tasks
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset
from codepmp_jax.score import RewardScorer


class LengthScorer:
  """Characters as tokens, cut to `max_length` by keep_end truncation, and reward = the scored
  length: a rule whose picks are easy to recompute (one prompt per group, so longer response =
  higher reward until both are cut to the same length, a tie)."""

  def __init__(self, max_length: int = 100_000, truncation: str = "keep_end"):
    self.calls = []
    self.max_length, self.truncation = max_length, truncation

  def encode_texts(self, prompts, responses):
    assert len(prompts) == len(responses)
    self.calls.append(list(zip(prompts, responses)))
    return [fit_sequence([ord(c) for c in p + r], len(p), 0, self.max_length, self.truncation)
            for p, r in zip(prompts, responses)]

  def score_ids(self, sequences):
    return np.array([float(len(s)) for s in sequences])


def test_mc_picks_the_highest_reward_and_reports_every_type(shared_data):
  path = shared_data / "logiqa2" / "dev.jsonl"
  scorer = LengthScorer()
  report = reward_tasks.multiple_choice(scorer, str(path), "logiqa2", limit=60)
  rows = [json.loads(line) for line in open(path)][:60]
  # Independent recomputation from the raw rows: the longest option wins; among t equally long
  # ones, strict counts the pick wrong and tie-aware counts 1/t if the answer is among them.
  lengths = [np.array([len(o) for o in r["options"]]) for r in rows]
  longest = [np.flatnonzero(n == n.max()) for n in lengths]
  right = [len(top) == 1 and top[0] == r["answer"] for top, r in zip(longest, rows)]
  tie_aware = [(r["answer"] in top) / len(top) for top, r in zip(longest, rows)]
  assert report["n"] == 60
  assert report["accuracy"] == pytest.approx(np.mean(right))
  assert report["accuracy_tie_aware"] == pytest.approx(np.mean(tie_aware))
  assert report["ties"] == sum(len(top) > 1 for top in longest)
  assert report["truncation"] == {"sequences": sum(map(len, lengths)), "prompt": 0, "response": 0,
                                  "share": 0.0}
  assert report["per_item"]["strict"] == [float(x) for x in right]
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
  assert report["n"] == 40 and report["identical_after_truncation"] == 0
  assert report["accuracy"] == pytest.approx(np.mean(chosen > rejected))  # ties count wrong
  assert report["accuracy_tie_aware"] == pytest.approx(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))
  assert report["ties"] == np.sum(chosen == rejected)
  assert report["mean_margin"] == pytest.approx(np.mean(chosen - rejected))
  assert report["ci95"][0] <= report["accuracy"] <= report["ci95"][1]
  assert list(report["breakdown"]) == [reward_tasks.NO_GROUP]  # GSM8K pairs carry no meta.source


def test_pairwise_skips_pairs_identical_at_the_scored_length_and_counts_ties(shared_data):
  """Cut to a short length keeping their heads, some GSM8K pairs become identical (skipped and
  counted: the wrong step comes later), others tie (same length, different text: strict counts
  them wrong, tie-aware half right)."""
  records = list(loaders.load_records([shared_data / "gsm8k" / "test.jsonl"], "gsm8k", BadRecords()))[:200]
  length = 120
  report = reward_tasks.pairwise(LengthScorer(length, "keep_head"), str(shared_data / "gsm8k" / "test.jsonl"),
                                 "gsm8k", limit=200)
  cut = lambda r, text: fit_sequence([ord(c) for c in r.prompt + text], len(r.prompt), 0, length, "keep_head").ids  # noqa: E731
  identical = [cut(r, r.chosen) == cut(r, r.rejected) for r in records]
  kept = [r for r, same in zip(records, identical) if not same]
  chosen = np.array([len(cut(r, r.chosen)) for r in kept])
  rejected = np.array([len(cut(r, r.rejected)) for r in kept])
  assert 0 < sum(identical) < 200
  assert report["identical_after_truncation"] == sum(identical)
  assert report["n"] == len(kept) == 200 - sum(identical)
  assert report["ties"] == np.sum(chosen == rejected) > 0
  assert report["accuracy"] == pytest.approx(np.mean(chosen > rejected))
  assert report["accuracy_tie_aware"] == pytest.approx(report["accuracy"] + 0.5 * report["ties"] / len(kept))
  assert report["truncation"]["sequences"] == 2 * len(kept)
  fitted = [fit_sequence([ord(c) for c in r.prompt + text], len(r.prompt), 0, length, "keep_head")
            for r in kept for text in (r.chosen, r.rejected)]
  assert report["truncation"]["prompt"] == sum(f.prompt_cut > 0 for f in fitted) > 0
  assert report["truncation"]["response"] == sum(f.response_cut > 0 for f in fitted) > 0
  table = cli.render(report)
  assert f"{report['ties']} ties" in table and "token-identical" in table and "truncation:" in table


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
    right.append(int(np.argmax(rewards)) == r["answer"] and (rewards == rewards.max()).sum() == 1)
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
  assert pairwise["n"] + pairwise["identical_after_truncation"] == 4
  assert pairwise["accuracy"] == pytest.approx(np.mean(chosen > rejected))
  assert pairwise["mean_margin"] == pytest.approx(np.mean(chosen - rejected), abs=1e-6)
