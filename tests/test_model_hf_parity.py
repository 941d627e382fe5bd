"""Our converted models compute what transformers computes: tiny random models and the real SmolLM2 GGUF."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from codepmp_jax import convert
from codepmp_jax.data import tokenizer as tok_lib
from codepmp_jax.model import transformer
from codepmp_jax.model.transformer import RewardModel
from tests import hf_models

LENGTHS = [9, 6, 3]  # right-padded batch of different lengths


def _ours(params, config, ids, mask):
  out = RewardModel(config).apply({"params": params}, jnp.asarray(ids),
                                  **transformer.right_padded(mask.sum(-1), ids.shape[1]), return_logits=True)
  return np.asarray(out.logits), np.asarray(out.rewards[:, 0])


# The fast tier keeps one model of each family (Llama, Qwen2, Mistral, a score head); the rest are slow.
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow)
    if name in ("llama_llama3_rope", "qwen2_untied", "llama_seqcls") else name
    for name in sorted(hf_models.TINY_MODELS)])
def test_tiny_model_matches_transformers(name, tmp_path):
  hf = hf_models.tiny_hf_model(name, tmp_path)
  params, config = convert.load_hf(tmp_path, seed=3)
  ids, mask = hf_models.padded_batch(LENGTHS, config.vocab_size)
  logits, rewards = _ours(params, config, ids, mask)
  real = mask.astype(bool)
  with torch.no_grad():
    t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    if name.endswith("seqcls"):
      expected_rewards = hf(input_ids=t_ids, attention_mask=t_mask).logits[:, 0].numpy()
      hidden = hf.model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.numpy()
      expected_logits = hidden @ hf.model.embed_tokens.weight.numpy().T  # tied LM head on import
    else:
      expected_logits = hf(input_ids=t_ids, attention_mask=t_mask).logits.numpy()
      hidden = hf.model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.numpy()
      last = hidden[np.arange(len(LENGTHS)), mask.sum(1) - 1]
      expected_rewards = last @ np.asarray(params["score"]["kernel"])[:, 0]
  assert np.abs(expected_logits).max() > 1.0  # the check is not vacuous
  np.testing.assert_allclose(logits[real], expected_logits[real], atol=1e-4, rtol=0)
  np.testing.assert_allclose(rewards, expected_rewards, atol=1e-4, rtol=0)
  assert config.tie_word_embeddings == ("lm_head" not in params)
  # Scoring's forward: the layers scanned, the last at the reward token only.
  scanned = config.replace(scan_layers=True)
  scored = RewardModel(scanned).apply(
      {"params": transformer.stack_layers(params, config.num_layers)}, jnp.asarray(ids),
      **transformer.right_padded(mask.sum(-1), ids.shape[1]), rewards_only=True).rewards[:, 0]
  np.testing.assert_allclose(np.asarray(scored), expected_rewards, atol=1e-4, rtol=0)


def test_converted_config_follows_hf(tmp_path):
  hf_models.tiny_hf_model("llama_llama3_rope", tmp_path / "l3")
  _, config = convert.load_hf(tmp_path / "l3")
  assert config.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
  hf_models.tiny_hf_model("qwen2_untied", tmp_path / "q")
  _, config = convert.load_hf(tmp_path / "q")
  assert (config.architecture, config.qkv_bias, config.tie_word_embeddings) == ("qwen2", True, False)
  hf_models.tiny_hf_model("mistral", tmp_path / "m")
  _, config = convert.load_hf(tmp_path / "m")
  assert (config.sliding_window, config.resolved_head_dim) == (4, 16)


@pytest.mark.parametrize("name", ["llama", "llama_llama3_rope"])
def test_rope_tables_match_transformers(name, tmp_path):
  """cos and sin as transformers' rotary embedding gives them, whether looked up in tables built
  at trace time (numpy positions, or packed rows' positions restarting per segment under jit) or
  computed in the program (decoding)."""
  hf = hf_models.tiny_hf_model(name, tmp_path)
  _, config = convert.load_hf(tmp_path)
  positions = np.concatenate([np.arange(40), np.arange(24)])[None]  # two packed segments
  with torch.no_grad():
    expected = [t.numpy() for t in hf.model.rotary_emb(torch.zeros(1, 64, 32), torch.from_numpy(positions))]
  looked_up = jax.jit(lambda p: transformer.rope_tables(config, p, 64))(jnp.asarray(positions))
  computed = jax.jit(lambda p: transformer.rope_tables(config, p))(jnp.asarray(positions))
  for ours in (transformer.rope_tables(config, positions, 64), looked_up, computed):
    for got, want in zip(ours, expected):
      np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------- SmolLM2-135M GGUF

@pytest.fixture(scope="module")
def smollm2():
  """Our conversion and transformers' reading of the real SmolLM2-135M-Instruct Q4_1 GGUF."""
  path = hf_models.smollm2_gguf_path()
  params, config, tokenizer = convert.load_gguf(path)
  return params, config, tokenizer, hf_models.transformers_from_gguf(path)


def _scanned_forward(params, config):
  """A jitted logits + rewards function over the layers stacked for nn.scan (one layer to compile)."""
  scanned = config.replace(scan_layers=True)
  stacked = transformer.stack_layers(params, config.num_layers)
  return jax.jit(lambda ids, mask: RewardModel(scanned).apply(
      {"params": stacked}, ids, **transformer.right_padded(mask.sum(-1), ids.shape[1]),
      return_logits=True))


def _prompt_ids(tokenizer, shared_data) -> list[int]:
  question = json.loads((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[0])["question"]
  text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
  return tokenizer.encode(text)


@pytest.mark.slow
def test_smollm2_config(smollm2):
  _, config, tokenizer, _ = smollm2
  assert (config.architecture, config.num_layers, config.hidden_size, config.num_heads,
          config.num_kv_heads, config.vocab_size, config.tie_word_embeddings) == (
              "llama", 30, 576, 9, 3, 49152, True)
  assert config.rope_theta == 100000.0 and abs(config.rms_norm_eps - 1e-5) < 1e-9
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)


@pytest.mark.slow
def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2, shared_data):
  params, config, tokenizer, hf = smollm2
  prompt = _prompt_ids(tokenizer, shared_data)
  steps = 10
  length = len(prompt) + steps
  forward = _scanned_forward(params, config)

  ids = np.zeros((1, length), np.int32)
  ids[0, :len(prompt)] = prompt
  mask = (np.arange(length) < len(prompt)).astype(np.int32)[None]
  ours = np.asarray(forward(ids, mask).logits)[0, :len(prompt)]
  with torch.no_grad():
    theirs = hf(torch.tensor([prompt])).logits[0].numpy()
  assert np.abs(theirs).max() > 5
  np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)

  ours_tokens = list(prompt)  # greedy, recomputing the whole sequence each step
  for _ in range(steps):
    n = len(ours_tokens)
    ids[0, :n] = ours_tokens
    mask[0, :n] = 1
    ours_tokens.append(int(np.argmax(np.asarray(forward(ids, mask).logits)[0, n - 1])))
  with torch.no_grad():  # transformers' own greedy decoding (with its KV cache)
    theirs_tokens = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=steps, do_sample=False, eos_token_id=None)[0].tolist()
  assert len(theirs_tokens) == length
  assert ours_tokens == theirs_tokens, (tokenizer.decode(ours_tokens[len(prompt):]),
                                        tokenizer.decode(theirs_tokens[len(prompt):]))


@pytest.mark.slow
def test_smollm2_export_scores_like_ours_in_transformers(smollm2, shared_data, tmp_path):
  import transformers
  params, config, tokenizer, _ = smollm2
  # Two of the 30 layers keep this fast; the full export path is checked on tiny models in test_convert.
  config = config.replace(num_layers=2)
  params = {k: v for k, v in params.items() if not k.startswith("layers_") or k in ("layers_0", "layers_1")}
  out = convert.save_hf(tmp_path / "hf", params, config, tokenizer)
  exported = json.loads((out / "config.json").read_text())
  assert exported["pad_token_id"] == 0 != tokenizer.eos_id  # HF must read the reward at the eos
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  texts = ["def add(a, b):\n    return a + b\n", "Natalia sold clips to 48 of her friends."]
  batch = hf_tokenizer([t + "<|im_end|>" for t in texts], padding=True, return_tensors="np")
  assert batch["input_ids"][1].tolist()[:len(tokenizer.encode(texts[1]))] == tokenizer.encode(texts[1])
  ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
  ours = np.asarray(_scanned_forward(params, config)(ids, mask).rewards[:, 0])
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits[:, 0]
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)
  assert tok_lib.load_tokenizer(out).fingerprint == tokenizer.fingerprint
