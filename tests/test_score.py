"""Scoring: batched, bucketed, sharded rewards equal one-sequence-at-a-time forwards; the CLI's records.

Padding invariance itself is checked against transformers in test_model_hf_parity.py.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import sysconfig

import flax.linen as nn
import jax
import numpy as np
import pytest

from codepmp_jax import checkpoint, score
from codepmp_jax.data import templates
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
  """A random tiny model with a sentencepiece tokenizer, saved as a checkpoint."""
  root = tmp_path_factory.mktemp("score")
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
  tokenizer = train_sentencepiece(files, vocab_size=400, out_prefix=root / "sp")
  config = get_preset("tiny", vocab_size=400, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
  params = nn.unbox(transformer.init_params(config, jax.random.key(1)))
  return checkpoint.save_model(root / "ckpt", params, config, tokenizer)


@pytest.fixture(scope="module")
def scorer(ckpt):
  return score.RewardScorer(ckpt, batch_size=4, max_length=48, show_progress=False)


@pytest.fixture(scope="module")
def single(scorer):
  """One sequence at a time on one device, right-padded to `max_length` (one compile)."""
  model = transformer.RewardModel(scorer.config.replace(scan_layers=False))
  params = jax.device_get(transformer.unstack_layers(scorer.params))
  forward = jax.jit(lambda ids, length: model.apply(
      {"params": params}, ids, **transformer.right_padded(length, scorer.max_length, False)).rewards[0, 0])

  def reward(ids):
    padded = np.zeros((1, scorer.max_length), np.int32)
    padded[0, :len(ids)] = ids
    return float(forward(padded, np.array([len(ids)])))
  return reward


@pytest.mark.slow
def test_score_ids_equals_unbatched_forward(scorer, single):
  rng = np.random.default_rng(0)
  sequences = [rng.integers(3, 400, n).tolist() for n in (5, 48, 17, 1, 33, 9, 16, 40, 2, 21)]
  rewards = scorer.score_ids(sequences)
  expected = [single(s) for s in sequences]
  assert rewards.dtype == np.float32 and np.std(expected) > 1e-3
  np.testing.assert_allclose(rewards, expected, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="sequence 0 has 49 tokens"):
    scorer.score_ids([[3] * 49])


def test_score_texts_reads_reward_at_end_token(scorer, single):
  prompts = ["def f(x):\n", "Instruction:What is 2+2?\n\nResponse:"]
  responses = ["    return x\n", " 4" * 40]  # the second is cut to max_length, keeping the end token
  rewards = scorer.score_texts(prompts, responses)
  tok = scorer.tokenizer
  first = tok.encode(prompts[0] + responses[0]) + [tok.eos_id]  # one text, as transformers tokenizes it
  cut = scorer.encode(prompts[1], responses[1])
  ids = list(cut.ids)
  assert scorer.truncation == "keep_end"  # the checkpoint records none: the default
  assert cut.prompt_cut and cut.response_cut and len(ids) == 48 and ids[-1] == tok.eos_id
  assert tok.decode(ids[:-1]) == tok.decode(tok.encode(responses[1])[-47:])  # the response's end
  np.testing.assert_allclose(rewards, [single(first), single(ids)], atol=1e-5)


@pytest.mark.slow
def test_cli_scores_every_record_kind_and_reports_bad_lines(ckpt, scorer, single, tmp_path):
  templates.save_prompt_format(ckpt, "math")  # the checkpoint's prompt format is the default
  lines = [
      json.dumps({"input_ids": [5, 6, 7], "id": "a"}),
      json.dumps({"text": "import os\n"}),
      json.dumps({"prompt": "2+2?", "response": " 4"}),
      "{not json",
      json.dumps({"prompt": "Add.", "chosen": "a + b", "rejected": "a - b", "meta": {"k": 1}}),
      json.dumps({"prompt": "x", "answer": "no response field"}),
      "",
      json.dumps({"input_ids": [1, 999]}),
      '{"prompt": "x", "response": "lone \\ud800 surrogate"}',  # valid JSON, not Unicode text
  ]
  src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("\n".join(lines) + "\n")
  result = subprocess.run(
      [sys.executable, "-m", "codepmp_jax.score", f"--checkpoint={ckpt}", f"--input={src}",
       f"--output={out}", "--batch_size=8", "--max_length=64"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{src}:4: invalid JSON" in result.stderr
  assert f"{src}:6: expected 'input_ids'" in result.stderr
  assert f"{src}:8: field 'input_ids' has ids outside 0..399" in result.stderr
  assert f"{src}:9: field 'response' is not Unicode text (surrogates not allowed" in result.stderr
  assert "scored 4 records (5 sequences" in result.stdout and "4 bad lines" in result.stdout
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r.get("id") for r in rows] == ["a", None, None, None]
  assert rows[3]["meta"] == {"k": 1}
  tok = scorer.tokenizer
  math = templates.render("math", question="2+2?")
  expected = [
      single([5, 6, 7]),
      single(tok.encode("import os\n") + [tok.eos_id]),
      single(tok.encode(math + " 4") + [tok.eos_id]),
  ]
  got = [rows[0]["reward"], rows[1]["reward"], rows[2]["reward"]]
  np.testing.assert_allclose(got, expected, atol=1e-5)
  prompt = templates.render("math", question="Add.")
  np.testing.assert_allclose(
      [rows[3]["chosen_reward"], rows[3]["rejected_reward"]],
      [single(tok.encode(prompt + s) + [tok.eos_id]) for s in ("a + b", "a - b")], atol=1e-5)
