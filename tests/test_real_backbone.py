"""launch/experiments/real_backbone.py on a tiny random model: the cached trunk plus a top gives the
rewards `RewardScorer` gives the saved full model, training the top learns, and the experiment's
tables read the reports right."""
from __future__ import annotations

import pathlib
import random
import sysconfig

import flax.linen as nn
import jax
import numpy as np
import pytest

from codepmp_jax import checkpoint, score
from codepmp_jax.data.encode import encode_records
from codepmp_jax.data.records import PairRecord
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.model import frozen_trunk, transformer
from codepmp_jax.model.config import get_preset
from launch.experiments import real_backbone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("real_backbone")
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
  tokenizer = train_sentencepiece(files, vocab_size=400, out_prefix=root / "sp")
  config = get_preset("tiny", vocab_size=400, num_layers=3, eos_token_id=tokenizer.eos_id,
                      pad_token_id=tokenizer.pad_id)
  params = jax.device_get(nn.unbox(transformer.init_params(config, jax.random.key(2))))
  rng = random.Random(0)
  words = "value key index count total result name item data list".split()
  records = []
  for i in range(40):
    body = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
    records.append(PairRecord(f"def f{i}(x):\n", f"  return x + {body}\n", f"  return x - {body}\n"))
  pairs = encode_records(tokenizer, records, 64)
  return root, tokenizer, config, params, pairs


@pytest.mark.slow
def test_trunk_and_top_score_as_the_saved_model_does(tiny):
  root, tokenizer, config, params, pairs = tiny
  texts = [("Instruction:What is 2+2?\n\nResponse:", " 4"), ("def g():\n", "  pass\n" * 30)]
  collector = real_backbone.Collector(tokenizer, 48)
  encoded = collector.encode_texts(*zip(*texts))
  assert encoded[1].prompt_cut and encoded[1].response_cut  # cut like RewardScorer (keep_end)
  sequences = [s.ids for s in encoded] + [s.ids for p in pairs for s in (p.chosen, p.rejected)]
  trunk = real_backbone.Trunk(root / "trunk", config, params, 2, sequences)
  assert trunk.states.shape == (sum(len(s) for s in set(sequences)), config.hidden_size)
  again = real_backbone.Trunk(root / "trunk", config, params, 2, sequences)  # reused, not recomputed
  np.testing.assert_array_equal(again.states, trunk.states)

  top = frozen_trunk.top_params(params, config, 2)
  tuned, losses = real_backbone.train_top(
      trunk, params["embed"]["embedding"], top, pairs, steps=30, batch=8, lr=3e-3, schedule="cosine",
      warmup=0.0, weight_decay=0.0, rm_coef=1.0, lm_coef=1.0, seed=0, desc="test")
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  for name in ("embed", "layers_0", "layers_1"):
    assert name not in tuned  # the trunk never trains

  real_backbone._save_model(root / "rm", params, tuned, config, tokenizer)
  scorer = score.RewardScorer(root / "rm", batch_size=4, max_length=64, show_progress=False)
  assert scorer.truncation == "keep_end" and scorer.prompt_format == "math"
  ours = real_backbone.TopScorer(trunk, tokenizer, 48, tuned)
  np.testing.assert_allclose(ours.score_ids(sequences), scorer.score_ids(sequences), atol=1e-4)
  saved, _ = checkpoint.load_model(root / "rm")
  for name in ("embed", "layers_0", "layers_1"):  # frozen: bit-equal to the backbone's
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved[name]), params[name])


def test_summary_pairs_arms_over_the_same_items():
  def report(acc, per_item, bo):
    return {"gsm8k": {"accuracy": acc, "accuracy_tie_aware": acc, "ties": 0,
                      "per_item": {"id": ["a", "b", "c", "d"], "tie_aware": per_item}},
            "champ": {"questions": 2, "bon": {"2": {"rm": bo, "random": 0.5, "majority": 0.5, "oracle": 1.0,
                                                    "baselines": {"longest": 0.25}}},
                      "per_item": {"id": ["q1", "q2"], "rm@2": [bo, bo]}}}
  s = real_backbone.RealBackboneSettings(ks=(4,), seeds=(0, 1), bon_ns=(1, 2))
  runs = {}
  for seed in (0, 1):
    runs[f"base/k4/seed{seed}"] = report(0.5, [1, 0, 1, 0], 0.5)
    runs[f"lm_only/k4/seed{seed}"] = report(0.5, [1, 0, 1, 0], 0.5)
    runs[f"pmp/k4/seed{seed}"] = report(0.75, [1, 1, 1, 0], 0.75)
  zero = {arm: {"accuracy": 0.5, "accuracy_tie_aware": 0.5, "ties": 1, "ci95_tie_aware": [0.4, 0.6], "n": 4}
          for arm in real_backbone.ARMS}
  results = real_backbone.summarize(s, runs, zero, {arm: {"code_heldout_tie_aware": 0.5} for arm in real_backbone.ARMS},
                                    {arm: {"4": 1e-5} for arm in real_backbone.ARMS})
  diff = results["differences"]["4"]["pmp-base/gsm8k"]
  assert diff["difference"] == pytest.approx(0.25) and diff["n"] == 4  # item b: 1 vs 0
  assert results["differences"]["4"]["lm_only-base/gsm8k"]["difference"] == 0.0
  assert results["table"]["4"]["pmp"]["gsm8k_tie_aware"]["mean"] == 0.75
  results.update(truncation={"gsm8k_test": {"share": 0.0, "sequences": 8}})
  table = real_backbone.markdown(results)
  assert "| 4 | pmp-base | +25.0" in table and "longest 25.0" in table
