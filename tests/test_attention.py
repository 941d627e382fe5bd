"""Attention paths: ours (plain) against JAX's own reference, and the fused path against the plain one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codepmp_jax.model import attention

B, L, HEADS, KV, HD = 3, 12, 6, 2, 8


def _qkv(dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (B, L, HEADS, HD), dtype)
  k = jax.random.normal(keys[1], (B, L, KV, HD), dtype)
  v = jax.random.normal(keys[2], (B, L, KV, HD), dtype)
  return q, k, v


LENGTHS = jnp.asarray([L, 7, 1], jnp.int32)  # right-padded rows, one of a single token


@pytest.mark.parametrize("causal,lengths,window", [
    (True, None, None), (True, LENGTHS, None), (False, LENGTHS, None), (True, LENGTHS, 4)])
def test_plain_matches_jax_reference(causal, lengths, window):
  q, k, v = _qkv()
  ours = attention.plain_attention(q, k, v, lengths=lengths, causal=causal, sliding_window=window)
  ref = jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
      local_window_size=None if window is None else (window - 1, 0), implementation="xla")
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_plain_matches_numpy_by_hand():
  """Per head: softmax over the visible keys of q.k / sqrt(hd), heads sharing their group's k, v."""
  q, k, v = (np.asarray(x, np.float64) for x in _qkv(seed=1))
  ours = np.asarray(attention.plain_attention(*_qkv(seed=1), lengths=LENGTHS, causal=True))
  for b in range(B):
    for h in range(HEADS):
      g = h // (HEADS // KV)
      for t in range(L):
        visible = [s for s in range(L) if s <= t and s < int(LENGTHS[b])]
        logits = np.array([q[b, t, h] @ k[b, s, g] for s in visible]) / np.sqrt(HD)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        np.testing.assert_allclose(ours[b, t, h], p @ v[b, visible, g], rtol=1e-5, atol=1e-5)


def test_bias_per_head_and_broadcast():
  q, k, v = _qkv(seed=2)
  bias = jax.random.normal(jax.random.key(3), (B, HEADS, L, L))
  for b in (bias, bias[:, :1]):
    ours = attention.plain_attention(q, k, v, bias=b, causal=True)
    ref = jax.nn.dot_product_attention(q, k, v, bias=b, is_causal=True, implementation="xla")
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,segments,with_bias", [
    (None, False, False), (40, False, True), (None, True, False), (61, True, False)])
def test_long_causal_in_query_blocks_matches_jax_reference(window, segments, with_bias):
  """Over 2 * causal_block tokens the plain path skips the masked triangle block by block (and,
  with a window, the keys before it); its outputs and gradients are still JAX's reference
  attention (lengths, window, bias, segments; packed rows under a window of their longest
  segment, 60 tokens)."""
  causal_block = 32
  length = 5 * causal_block + 13  # 5 blocks of 35 tokens, the last one shorter
  keys = jax.random.split(jax.random.key(7), 4)
  q = jax.random.normal(keys[0], (2, length, 4, 8))
  k, v = (jax.random.normal(key, (2, length, 2, 8)) for key in keys[1:3])
  lengths = jnp.asarray([length, 90], jnp.int32)
  bias = jax.random.normal(keys[3], (2, 1, length, length)) if with_bias else None
  segment_ids = None
  if segments:  # packed rows: segment boundaries inside and across blocks, padding (0) at the end
    position = jnp.arange(length)
    segment_ids = jnp.stack([1 + (position >= 50) + (position >= 110),
                             jnp.where(position < 90, 1 + (position >= 30), 0)]).astype(jnp.int32)
    lengths = None
  reference_bias = bias
  if segments:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    reference_bias = jnp.where(same, 0.0, attention.MASK_VALUE)

  @jax.jit  # one compile instead of dispatching (and compiling) every block's ops one by one
  def outputs(q, k, v):
    ours = attention.plain_attention(q, k, v, bias=bias, lengths=lengths, causal=True,
                                     sliding_window=window, segment_ids=segment_ids,
                                     causal_block=causal_block)
    ref = jax.nn.dot_product_attention(
        q, k, v, bias=reference_bias, is_causal=True, key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0), implementation="xla")
    return ours, ref

  # Padding queries (at or past a row's length) may see no key at all; what they average is
  # unspecified and never read, so only real queries are compared (and carry gradient).
  real = (jnp.arange(length)[None] < (length if lengths is None else lengths[:, None]))
  real = real[:, :, None, None]
  ours, ref = outputs(q, k, v)
  np.testing.assert_allclose(ours * real, ref * real, rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(jax.random.key(8), ours.shape) * real
  grads = [jax.grad(lambda q, k, v, i=i: (outputs(q, k, v)[i] * weights).sum(), argnums=(0, 1, 2))(
      q, k, v) for i in (0, 1)]
  for ours_grad, ref_grad in zip(*grads):
    np.testing.assert_allclose(ours_grad, ref_grad, rtol=1e-4, atol=1e-4)


def test_cpu_query_blocks_keep_scores_cache_sized():
  """On CPU a block's float32 scores stay within 2 MiB where blocks of 64 queries or more can:
  8 rows x 4 heads x 256 keys x 4 bytes is 32 KiB a query, so 256 queries run as 4 blocks of 64,
  and 4 rows as 2 blocks of 128; never under 64 queries a block, nor fewer than 2 blocks."""
  assert (attention.CPU_SCORE_BYTES, attention.MIN_CPU_CAUSAL_BLOCK) == (2 << 20, 64)
  assert attention.causal_query_block(256, 256, rows_x_heads=8 * 4) == 64
  assert attention.causal_query_block(256, 256, rows_x_heads=4 * 4) == 128
  assert attention.causal_query_block(256, 256) == 256  # off CPU: one block of causal_block
  assert attention.causal_query_block(1024, 256, rows_x_heads=1024) == 128  # at most 8 blocks
  assert attention.causal_query_block(256, 256, rows_x_heads=1024) == 64
  assert attention.causal_query_block(100, 256, rows_x_heads=8 * 4) == 100
  # Narrow keys and values (the tiny model: 2 x 16 per 4 heads) allow blocks down to 32 queries:
  # 16 rows x 4 heads x 320 keys fit 25 queries, so 8 blocks of 40; smollm2 (3 x 64 per 9) keeps 64.
  assert attention.min_cpu_causal_block(4, 2, 16) == 32
  assert attention.min_cpu_causal_block(9, 3, 64) == 64
  assert attention.causal_query_block(320, 256, rows_x_heads=16 * 4, min_block=32) == 40


def test_fused_equals_plain_with_gradients():
  """Where the fused path runs (the default kernel on CPU, cuDNN on GPU) it gives the plain path's
  outputs and gradients."""
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  q, k, v = _qkv(dtype, seed=4)

  def loss(impl):
    def f(q, k, v):
      out = attention.dot_product_attention(q, k, v, implementation=impl, lengths=LENGTHS, causal=True)
      return jnp.sum(jnp.sin(out.astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

  (plain_value, plain_grads), (fused_value, fused_grads) = loss("plain"), loss("fused")
  np.testing.assert_allclose(fused_value, plain_value, rtol=tol, atol=tol)
  for a, b in zip(fused_grads, plain_grads):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_unknown_implementation_is_an_error():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="not one of"):
    attention.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), 3])
def test_model_with_fused_attention_equals_plain(window):
  """The whole reward model: `attention="fused"` gives the plain path's rewards and logits."""
  import flax.linen as nn
  from codepmp_jax.model import transformer
  from codepmp_jax.model.config import get_preset
  config = get_preset("tiny", sliding_window=window)
  params = nn.unbox(transformer.init_params(config, jax.random.key(0)))
  ids = jax.random.randint(jax.random.key(1), (3, 10), 1, config.vocab_size)
  mask = (jnp.arange(10)[None] < jnp.array([[10], [6], [2]])).astype(jnp.int32)
  def forward(impl):
    model = transformer.RewardModel(config.replace(attention=impl))
    return jax.jit(lambda p: model.apply({"params": p}, ids, mask, return_logits=True))(params)

  outs = [forward("plain"), forward("fused")]
  np.testing.assert_allclose(outs[1].rewards, outs[0].rewards, atol=1e-5)
  np.testing.assert_allclose(outs[1].logits, outs[0].logits, atol=1e-5)
