"""model/frozen_trunk.py: the trunk's states run through the top layers give RewardModel's rewards
and final hidden states, and only the top layers and the score head receive gradients."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codepmp_jax.model import frozen_trunk, transformer
from codepmp_jax.model.config import get_preset


@pytest.mark.slow
def test_trunk_then_top_equals_the_whole_model():
  config = get_preset("tiny", vocab_size=97, num_layers=4)
  params = nn.unbox(transformer.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(0)
  lengths = np.array([9, 16, 3, 12])
  ids = rng.integers(1, 97, (4, 16)).astype(np.int32)
  mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
  ids = ids * mask  # right padding with 0
  whole = jax.jit(lambda p: transformer.RewardModel(config).apply(
      {"params": p}, ids, **transformer.right_padded(lengths, 16, False)))(params)
  lm_index = np.array([[0, 1], [5, 14], [1, 2], [10, 11]])
  for num_frozen in (0, 2, 3):
    trunk = jax.jit(lambda p, n=num_frozen: frozen_trunk.trunk_states(config, p, ids, n))
    states = trunk(params)
    np.testing.assert_allclose(trunk(transformer.stack_layers(params, num_frozen)), states, atol=1e-5)
    rewards = jax.jit(lambda p, s, n=num_frozen: frozen_trunk.top_rewards(
        config, p, s, jnp.asarray(lengths), n))(params, states)
    np.testing.assert_allclose(rewards, whole.rewards[:, 0], atol=1e-5)
    again, hidden = jax.jit(lambda p, s, n=num_frozen: frozen_trunk.top_lm_hidden(
        config, p, s, jnp.asarray(lengths), jnp.asarray(lm_index), n))(params, states)
    np.testing.assert_allclose(again, whole.rewards[:, 0], atol=1e-5)
    expected = np.take_along_axis(np.asarray(whole.hidden_states), lm_index[..., None], axis=1)
    np.testing.assert_allclose(hidden, expected, atol=1e-5)


def test_top_params_are_all_the_gradient_reaches():
  config = get_preset("tiny", vocab_size=97, num_layers=3)
  params = nn.unbox(transformer.init_params(config, jax.random.key(1)))
  ids = np.arange(1, 9, dtype=np.int32)[None].repeat(2, 0)
  states = jax.jit(lambda p, i: frozen_trunk.trunk_states(config, p, i, 2))(params, ids)
  top = frozen_trunk.top_params(params, config, 2)
  assert set(top) == {"layers_2", "final_norm", "score"}
  grads = jax.jit(jax.grad(lambda p: frozen_trunk.top_rewards(config, p, states, jnp.array([8, 5]), 2).sum()))(top)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
