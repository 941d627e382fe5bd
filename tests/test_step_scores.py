"""Step-level scores: the reward at the end of every step of a solution, read in ONE forward pass
(`RewardModel(..., rewards_only=True)` at several positions, `RewardScorer.score_steps`), equals the reward of the same token
prefix scored on its own; their aggregates drive `eval bon --aggregate`; normalization by the
checkpoint's reward stats (`score --calibrate`, `--normalize`)."""
from __future__ import annotations

import json
import pathlib
import sysconfig

import flax.linen as nn
import jax
import numpy as np
import pytest

from codepmp_jax import checkpoint, cli, score
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.eval import __main__ as eval_main
from codepmp_jax.eval import bon
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset

SOLUTIONS = [
    "Tom has 3 apples.\n\nHe buys 4 more, so 3 + 4 = 7.\n\nThe answer is 7.",
    "3 * 4 = 12\n\n12 - 5 = 7\n\n\n\nSo the answer is: 7",
    "One step only, no delimiter.",
    "x = 2.\n\n\n\ny = x + 1 = 3.\n\n",  # empty pieces between delimiters; a trailing delimiter
    "",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("steps")
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
  tokenizer = train_sentencepiece(files, vocab_size=400, out_prefix=root / "sp")
  config = get_preset("tiny", vocab_size=400, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
  params = nn.unbox(transformer.init_params(config, jax.random.key(3)))
  return checkpoint.save_model(root / "ckpt", params, config, tokenizer, prompt_format="math")


@pytest.fixture(scope="module")
def scorer(ckpt):
  return score.RewardScorer(ckpt, batch_size=4, max_length=64, show_progress=False)


def test_split_steps_and_aggregates():
  text = "a\n\nbb \n\n\n\nccc\n\n"
  ends = bon.split_steps(text)
  assert [text[:e] for e in ends[:-1]] == ["a", "a\n\nbb"] and ends[-1] == len(text)
  assert bon.split_steps("one") == [3] and bon.split_steps("") == [0]
  assert bon.split_steps("a ки b ки", " ки") == [1, len("a ки b ки")]
  r = [0.5, -1.0, 2.0]
  assert [bon.aggregate_steps(r, how) for how in ("min", "max", "sum", "mean", "last")] == [
      -1.0, 2.0, 1.5, 0.5, 2.0]
  sigmoid = 1 / (1 + np.exp(-np.asarray(r)))
  assert bon.aggregate_steps(r, "product") == pytest.approx(float(np.prod(sigmoid)), rel=1e-12)
  assert bon.aggregate_steps([-800.0], "product") == 0.0  # no overflow warning, just 0
  with pytest.raises(ValueError, match="unknown step aggregate"):
    bon.aggregate_steps(r, "median")
  with pytest.raises(ValueError, match="non-empty"):
    bon.split_steps("a", "")


@pytest.mark.parametrize("scan", [False, True])
def test_rewards_at_positions_equal_prefix_rewards_of_the_model(scan):
  """Rewards at several positions of a row in one pass, the last layer at those positions only
  (`rewards_only`; scanned or not), against the full forward of each prefix alone."""
  config = get_preset("tiny", num_layers=3)
  params = nn.unbox(transformer.init_params(config, jax.random.key(5)))
  rng = np.random.default_rng(1)
  ids = rng.integers(1, config.vocab_size, (2, 24)).astype(np.int32)
  positions = np.array([[0, 7, 23], [3, 3, 11]], np.int32)
  scoring = config.replace(scan_layers=scan)
  layout = {**transformer.right_padded(np.array([24, 24]), 24), "reward_index": positions}
  got = jax.jit(lambda p, i: transformer.RewardModel(scoring).apply(
      {"params": p}, i, **layout, rewards_only=True).rewards)(
          transformer.stack_layers(params, config.num_layers) if scan else params, ids)
  # Each prefix alone in its own row (padding after it), the full forward, the last layer everywhere.
  prefixes = np.zeros((positions.size, 24), np.int32)
  for i, (row, p) in enumerate(np.ndindex(*positions.shape)):
    prefixes[i, :positions[row, p] + 1] = ids[row, :positions[row, p] + 1]
  expected = jax.jit(lambda p, i: transformer.RewardModel(config).apply(
      {"params": p}, i, **transformer.right_padded(positions.reshape(-1) + 1, 24, False)).rewards)(
          params, prefixes)
  np.testing.assert_allclose(got, np.asarray(expected).reshape(positions.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_step_rewards_equal_prefixes_scored_one_by_one_in_one_pass(scorer):
  prompts = [f"Question {i}: what is 3 + 4?" for i in range(len(SOLUTIONS))]
  before = scorer.forwarded["sequences"]
  steps = scorer.encode_steps(prompts, SOLUTIONS)
  step_rewards = scorer.score_steps(prompts, SOLUTIONS)
  # One forward pass (one row) per solution, however many steps.
  assert scorer.forwarded["sequences"] - before == len(SOLUTIONS)
  assert [s.steps for s in steps] == [3, 3, 1, 2, 1]
  assert [len(r) for r in step_rewards] == [3, 3, 1, 2, 1]
  # Each step's reward is the reward of the token prefix that ends at its last token, scored alone.
  prefixes = [s.sequence.ids[:p + 1] for s in steps for p in s.positions]
  one_by_one = [scorer.score_ids([prefix])[0] for prefix in prefixes]
  np.testing.assert_allclose(np.concatenate(step_rewards), one_by_one, rtol=1e-5, atol=1e-5)
  # The last step is read at the end token: the whole solution's reward.
  np.testing.assert_allclose([r[-1] for r in step_rewards], scorer.score_texts(prompts, SOLUTIONS),
                             rtol=1e-5, atol=1e-5)
  # A step ends at the token holding its last character.
  tok = scorer.tokenizer
  first = steps[0]
  assert tok.decode(first.sequence.ids[:first.positions[0] + 1]).endswith("3 apples.") or \
      tok.decode(first.sequence.ids[:first.positions[0] + 1]).rstrip().endswith("3 apples.")
  assert "He buys" not in tok.decode(first.sequence.ids[first.sequence.response_start:first.positions[0] + 1])


@pytest.mark.slow
def test_truncated_steps_are_left_out_and_counted(scorer):
  """keep_end cuts the start of a long response: its first steps lose their last tokens."""
  response = "\n\n".join(f"Step {i}: add {i} to the total, which is now {i * (i + 1) // 2}." for i in range(1, 9))
  (steps,) = scorer.encode_steps(["Sum 1..8."], [response])
  assert steps.sequence.response_cut > 0 and len(steps.sequence.ids) == scorer.max_length
  assert 0 < steps.steps_cut < steps.steps and len(steps.positions) == steps.steps - steps.steps_cut
  (rewards,) = scorer.score_positions([steps.sequence.ids], [steps.positions])
  expected = [scorer.score_ids([steps.sequence.ids[:p + 1]])[0] for p in steps.positions]
  np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-5)


def test_bad_positions_are_refused(scorer):
  with pytest.raises(ValueError, match="positions"):
    scorer.score_positions([[5, 6, 7]], [[3]])
  with pytest.raises(ValueError, match="positions"):
    scorer.score_positions([[5, 6, 7]], [[]])


@pytest.mark.slow
def test_calibrate_normalize_and_eval_bon_aggregate(ckpt, scorer, tmp_path, capsys):
  # score --calibrate stores mean/std (OpenRLHF's: ddof 1) of every sequence of the file.
  work = tmp_path / "ckpt"
  import shutil
  shutil.copytree(ckpt, work)
  data = tmp_path / "pairs.jsonl"
  records = [{"prompt": f"q{i}", "chosen": f"right {i}", "rejected": f"wrong {i * i}"} for i in range(6)]
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  cli.call(score.main, score.define_flags, [f"--checkpoint={work}", f"--calibrate={data}", "--max_length=64"])
  stats = checkpoint.load_reward_stats(work)
  raw = score.RewardScorer(work, batch_size=4, max_length=64, show_progress=False)
  rendered = [raw.encode(score.render_prompt(r, "math", "t"), r[side]).ids for r in records for side in ("chosen", "rejected")]
  rewards = raw.score_ids(rendered)
  assert stats["sequences"] == 12
  assert stats["mean"] == pytest.approx(float(rewards.mean()), abs=1e-6)
  assert stats["std"] == pytest.approx(float(rewards.std(ddof=1)), rel=1e-5)
  normalized = score.RewardScorer(work, batch_size=4, max_length=64, show_progress=False, normalize=True)
  np.testing.assert_allclose(normalized.score_ids(rendered), (rewards - stats["mean"]) / stats["std"],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no reward stats"):
    score.RewardScorer(ckpt, max_length=64, show_progress=False, normalize=True)

  # eval bon --aggregate: each candidate's reward is its step rewards' aggregate.
  candidates = tmp_path / "cand.jsonl"
  questions = [("a", "7", SOLUTIONS[:2] + ["The answer is 8."]), ("b", "3", [SOLUTIONS[3], "y = 4", "3"])]
  candidates.write_text("".join(json.dumps({"id": q, "question": "What?", "reference": ref, "candidates": c}) + "\n"
                                for q, ref, c in questions))
  saved = tmp_path / "scores.jsonl"
  out = tmp_path / "report.json"
  cli.call(eval_main.main, eval_main.define_flags, [
      "bon", f"--candidates={candidates}", f"--checkpoint={work}", "--task=gsm8k", "--n=1,2",
      "--aggregate=sum", "--normalize", "--max_length=64", "--batch_size=4", f"--save_scores={saved}",
      f"--out={out}"])
  report = json.loads(out.read_text())
  assert report["step_aggregate"] == {"aggregate": "sum", "delimiter": "\n\n"} and report["normalized"]
  assert report["truncation"]["sequences"] == 6
  from codepmp_jax.data import templates
  got = {json.loads(line)["id"]: json.loads(line)["rewards"] for line in saved.read_text().splitlines()}
  for qid, _, cands in questions:
    prompt = templates.render("math", question="What?")
    expected = [float(np.sum(r)) for r in normalized.score_steps([prompt] * len(cands), cands)]
    np.testing.assert_allclose(got[qid], expected, rtol=1e-5, atol=1e-5)
  capsys.readouterr()


@pytest.mark.slow
def test_reward_stats_round_trip_through_hf_export_and_transformers(ckpt, tmp_path):
  """convert --to_hf puts the stats in config.json (`mean`, `std`: where OpenRLHF's reward model
  reads them), transformers loads them with the model, convert --from_hf brings them back."""
  import shutil
  import subprocess
  import sys

  import torch
  import transformers
  work = tmp_path / "ckpt"
  shutil.copytree(ckpt, work)
  stats = checkpoint.save_reward_stats(work, mean=0.125, std=1.5, source="test")
  root = pathlib.Path(__file__).resolve().parents[1]

  def convert(*args):
    result = subprocess.run([sys.executable, "-m", "codepmp_jax.convert", *args], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

  convert(f"--to_hf={tmp_path / 'hf'}", f"--checkpoint={work}")
  model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  assert (model.config.mean, model.config.std) == (stats["mean"], stats["std"])
  assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").to_dict()["std"] == 1.5
  convert(f"--from_hf={tmp_path / 'hf'}", f"--output={tmp_path / 'back'}")
  back = checkpoint.load_reward_stats(tmp_path / "back")
  assert (back["mean"], back["std"]) == (0.125, 1.5)
  # A checkpoint without stats exports a config without them.
  convert(f"--to_hf={tmp_path / 'plain'}", f"--checkpoint={ckpt}")
  assert "mean" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_reward_stats_from_eval_pool_chosen_and_rejected():
  rng = np.random.default_rng(0)
  chosen, rejected = rng.normal(1.0, 2.0, 50), rng.normal(-0.5, 0.5, 50)
  metrics = {"eval/chosen_reward_mean": chosen.mean(), "eval/chosen_reward_std": chosen.std(),
             "eval/rejected_reward_mean": rejected.mean(), "eval/rejected_reward_std": rejected.std()}
  stats = checkpoint.reward_stats_from_eval(metrics, 7)
  both = np.concatenate([chosen, rejected])
  assert stats["mean"] == pytest.approx(both.mean()) and stats["std"] == pytest.approx(both.std())
  assert "step 7" in stats["source"]
  assert checkpoint.reward_stats_from_eval({"loss": 1.0}, 7) is None  # no evaluation logged


@pytest.mark.slow
def test_training_ends_by_storing_reward_stats_of_its_held_out_split(tmp_path):
  from codepmp_jax import train
  from codepmp_jax.config import default_config
  config = default_config()
  config.data.builtin.name = ""
  config.data.update(source="synthetic", vocab_size=256, synthetic_pairs=256)
  config.model.update(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1)
  config.train.update(global_batch=8, seq_len=32, total_steps=2, log_every=1, eval_every=2, eval_batches=2)
  config.mesh_shape = (-1, 1, 1)
  config.compilation_cache_dir = ""
  final = train.train(config, tmp_path / "run")
  stats = checkpoint.load_reward_stats(tmp_path / "run")
  assert stats == {**checkpoint.reward_stats_from_eval(final, 2), "source": "held-out split, training step 2"}
  # ... which scoring then normalizes with.
  scorer = score.RewardScorer(tmp_path / "run", batch_size=8, max_length=32, show_progress=False, normalize=True)
  raw = score.RewardScorer(tmp_path / "run", batch_size=8, max_length=32, show_progress=False)
  ids = [[5, 6, 7, 8], [9, 10]]
  np.testing.assert_allclose(scorer.score_ids(ids), (raw.score_ids(ids) - stats["mean"]) / stats["std"],
                             rtol=1e-5, atol=1e-5)
