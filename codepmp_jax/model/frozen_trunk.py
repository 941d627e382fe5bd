"""A frozen trunk computed once, and the trainable top of the model run on its hidden states.

When the embedding and every layer below `num_frozen` are frozen and shared by several models
(the arms of an experiment all start from one backbone and train only their top layers and score
head, `train.trainable=top:N`), the hidden states after layer `num_frozen - 1` are the same for
every model. Computing them once (`trunk_states`) and running only the top layers per model
(`top_rewards`, `top_lm_hidden`) makes each model's training and scoring cost a fraction of the
full model's, and both equal `RewardModel`'s outputs (tests/test_frozen_trunk.py). Rows are
right-padded: under causal attention a real token never sees its row's padding.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codepmp_jax.model.config import ModelConfig
from codepmp_jax.model.transformer import DecoderLayer, _embed, _final_norm, _score_head, rope_tables


def _rope(config: ModelConfig, length: int) -> tuple[jax.Array, jax.Array]:
  return rope_tables(config, np.arange(length)[None], length)


def _layers(config: ModelConfig, params: dict, x: jax.Array, start: int, stop: int,
            query_index: jax.Array | None = None) -> jax.Array:
  """Layers `start .. stop - 1` on `x`; the last of them only at `query_index` [B, K] when given."""
  cos, sin = _rope(config, x.shape[1])
  layer = DecoderLayer(config)
  for i in range(start, stop):
    at = query_index if i == stop - 1 else None
    x = layer.apply({"params": params[f"layers_{i}"]}, x, cos, sin, query_index=at)[0]
  return x


def trunk_states(config: ModelConfig, params: dict, input_ids: jax.Array, num_frozen: int) -> jax.Array:
  """[B, L, D] hidden states after the embedding and layers 0 .. num_frozen - 1.

  Layers stacked under `layers` (`transformer.stack_layers(params, n)`) run under `lax.scan`, so
  a compile traces one layer, not all of them; the rest up to `num_frozen` follow unrolled.
  """
  x = nn.with_logical_constraint(_embed(config).apply({"params": params["embed"]}, input_ids),
                                 ("batch", "length", "act_embed"))
  if "layers" not in params:
    return _layers(config, params, x, 0, num_frozen)
  cos, sin = _rope(config, x.shape[1])
  layer = DecoderLayer(config)
  step = lambda x, layer_params: (layer.apply({"params": layer_params}, x, cos, sin)[0], None)  # noqa: E731
  x = jax.lax.scan(step, x, params["layers"])[0]
  return _layers(config, params, x, jax.tree.leaves(params["layers"])[0].shape[0], num_frozen)


def top_rewards(config: ModelConfig, params: dict, states: jax.Array, lengths: jax.Array,
                num_frozen: int) -> jax.Array:
  """[B] rewards at `lengths - 1` from the trunk's `states`: the top layers, the last of them
  only at each row's reward token (a reward needs nothing else of it)."""
  last = jnp.maximum(lengths - 1, 0)[:, None]
  return top_rewards_at(config, params, states, last, num_frozen)[:, 0]


def top_rewards_at(config: ModelConfig, params: dict, states: jax.Array, positions: jax.Array,
                   num_frozen: int) -> jax.Array:
  """[B, K] rewards at token `positions` [B, K] from the trunk's `states`: the top layers, the
  last of them only at those positions."""
  x = _layers(config, params, states, num_frozen, config.num_layers, query_index=positions)
  hidden = _final_norm(config).apply({"params": params["final_norm"]}, x)
  return _score_head(config).apply({"params": params["score"]}, hidden.astype(jnp.float32))[..., 0]


def top_lm_hidden(config: ModelConfig, params: dict, states: jax.Array, lengths: jax.Array,
                  lm_index: jax.Array, num_frozen: int) -> tuple[jax.Array, jax.Array]:
  """([B] rewards, [B, K, D] final hidden states at `lm_index`) from the trunk's `states`: what the
  reward and the LM loss read (`losses.chunked_cross_entropy` against the LM head). The last
  layer runs only at each row's reward token and its `lm_index` positions."""
  last = jnp.maximum(lengths - 1, 0)[:, None]
  x = _layers(config, params, states, num_frozen, config.num_layers,
              query_index=jnp.concatenate([last, lm_index], axis=1))
  hidden = _final_norm(config).apply({"params": params["final_norm"]}, x)
  rewards = _score_head(config).apply({"params": params["score"]}, hidden[:, 0].astype(jnp.float32))[..., 0]
  return rewards, hidden[:, 1:]


def top_params(params: dict, config: ModelConfig, num_frozen: int) -> dict:
  """The parameters the top reads and trains: layers num_frozen .. L-1, the final norm, the score
  head."""
  names = [f"layers_{i}" for i in range(num_frozen, config.num_layers)] + ["final_norm", "score"]
  return {name: params[name] for name in names}
