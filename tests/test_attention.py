"""Attention implementations by name: plain against JAX's own reference, every other one against plain,
and `auto` resolved once per backend at config resolution (never inside model code)."""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codepmp_jax.model import attention
from codepmp_jax.model.config import ModelConfig, get_preset, resolve_attention

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
  """Over 2 * causal_block tokens the blocked path skips the masked triangle block by block (and,
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
    ours = attention.blocked_attention(q, k, v, bias=bias, lengths=lengths, causal=True,
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


def test_blocks_keep_scores_within_the_byte_cap():
  """With `block_bytes` (auto on CPU: 2 MiB) a block's float32 scores stay within it where blocks of
  `min_block` queries or more can: 8 rows x 4 heads x 256 keys x 4 bytes is 32 KiB a query, so 256
  queries run as 4 blocks of 64, and 4 rows as 2 blocks of 128; never fewer than 2 blocks, never
  more than 8; no cap, one block of causal_block."""
  cap = 2 << 20
  block = lambda length, rows_x_heads, min_block=64: attention.causal_query_block(  # noqa: E731
      length, 256, rows_x_heads, min_block, cap)
  assert block(256, 8 * 4) == 64
  assert block(256, 4 * 4) == 128
  assert attention.causal_query_block(256, 256, rows_x_heads=8 * 4) == 256  # no cap
  assert block(1024, 1024) == 128  # at most 8 blocks
  assert block(256, 1024) == 64
  assert block(100, 8 * 4) == 100
  assert block(320, 16 * 4, min_block=32) == 40  # 25 queries fit; the floor is 32: 8 blocks of 40


def test_auto_resolves_per_backend_once():
  """`auto` becomes the backend's choice and its settings; a resolved (or named) config is returned
  unchanged, so resolving twice is resolving once. The CPU floor follows the model's key/value
  width: the tiny model (2 x 16 per 4 heads) 32 queries, smollm2 (3 x 64 per 9) 64."""
  tiny, smollm2 = get_preset("tiny"), get_preset("smollm2_135m")
  cpu = resolve_attention(tiny, "cpu")
  assert (cpu.attention, cpu.attention_block_bytes, cpu.attention_min_block) == ("blocked", 2 << 20, 32)
  assert resolve_attention(smollm2, "cpu").attention_min_block == 64
  assert resolve_attention(cpu, "gpu") == cpu
  assert resolve_attention(tiny.replace(dtype="bfloat16"), "gpu").attention == "cudnn"
  # cuDNN's kernel takes bf16/fp16 and head_dim <= 128 only
  assert resolve_attention(tiny, "gpu") == tiny.replace(attention="blocked")
  assert resolve_attention(tiny.replace(dtype="bfloat16", head_dim=256), "gpu").attention == "blocked"
  assert resolve_attention(tiny, "tpu").attention == "splash"
  assert resolve_attention(tiny, "metal").attention == "blocked"
  for name in ("plain", "blocked", "cudnn", "splash"):
    assert resolve_attention(tiny.replace(attention=name), "cpu").attention == name
  # model_config.json files written before the rename
  assert ModelConfig.from_dict({**tiny.to_dict(), "attention": "fused"}).attention == "cudnn"
  with pytest.raises(ValueError, match="not one of"):
    tiny.replace(attention="fused")


def test_no_backend_checks_in_model_code():
  """The backend is asked where a program resolves its config (train) and nowhere under model/;
  train resolves `auto` once."""
  package = pathlib.Path(attention.__file__).parents[1]
  calls = {str(p.relative_to(package)): p.read_text().count("default_backend()")
           for p in package.rglob("*.py")}
  assert not {p: n for p, n in calls.items() if p.startswith("model") and n}
  assert sum(calls.values()) <= 2, {p: n for p, n in calls.items() if n}
  assert (package / "train.py").read_text().count("resolve_attention(") == 1


# Each named implementation against plain, outputs and gradients. On CPU the cudnn wrapper runs
# JAX's XLA kernel (its masks and lengths are what is ours) and splash runs interpreted.
CUDNN_KERNEL = "cudnn" if jax.default_backend() == "gpu" else "xla"
NAMED = [
    ("blocked", {"causal_block": 4}),
    ("blocked", {"causal_block": 256, "block_bytes": B * HEADS * L * 4 * 3, "min_block": 3}),
    ("cudnn", {}),
    pytest.param("splash", {"interpret": True}, marks=pytest.mark.skipif(
        jax.default_backend() == "gpu", reason="splash is a TPU kernel (interpreted elsewhere)")),
    ("auto", {}),  # unresolved: runs blocked
]


def _named(impl, options):
  if impl == "cudnn":
    return lambda q, k, v, **kw: attention.cudnn_attention(q, k, v, implementation=CUDNN_KERNEL, **kw)
  return functools.partial(attention.dot_product_attention, implementation=impl, **options)


@pytest.mark.parametrize("impl,options", NAMED)
@pytest.mark.parametrize("packed", [False, True])
def test_each_implementation_equals_plain_with_gradients(impl, options, packed):
  """Right-padded rows (`lengths`) or packed rows (`segment_ids`), causal: the real queries'
  outputs and every gradient equal plain's."""
  dtype = jnp.bfloat16 if impl == "cudnn" and CUDNN_KERNEL == "cudnn" else jnp.float32
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  q, k, v = _qkv(dtype, seed=4)
  if packed:
    segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 3 + [2] * 6 + [0] * 3, [1] * 12], jnp.int32)
    mask = {"segment_ids": segments}
    real = segments > 0
  else:
    mask = {"lengths": LENGTHS}
    real = jnp.arange(L)[None] < LENGTHS[:, None]
  real = real[:, :, None, None]

  def loss(fn):
    def f(q, k, v):
      out = fn(q, k, v, causal=True, **mask)
      return jnp.sum(jnp.sin(out.astype(jnp.float32)) * real)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

  (plain_value, plain_grads) = loss(attention.plain_attention)
  value, grads = loss(_named(impl, options))
  np.testing.assert_allclose(value, plain_value, rtol=tol, atol=tol)
  for a, b in zip(grads, plain_grads):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_unknown_implementation_is_an_error():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="not one of"):
    attention.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), 3])
def test_model_with_each_cpu_implementation_equals_plain(window, monkeypatch):
  """The whole reward model under the CPU-resolved config (`auto` -> blocked with a byte cap small
  enough to cut blocks) gives plain's rewards and logits, and never asks for the backend."""
  import flax.linen as nn
  from codepmp_jax.model import transformer
  config = get_preset("tiny", sliding_window=window, causal_block=4)
  params = nn.unbox(transformer.init_params(config.replace(attention="plain"), jax.random.key(0)))
  ids = jax.random.randint(jax.random.key(1), (3, 10), 1, config.vocab_size)
  mask = (jnp.arange(10)[None] < jnp.array([[10], [6], [2]])).astype(jnp.int32)
  monkeypatch.setattr(jax, "default_backend", lambda: pytest.fail("model code asked for the backend"))

  def forward(cfg):
    model = transformer.RewardModel(cfg)
    return jax.jit(lambda p: model.apply({"params": p}, ids, **transformer.right_padded(mask.sum(-1), 10),
                                         return_logits=True))(params)

  cpu = resolve_attention(config, "cpu").replace(attention_block_bytes=4 * 4 * 10 * 4 * 3)
  outs = [forward(config.replace(attention="plain")), forward(cpu), forward(config)]
  real = np.asarray(mask, bool)  # a padding query may see no key: what it averages is never read
  for out in outs[1:]:
    np.testing.assert_allclose(out.rewards, outs[0].rewards, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logits)[real], np.asarray(outs[0].logits)[real], atol=1e-5)
