"""Parameter and FLOP counts from a `ModelConfig`, for MFU and memory planning.

FLOP convention (PaLM, Chowdhery et al. 2022, appendix B): per token, a matmul with an `[m, n]`
weight costs `2 m n` forward and twice that backward, so `6 N` for training over the `N` matmul
weights; attention scores and the weighted sum cost `4 * seq_len * num_heads * head_dim` per layer
forward, `12 * ...` for training. The causal mask does *not* halve attention (PaLM's choice; some
codebases halve it, so compare MFU only under one convention). Elementwise work (norms, RoPE,
softmax, SwiGLU gating, biases) is not counted. Embedding lookups are not matmuls; the LM head is
(also when tied), and so is the 1-wide score head.
"""
from __future__ import annotations

from codepmp_jax.model.config import ModelConfig


def _layer_matmul_params(config: ModelConfig) -> int:
  d, hd = config.hidden_size, config.resolved_head_dim
  q_out, kv_out = config.num_heads * hd, config.num_kv_heads * hd
  attention = d * q_out + 2 * d * kv_out + q_out * d
  mlp = 3 * d * config.intermediate_size
  return attention + mlp


def count_params(config: ModelConfig) -> int:
  """Number of parameters of the reward model's canonical tree (docs/contracts.md).

  Embedding, per layer two norm scales, q/k/v/o kernels (+ q/k/v biases with `qkv_bias`) and the
  SwiGLU kernels, the final norm, the LM head unless tied to the embedding, and the score head.
  """
  d, hd = config.hidden_size, config.resolved_head_dim
  per_layer = _layer_matmul_params(config) + 2 * d
  if config.qkv_bias:
    per_layer += (config.num_heads + 2 * config.num_kv_heads) * hd
  lm_head = 0 if config.tie_word_embeddings else d * config.vocab_size
  return config.vocab_size * d + config.num_layers * per_layer + d + lm_head + d


def flops_per_token(
    config: ModelConfig, seq_len: int, training: bool = True, lm_head: bool = True
) -> float:
  """Model FLOPs per token at sequence length `seq_len` (module docstring has the convention).

  Training counts forward and backward (`6 N + 12 layers * seq_len * heads * head_dim`),
  inference the forward only (`2 N + 4 ...`). `lm_head=False` leaves out the LM head, for steps
  that compute no logits (RM fine-tuning with lm_coef 0).
  """
  matmul_params = config.num_layers * _layer_matmul_params(config) + config.hidden_size
  if lm_head:
    matmul_params += config.hidden_size * config.vocab_size
  attention = 4 * config.num_layers * seq_len * config.num_heads * config.resolved_head_dim
  passes = 3 if training else 1
  return float(passes * (2 * matmul_params + attention))


def pair_step_flops(config: ModelConfig, pairs: int, seq_len: int, lm_loss: bool) -> float:
  """Model FLOPs of one training step on `pairs` pairs of `seq_len`-token sequences.

  Both sequences of a pair run through the model; the LM head runs on the chosen ones only, and
  only when the LM loss is on (the train step computes logits for nothing else).
  """
  tokens = 2 * pairs * seq_len
  body = flops_per_token(config, seq_len, lm_head=False)
  head = flops_per_token(config, seq_len, lm_head=True) - body
  return tokens * body + (tokens // 2) * head * lm_loss


def packed_step_flops(config: ModelConfig, rows: int, row_len: int, lm_slots: int,
                      sequence_slots: int, sequence_len: int, lm_loss: bool) -> float:
  """Model FLOPs of one training step on a packed batch (`data.packing`) of these shapes.

  The dense layers run on all `rows x row_len` positions, attention on the `sequence_slots`
  slots of `sequence_len` tokens per row (`attention.sequence_attention`), and the LM head on
  the `lm_slots` LM-target positions per row when the LM loss is on.
  """
  dense = flops_per_token(config, 0, lm_head=False)
  attention = flops_per_token(config, sequence_len, lm_head=False) - dense
  head = flops_per_token(config, 0, lm_head=True) - dense
  return (rows * row_len * dense + rows * sequence_slots * sequence_len * attention
          + rows * lm_slots * head * lm_loss)
