"""Generation: the KV-cache path against full recomputation, greedy decoding against transformers'
`generate`, the sampling filters against transformers' logits warpers and hand-computed nuclei."""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from codepmp_jax import convert, sharding
from codepmp_jax.model import generate, transformer
from codepmp_jax.model.config import get_preset
from tests import hf_models

NEW_TOKENS = 32


def _tiny_params(config):
  return nn.unbox(transformer.init_params(config, jax.random.key(0)))


@pytest.mark.parametrize("overrides", [
    {}, {"sliding_window": 3},
    pytest.param({"scan_layers": True, "qkv_bias": True, "tie_word_embeddings": True}, marks=pytest.mark.slow)])
def test_cache_logits_equal_full_recompute(overrides):
  """Prefill a right-padded batch, then feed one token per row: every step's logits match a
  forward pass over the whole sequence without a cache."""
  config = get_preset("tiny", **overrides)
  params = _tiny_params(config)
  model = transformer.RewardModel(config)
  full_forward = jax.jit(lambda ids: model.apply(
      {"params": params}, ids, **transformer.right_padded(jnp.full(ids.shape[:1], ids.shape[1]), ids.shape[1]),
      return_logits=True).logits)
  decode = jax.jit(lambda cache, ids, last, positions: model.apply(
      {"params": params, "cache": cache}, ids, None, positions, last, return_logits=True,
      decode=True, mutable=["cache"]))
  rng = np.random.default_rng(0)
  lengths, steps, prompt_len = np.array([5, 2, 7]), 6, 7
  sequences = rng.integers(1, config.vocab_size, (3, prompt_len + steps)).astype(np.int32)
  rows = np.arange(3)
  full = np.asarray(full_forward(sequences))

  ids = np.where(np.arange(prompt_len)[None] < lengths[:, None], sequences[:, :prompt_len], 0)
  cache = nn.unbox(transformer.init_cache(config, 3, prompt_len + steps))
  out, variables = decode(cache, ids, (lengths - 1)[:, None], np.broadcast_to(np.arange(prompt_len), ids.shape))
  np.testing.assert_allclose(out.logits[:, 0], full[rows, lengths - 1], atol=1e-4, rtol=0)
  for step in range(steps):
    positions = lengths + step
    token = sequences[rows, positions][:, None]
    out, variables = decode(variables["cache"], token, np.zeros_like(token), positions[:, None])
    np.testing.assert_allclose(out.logits[:, 0], full[rows, positions], atol=1e-4, rtol=0)
  assert np.abs(full).max() > 0.1  # not vacuous


def _hf_greedy(hf, prompts: list[list[int]], eos_id: int, pad_id: int) -> list[list[int]]:
  """transformers' greedy continuations of a batch (left-padded, as it requires), each cut
  before its end token."""
  longest = max(map(len, prompts))
  ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # OpenMP spinning costs ~10x the CPU on a shared machine
  try:
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                        eos_token_id=eos_id, pad_token_id=pad_id)[:, longest:].tolist()
  finally:
    torch.set_num_threads(threads)
  return [row[:row.index(eos_id)] if eos_id in row else row for row in out]


@pytest.mark.parametrize("name", ["llama", pytest.param("qwen2_untied", marks=pytest.mark.slow)])
def test_greedy_equals_transformers_generate(name, tmp_path):
  hf = hf_models.tiny_hf_model(name, tmp_path)
  params, config = convert.load_hf(tmp_path)
  ids, mask = hf_models.padded_batch([7, 3, 12], config.vocab_size, seed=1)
  prompts = [row[m > 0].tolist() for row, m in zip(ids, mask)]
  expected = _hf_greedy(hf, prompts, config.eos_token_id, config.pad_token_id)
  gen = generate.Generator(params, config, min_prompt_bucket=16)
  results = gen.generate(prompts, generate.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0))
  for completions, want in zip(results, expected):
    assert completions[0].tokens == want
    assert completions[0].finish_reason == ("length" if len(want) == NEW_TOKENS else "eos")


@pytest.mark.slow
def test_smollm2_greedy_batch_equals_transformers(shared_data, tmp_path):
  """The real SmolLM2-135M: two GSM8K prompts of different lengths in one batch.

  transformers runs the same dequantized weights (exported with `convert.save_hf`; the
  conversion itself is checked against transformers' own GGUF reader in test_model_hf_parity).
  """
  import transformers
  params, config, tokenizer = convert.load_gguf(hf_models.smollm2_gguf_path())
  exported = convert.save_hf(tmp_path, params, config, tokenizer)
  hf = transformers.LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  assert config.tie_word_embeddings  # so the exported classifier's embedding is the LM head
  lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()
  texts = [f"<|im_start|>user\n{json.loads(lines[i])['question']}<|im_end|>\n<|im_start|>assistant\n"
           for i in (0, 3)]
  prompts = tokenizer.encode_batch(texts)
  assert len(prompts[0]) != len(prompts[1])
  expected = _hf_greedy(hf, prompts, tokenizer.eos_id, tokenizer.pad_id)
  gen = generate.Generator(params, config.replace(scan_layers=True), tokenizer=tokenizer)  # fast compile
  results = gen.generate(prompts, generate.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0))
  for completions, want in zip(results, expected):
    assert completions[0].tokens == want, (completions[0].text, tokenizer.decode(want))
    assert completions[0].text == hf_tokenizer.decode(want, skip_special_tokens=True)
  assert any(len(w) > 10 for w in expected)


@pytest.fixture(scope="module")
def tiny_generator():
  config = get_preset("tiny", eos_token_id=2, pad_token_id=0)
  return generate.Generator(_tiny_params(config), config, min_prompt_bucket=8), config


PROMPTS = [[5, 9, 14, 3], [7, 8], [11, 12, 13, 14, 15, 16]]


def test_same_seed_same_samples_and_batch_independence(tiny_generator):
  gen, _ = tiny_generator
  sampling = generate.SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, n=3, seed=7)
  first = gen.generate(PROMPTS, sampling, prompt_ids=[10, 11, 12])
  again = gen.generate(PROMPTS, sampling, prompt_ids=[10, 11, 12])
  assert first == again
  other_seed = gen.generate(PROMPTS, dataclasses.replace(sampling, seed=8), prompt_ids=[10, 11, 12])
  assert [c.tokens for c in first[0]] != [c.tokens for c in other_seed[0]]
  assert len({tuple(c.tokens) for c in first[0]}) == 3  # the n samples differ
  # A prompt's samples depend on its id, not on where it sits in the batch.
  reordered = gen.generate(PROMPTS[::-1], sampling, prompt_ids=[12, 11, 10])
  assert reordered[::-1] == first


@pytest.mark.slow
def test_top_k_1_is_greedy_and_sharding_changes_nothing(tiny_generator):
  gen, config = tiny_generator
  sampling = generate.SamplingConfig(max_new_tokens=8, temperature=0.0)
  expected = gen.generate(PROMPTS, sampling)
  top1 = generate.SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=1, n=2, seed=3)
  assert [[c.tokens for c in cs] for cs in gen.generate(PROMPTS, top1)] == [
      [e[0].tokens] * 2 for e in expected]
  mesh = sharding.make_mesh((4, 1, 2))
  sharded = generate.Generator(gen.params, config, mesh=mesh, min_prompt_bucket=8)
  assert sharded.generate(PROMPTS, sampling) == expected
  cache_spec = sharding.logical_sharding(
      nn.get_partition_spec(transformer.init_cache(config, 4, 8)), mesh, sharding.DEFAULT_RULES)
  assert cache_spec["layers_0"]["attn"]["key"].spec == jax.sharding.PartitionSpec(
      ("data", "fsdp"), "tensor", None, None)


def test_top_p_keeps_exactly_the_nucleus():
  probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])
  logits = jnp.log(jnp.asarray(probs))[None]
  kept = lambda p: set(np.flatnonzero(np.isfinite(generate.filter_logits(logits, top_p=p)[0])))  # noqa: E731
  assert kept(0.5) == {1}  # 0.5 alone reaches 0.5
  assert kept(0.51) == {1, 3}
  assert kept(0.8) == {1, 3, 4}  # 0.5 + 0.2 < 0.8 <= 0.85
  assert kept(0.86) == {1, 3, 4, 2}
  assert kept(1.0) == {0, 1, 2, 3, 4}
  assert set(np.flatnonzero(np.isfinite(generate.filter_logits(logits, top_k=2)[0]))) == {1, 3}


@pytest.mark.parametrize("top_k,top_p", [(0, 0.7), (5, 1.0), (20, 0.9)])
def test_filters_match_transformers_warpers(top_k, top_p):
  from transformers.generation import logits_process as lp
  logits = np.random.default_rng(3).normal(0, 2, (4, 50)).astype(np.float32)
  ours = np.asarray(generate.filter_logits(jnp.asarray(logits), top_k, top_p))
  scores = torch.from_numpy(logits)
  if top_k:
    scores = lp.TopKLogitsWarper(top_k)(None, scores)
  if top_p < 1:
    scores = lp.TopPLogitsWarper(top_p)(None, scores)
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(scores.numpy()))
  np.testing.assert_array_equal(ours[np.isfinite(ours)], logits[np.isfinite(ours)])


def test_sampling_frequencies_follow_the_tempered_nucleus():
  logits = jnp.log(jnp.asarray([0.05, 0.5, 0.1, 0.2, 0.15]))
  draws = 20000
  keys = jax.random.split(jax.random.key(0), draws)
  tokens = generate.sample_tokens(jnp.broadcast_to(logits, (draws, 5)), keys, 2.0, top_p=0.8)
  freq = np.bincount(np.asarray(tokens), minlength=5) / draws
  # Temperature 2 first: p ** 0.5 renormalized = [.107, .340, .152, .215, .186]; its 0.8-nucleus
  # is {1, 3, 4, 2} (mass before token 2: .741 < .8), renormalized again.
  tempered = np.array([0.05, 0.5, 0.1, 0.2, 0.15]) ** 0.5
  expected = np.where(np.arange(5) == 0, 0.0, tempered)
  expected /= expected.sum()
  np.testing.assert_allclose(freq, expected, atol=0.015)
  greedy = generate.sample_tokens(jnp.broadcast_to(logits, (3, 5)), keys[:3], 0.0)
  assert np.asarray(greedy).tolist() == [1, 1, 1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, shared_data):
  """A random tiny model saved with a sentencepiece tokenizer trained on GSM8K questions."""
  from codepmp_jax import checkpoint
  from codepmp_jax.data.tokenizer import train_sentencepiece
  tmp_path = tmp_path_factory.mktemp("tiny_checkpoint")
  questions = [json.loads(line)["question"]
               for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:40]]
  tokenizer = train_sentencepiece(questions, 400, tmp_path / "spm")
  config = get_preset("tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                      pad_token_id=tokenizer.pad_id)
  return checkpoint.save_model(tmp_path / "ckpt", _tiny_params(config), config, tokenizer), questions


@pytest.mark.slow
def test_synthesis_backend_completes_prompts_in_order(tiny_checkpoint):
  from codepmp_jax.synth.jax_backend import JaxBackend
  ckpt, questions = tiny_checkpoint
  backend = JaxBackend.from_checkpoint(ckpt, batch_size=2)  # prompts over 8 devices
  prompts = [questions[0], "def add(a, b):", questions[1]]
  texts = backend.generate(prompts, temperature=0.0, top_p=1.0, max_tokens=5)
  expected = backend.generator.generate_text(
      prompts, generate.SamplingConfig(max_new_tokens=5, temperature=0.0))
  assert texts == [c[0].text for c in expected]
  assert all(isinstance(t, str) for t in texts) and any(texts)
  sampled = lambda: backend.generate(prompts[:2], temperature=1.0, top_p=0.9, max_tokens=5)  # noqa: E731
  assert sampled() == sampled()  # seeded by the prompt text


@pytest.mark.slow
def test_cli_writes_candidates_and_resumes(tmp_path, tiny_checkpoint):
  """End to end on a tiny checkpoint: candidates per record, then a rerun after a lost tail
  completes the file with exactly the lines an uninterrupted run wrote."""
  import os
  import subprocess
  import sys

  ckpt, questions = tiny_checkpoint
  records = [{"id": "a", "question": questions[0], "reference": "18"},
             {"question": questions[1]}, {"id": 7, "question": questions[2]}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  out = tmp_path / "out.jsonl"
  command = [sys.executable, "-m", "codepmp_jax.sample_candidates", f"--checkpoint={ckpt}",
             f"--input={tmp_path / 'in.jsonl'}", f"--output={out}", "--n=3", "--temperature=1.0",
             "--max_new_tokens=6", "--template=gsm8k", "--batch_size=2"]

  env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device: the mesh is tested above, compiles faster

  def run():
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

  run()
  lines = out.read_text().splitlines()
  written = [json.loads(line) for line in lines]
  assert [r["id"] for r in written] == ["a", 2, 7]
  assert written[0]["reference"] == "18" and written[1]["question"] == questions[1]
  assert all(len(r["candidates"]) == 3 and len(r["finish_reasons"]) == 3 for r in written)
  assert all(isinstance(c, str) for r in written for c in r["candidates"])

  out.write_text(lines[0] + "\n")
  run()
  assert out.read_text().splitlines() == lines


def test_candidate_text_has_no_special_tokens_and_still_ends_at_eos_and_stops():
  """Decoded like transformers' skip_special_tokens=True, with a byte-level BPE that has chat markers."""
  import tokenizers
  from codepmp_jax.data.tokenizer import Tokenizer
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator(["Hello world STOP more after"] * 20, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = Tokenizer("hf", bpe.to_str().encode(), eos_id=bpe.token_to_id("<|endoftext|>"))
  config = get_preset("tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
  gen = generate.Generator(_tiny_params(config), config, tokenizer=tokenizer)
  marker = tokenizer.encode("<|im_start|>")
  assert len(marker) == 1 and marker[0] in tokenizer.special_ids()
  ids = tokenizer.encode("Hello") + marker + tokenizer.encode(" world")
  plain = gen._completion(np.array(ids + [tokenizer.eos_id] + tokenizer.encode(" after")),
                          generate.SamplingConfig())
  assert (plain.text, plain.finish_reason, plain.tokens) == ("Hello world", "eos", ids)
  stopped = gen._completion(np.array(ids + tokenizer.encode(" STOP more")),
                            generate.SamplingConfig(stop=("STOP",)))
  assert (stopped.text, stopped.finish_reason) == ("Hello world ", "stop")
