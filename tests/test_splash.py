"""The Pallas splash attention kernel (TPU), run in interpret mode on CPU, against the plain path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codepmp_jax.model import attention

B, L, HEADS, KV, HD = 2, 40, 4, 2, 8
# Row 0: three segments and padding; row 1: one segment filling the row.
SEGMENTS = jnp.asarray([[1] * 10 + [2] * 17 + [3] * 5 + [0] * 8, [1] * L], jnp.int32)


def _qkv(seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (B, L, HEADS, HD)), jax.random.normal(keys[1], (B, L, KV, HD)),
          jax.random.normal(keys[2], (B, L, KV, HD)))


@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), 4])
def test_splash_equals_plain_with_segment_ids_and_gradients(window):
  """Outputs and gradients on real tokens (padding queries are never read) match to 1e-5 in float32."""
  real = (SEGMENTS > 0).astype(jnp.float32)[:, :, None, None]

  def loss(impl):
    def f(q, k, v):
      out = attention.dot_product_attention(q, k, v, implementation=impl, causal=True,
                                            sliding_window=window, segment_ids=SEGMENTS,
                                            interpret=True)
      return jnp.sum(jnp.sin(out) * real), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(*_qkv())

  (_, plain_out), plain_grads = loss("plain")
  (_, splash_out), splash_grads = loss("splash")
  np.testing.assert_allclose(splash_out * real, plain_out * real, rtol=1e-5, atol=1e-5)
  for a, b in zip(splash_grads, plain_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_splash_with_lengths_equals_plain_on_real_tokens():
  q, k, v = _qkv(seed=1)
  lengths = jnp.asarray([L, 13], jnp.int32)
  plain = attention.plain_attention(q, k, v, lengths=lengths, causal=True)
  splash = attention.splash_attention(q, k, v, lengths=lengths, causal=True, interpret=True)
  np.testing.assert_allclose(splash[0], plain[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(splash[1, :13], plain[1, :13], rtol=1e-5, atol=1e-5)


def test_model_with_splash_on_packed_rows_equals_plain():
  import flax.linen as nn
  from codepmp_jax.model import transformer
  from codepmp_jax.model.config import get_preset
  config = get_preset("tiny")
  params = nn.unbox(transformer.init_params(config, jax.random.key(0)))
  ids = jax.random.randint(jax.random.key(1), (B, L), 1, config.vocab_size)
  positions = jnp.asarray([list(range(10)) + list(range(17)) + list(range(5)) + [0] * 8, list(range(L))])
  reward_index = jnp.asarray([[9, 26, 31], [L - 1, 0, 0]])
  outs = [jax.jit(lambda p, impl=impl: transformer.RewardModel(config.replace(attention=impl, splash_interpret=True)).apply(
      {"params": p}, ids, SEGMENTS, positions, reward_index, return_logits=True))(params)
      for impl in ("plain", "splash")]
  np.testing.assert_allclose(outs[1].rewards, outs[0].rewards, rtol=1e-5, atol=1e-5)
  real = np.asarray(SEGMENTS > 0)
  np.testing.assert_allclose(outs[1].logits[real], outs[0].logits[real], rtol=1e-5, atol=1e-5)
