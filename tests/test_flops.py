"""Parameter and FLOP counts against a hand count, the real parameter tree, transformers and XLA."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from codepmp_jax.model import config as model_config
from codepmp_jax.model import flops
from codepmp_jax.model import transformer


def test_tiny_hand_count():
  cfg = model_config.get_preset("tiny")
  # tiny: vocab 256, hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads, head_dim 16, untied.
  embed = 256 * 64                  # 16384
  q_proj = 64 * (4 * 16)            # 4096
  k_proj = 64 * (2 * 16)            # 2048
  v_proj = 64 * (2 * 16)            # 2048
  o_proj = (4 * 16) * 64            # 4096
  mlp = 3 * 64 * 128                # 24576 (gate, up, down)
  norms = 2 * 64                    # input_norm, post_attn_norm
  layer = q_proj + k_proj + v_proj + o_proj + mlp + norms  # 36992
  final_norm = 64
  lm_head = 64 * 256                # 16384
  score = 64 * 1
  assert layer == 36992
  assert flops.count_params(cfg) == embed + 2 * layer + final_norm + lm_head + score == 106880

  seq_len = 128
  matmul = 2 * (q_proj + k_proj + v_proj + o_proj + mlp) + lm_head + score  # 90176
  attention = 2 * 2 * seq_len * 4 * 16  # QK^T and AV: 2 * seq * heads * head_dim each, per layer
  assert matmul == 90176
  assert flops.flops_per_token(cfg, seq_len) == 6 * matmul + 3 * 2 * attention == 737664
  assert flops.flops_per_token(cfg, seq_len, training=False) == 2 * matmul + 2 * attention
  assert flops.flops_per_token(cfg, seq_len, lm_head=False) == 6 * (matmul - lm_head) + 6 * attention


def test_packed_step_flops_by_hand_and_as_the_padded_step():
  cfg = model_config.get_preset("tiny")
  dense = flops.flops_per_token(cfg, 0, lm_head=False)
  attention = 6 * 2 * 2 * 30 * 4 * 16  # per token at 30 tokens of context, forward and backward
  head = 6 * 64 * 256
  assert flops.packed_step_flops(cfg, 3, 100, 20, 4, 30, lm_loss=True) == (
      3 * 100 * dense + 3 * 4 * 30 * attention + 3 * 20 * head)
  assert flops.packed_step_flops(cfg, 3, 100, 20, 4, 30, lm_loss=False) == (
      3 * 100 * dense + 3 * 4 * 30 * attention)
  # One pair a row, each sequence filling its slot and every chosen token a target: the padded step.
  assert flops.packed_step_flops(cfg, 8, 2 * 128, 128, 2, 128, lm_loss=True) == (
      flops.pair_step_flops(cfg, 8, 128, lm_loss=True))


VARIANTS = [
    {},
    {"tie_word_embeddings": True},
    {"qkv_bias": True, "architecture": "qwen2"},
    {"head_dim": 8, "num_kv_heads": 4, "num_layers": 3},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_count_params_equals_parameter_tree(overrides):
  cfg = model_config.get_preset("tiny", **overrides)
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(
      lambda: transformer.RewardModel(cfg).init(jax.random.key(0), ids,
                                                **transformer.right_padded(jnp.array([4]), 4)))
  sizes = [np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])]
  assert flops.count_params(cfg) == sum(sizes)


@pytest.mark.parametrize("name", ["smollm2_135m", "qwen2_0_5b", "qwen2_7b"])
def test_count_params_equals_transformers(name):
  cfg = model_config.get_preset(name)
  hf_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[cfg.architecture]
  hf_cfg = hf_class(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, tie_word_embeddings=cfg.tie_word_embeddings, num_labels=1)
  model_class = {"llama": transformers.LlamaForSequenceClassification,
                 "qwen2": transformers.Qwen2ForSequenceClassification}[cfg.architecture]
  with torch.device("meta"):
    hf_count = model_class(hf_cfg).num_parameters()
  # Sequence classification models have no LM head; ours has one unless tied to the embedding.
  lm_head = 0 if cfg.tie_word_embeddings else cfg.hidden_size * cfg.vocab_size
  assert flops.count_params(cfg) == hf_count + lm_head


def _xla_flops(fn, params) -> float:
  analysis = jax.jit(fn).lower(params).compile().cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def test_flops_close_to_xla_cost_analysis():
  # A shape where matmuls dominate. XLA counts the forward's elementwise work too (ours is ~0.6%
  # lower); for training it skips a few backward matmuls it can prove unneeded (ours ~3% higher).
  cfg = model_config.get_preset("tiny", vocab_size=1024, hidden_size=256, intermediate_size=1024,
                                num_heads=8, num_kv_heads=4)
  batch, seq_len = 2, 64
  ids = jnp.zeros((batch, seq_len), jnp.int32)
  model = transformer.RewardModel(cfg)
  layout = transformer.right_padded(jnp.full((batch,), seq_len), seq_len, False)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, **layout))["params"]

  def forward(p):
    out = model.apply({"params": p}, ids, **layout, return_logits=True)
    return out.logits.sum() + out.rewards.sum()

  tokens = batch * seq_len
  ours = flops.flops_per_token(cfg, seq_len, training=False) * tokens
  assert ours <= _xla_flops(forward, params) <= 1.05 * ours
  ours = flops.flops_per_token(cfg, seq_len) * tokens
  assert 0.9 * ours <= _xla_flops(jax.grad(forward), params) <= 1.1 * ours
