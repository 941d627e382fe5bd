"""Scaled dot-product attention with grouped-query heads: implementations chosen by name.

`ModelConfig.attention` (and `dot_product_attention(..., implementation=NAME)`) picks one:
  plain    einsums and a float32 softmax over every (query, key) pair; runs everywhere; the reference.
  blocked  the same math, causal self-attention in query blocks (block i over keys [0, end of
           block i)), so the fully masked upper triangle is never computed; its block size is
           `causal_block`, optionally shrunk until a block's scores fit `attention_block_bytes`
           (what `auto` picks on CPU, where the memory-bound softmax runs faster in cache).
  cudnn    `jax.nn.dot_product_attention` with cuDNN's flash attention (GPU; bf16/fp16,
           head_dim <= 128): never materialises the [L, L] scores, skips the masked half.
  splash   the Pallas TPU splash attention kernel (`jax.experimental.pallas.ops.tpu`), which skips
           every fully masked [block_q, block_kv] tile, so packed rows pay only for the attention
           within their segments; `splash_interpret=True` runs it on any backend (tests on CPU).
  auto     resolved once per backend when a program resolves its config
           (`model.config.resolve_attention`); a model built from an unresolved config runs blocked.
Nothing here asks which backend it runs on: device choices are configuration.

All take the mask as what the model knows about its batch (causal, right-padding lengths, segment
ids of packed rows, an optional sliding window) rather than as a materialised bias, so the kernels
can use their built-in masks; a precomputed additive `bias` (e.g. over a key/value cache) is
accepted by plain, blocked and cudnn. Masked keys get a large negative logit, not -inf, so a row
with no visible key stays finite.

Segment ids ([B, L] int, packed rows): a query sees only keys of its own segment. Padding carries
segment 0, so padding tokens see only padding (never a real token) and stay finite.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from codepmp_jax.model.config import ATTENTION_IMPLEMENTATIONS, ModelConfig

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(query_length: int, key_length: int, lengths: jax.Array | None, causal: bool,
                   sliding_window: int | None, segment_ids: jax.Array | None = None,
                   query_offset: int = 0, key_offset: int = 0) -> jax.Array | None:
  """Boolean [B or 1, 1, T, S] mask: which keys each query may see (None: all of them).

  Query t sits at position `query_offset` + t and key s at position `key_offset` + s. `lengths`
  [B] marks keys at or after a row's length as padding (right-padded rows); `sliding_window` w
  keeps keys with t - s < w; `segment_ids` [B, >= both ends] (self-attention over one row) keeps
  keys of the query's segment.
  """
  query = query_offset + jnp.arange(query_length)[:, None]
  key = key_offset + jnp.arange(key_length)[None, :]
  allowed = None
  if causal:
    allowed = key <= query
  if sliding_window is not None:
    window = query - key < sliding_window
    allowed = window if allowed is None else allowed & window
  if allowed is not None:
    allowed = allowed[None]
  if lengths is not None:
    real = key[None] < lengths[:, None, None]
    allowed = real if allowed is None else allowed & real
  if segment_ids is not None:
    query_segments = segment_ids[:, query_offset:query_offset + query_length]
    key_segments = segment_ids[:, key_offset:key_offset + key_length]
    same = query_segments[:, :, None] == key_segments[:, None, :]
    allowed = same if allowed is None else allowed & same
  return None if allowed is None else allowed[:, None]


CAUSAL_BLOCK = 256  # ModelConfig.causal_block's default
MAX_CAUSAL_BLOCKS = 8  # each block adds compile time; beyond 8 the skipped triangle grows little


def causal_query_block(length: int, causal_block: int = CAUSAL_BLOCK, rows_x_heads: int = 0,
                       min_block: int = 1, block_bytes: int = 0) -> int:
  """Queries per block of `blocked_attention`'s causal self-attention over `length` tokens (`length`
  itself when it runs as one block): about `causal_block`, and with `block_bytes` and
  `rows_x_heads` (batch rows x query heads) no more than keeps one block's float32 scores within
  `block_bytes`, but not under `min_block`. At most MAX_CAUSAL_BLOCKS blocks."""
  size = causal_block
  if block_bytes and rows_x_heads:
    fits = block_bytes // (rows_x_heads * length * 4)
    size = min(size, max(min_block, fits))
  blocks = min(MAX_CAUSAL_BLOCKS, length // size)
  return length if blocks < 2 else -(-length // blocks)


def _grouped(query: jax.Array, key: jax.Array, value: jax.Array):
  """One layout change for all blocks: the heads sharing a key/value head stacked along the query
  axis (scaled queries [B, KV, G, T, hd]), keys and values [B, KV, S, hd]."""
  batch, length, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  q = (query * jnp.asarray(1.0 / math.sqrt(head_dim), query.dtype)).reshape(
      batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
  return q, key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)


def _ungrouped(out: jax.Array) -> jax.Array:
  batch, kv_heads, groups, length, head_dim = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, kv_heads * groups, head_dim)


def plain_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    bias: jax.Array | None = None, lengths: jax.Array | None = None,
                    causal: bool = False, sliding_window: int | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
  """Grouped-query attention as two batched matmuls around a float32 softmax, over every
  (query, key) pair.

  query [B, T, H, hd], key/value [B, S, KV, hd] with H a multiple of KV; `bias` is additive,
  [B or 1, H or 1, T, S]. Returns [B, T, H, hd] in the value's dtype.
  """
  q, k, v = _grouped(query, key, value)
  return _ungrouped(_dense_attention(q, k, v, bias, lengths, causal, sliding_window, segment_ids))


def blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                      bias: jax.Array | None = None, lengths: jax.Array | None = None,
                      causal: bool = False, sliding_window: int | None = None,
                      segment_ids: jax.Array | None = None, causal_block: int = CAUSAL_BLOCK,
                      block_bytes: int = 0, min_block: int = 1) -> jax.Array:
  """`plain_attention` with long causal self-attention in query blocks (`causal_query_block`):
  block i attends keys [0, end of block i), so the masked upper triangle is never computed (25%
  fewer score elements at 2 blocks, 44% at 8); with a sliding window w, block i starts its keys
  w - 1 before its first query, so the keys no query of it sees are skipped too."""
  batch, length, heads, _ = query.shape
  size = causal_query_block(length, causal_block, batch * heads, min_block, block_bytes)
  if not (causal and key.shape[1] == length and size < length):
    return plain_attention(query, key, value, bias=bias, lengths=lengths, causal=causal,
                           sliding_window=sliding_window, segment_ids=segment_ids)
  q, k, v = _grouped(query, key, value)
  outs = []
  for start in range(0, length, size):
    end = min(start + size, length)
    first = 0 if sliding_window is None else max(0, start - sliding_window + 1)
    block_bias = None if bias is None else bias[:, :, start:end, first:end]
    outs.append(_dense_attention(q[:, :, :, start:end], k[:, :, first:end], v[:, :, first:end],
                                 block_bias, lengths, causal, sliding_window, segment_ids,
                                 query_offset=start, key_offset=first))
  return _ungrouped(jnp.concatenate(outs, axis=3))


def _dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
                     lengths: jax.Array | None, causal: bool, sliding_window: int | None,
                     segment_ids: jax.Array | None, query_offset: int = 0,
                     key_offset: int = 0) -> jax.Array:
  """`plain_attention` over every (query, key) pair of scaled queries `q` [B, KV, G, T, hd] at
  positions `query_offset` + t and keys/values `k`, `v` [B, KV, S, hd] at `key_offset` + s;
  returns [B, KV, G, T, hd].

  The G heads sharing a key/value head are stacked along the query axis ([B, KV, G*T, hd]), so
  both products are plain batched matmuls over (B, KV) and only the small q/k/v/output arrays are
  transposed, never the [T, S] scores (faster than 5-D einsums over (B, KV, G) on XLA's CPU
  backend).
  """
  batch, kv_heads, groups, length, head_dim = q.shape
  kv_length = k.shape[2]
  scores = jnp.einsum("bkqd,bksd->bkqs", q.reshape(batch, kv_heads, groups * length, head_dim), k,
                      preferred_element_type=jnp.float32)
  scores = scores.reshape(batch, kv_heads, groups, length, kv_length)
  if bias is not None:
    if bias.shape[1] == 1:
      bias = bias[:, :, None]
    else:
      bias = bias.reshape(bias.shape[0], kv_heads, groups, *bias.shape[2:])
    scores = scores + bias.astype(jnp.float32)
  mask = attention_mask(length, kv_length, lengths, causal, sliding_window, segment_ids,
                        query_offset, key_offset)
  if mask is not None:
    scores = jnp.where(mask[:, :, None], scores, MASK_VALUE)
  # softmax(scores) @ v as (exp(scores - max) @ v) / sum: the division runs over [T, hd], not over
  # [T, S] (one pass over the scores less, forward and backward). The max is only a shift that
  # keeps exp finite, so it carries no gradient.
  weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
  total = jnp.sum(weights, axis=-1).reshape(batch, kv_heads, groups * length, 1)
  out = jnp.einsum("bkqs,bksd->bkqd", weights.astype(v.dtype).reshape(
      batch, kv_heads, groups * length, kv_length), v, preferred_element_type=jnp.float32)
  out = (out / total).astype(v.dtype)
  return out.reshape(batch, kv_heads, groups, length, head_dim)


def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    bias: jax.Array | None = None, lengths: jax.Array | None = None,
                    causal: bool = False, sliding_window: int | None = None,
                    segment_ids: jax.Array | None = None, implementation: str = "cudnn") -> jax.Array:
  """The same attention through `jax.nn.dot_product_attention`'s `implementation` (cuDNN's fused
  kernel; "xla" runs the same call anywhere, which is how the CPU tests check this wrapper).

  Padding is passed as key lengths only, so padded query rows see the same keys as in
  `plain_attention`. Segment ids go in as a boolean [B, 1, T, S] same-segment mask (this JAX's
  cuDNN binding takes no segment ids; it adds the mask as a bias inside the fused kernel).
  """
  window = None if sliding_window is None else (sliding_window - 1, 0)
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
      query, key, value, bias=bias, mask=mask, is_causal=causal,
      key_value_seq_lengths=None if lengths is None else lengths.astype(jnp.int32),
      local_window_size=window, implementation=implementation)


SPLASH_BLOCK = 128  # the TPU kernel's tile (lane width); rows are padded to a multiple of it


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, length: int, causal: bool, sliding_window: int | None, interpret: bool):
  """A splash multi-head kernel for [heads, length, hd] inputs with the given static mask."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
  shape = (length, length)
  if sliding_window is not None:
    head_mask = mask_lib.LocalMask(shape, (sliding_window - 1, 0 if causal else None), 0)
  elif causal:
    head_mask = mask_lib.CausalMask(shape)
  else:
    head_mask = mask_lib.FullMask(shape)
  block = SPLASH_BLOCK
  sizes = kernel_lib.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  # Built as concrete arrays even when first called under a trace, so the cached kernel can serve
  # later traces.
  with jax.ensure_compile_time_eval():
    return kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([head_mask] * heads), head_shards=1, q_seq_shards=1,
        block_sizes=sizes, interpret=interpret)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                     bias: jax.Array | None = None, lengths: jax.Array | None = None,
                     causal: bool = False, sliding_window: int | None = None,
                     segment_ids: jax.Array | None = None, interpret: bool = False) -> jax.Array:
  """The same attention through the Pallas splash kernel (TPU; `interpret` runs it anywhere).

  Right-padding `lengths` become segment ids (1 real, 0 padding) and rows are padded to a multiple
  of `SPLASH_BLOCK` with segment -1, so padding queries see only padding: their outputs differ
  from `plain_attention`'s (which lets them see the real keys) but are never read. Grouped
  heads go to the kernel as [KV, H/KV] groups; the batch is a `vmap`. `interpret` runs the
  kernel on any backend (slowly; tests). No additive `bias` (decoding over a cache uses the plain path).
  """
  if bias is not None:
    raise ValueError("splash attention takes no additive bias; use implementation='plain'")
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  batch, length, heads, head_dim = query.shape
  if segment_ids is None:
    segment_ids = (jnp.ones((batch, length), jnp.int32) if lengths is None else
                   (jnp.arange(length)[None] < lengths[:, None]).astype(jnp.int32))
  elif lengths is not None:
    segment_ids = jnp.where(jnp.arange(length)[None] < lengths[:, None], segment_ids, 0)
  pad = -length % SPLASH_BLOCK
  to_kernel = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
  q = to_kernel(query * jnp.asarray(1.0 / math.sqrt(head_dim), query.dtype))
  k, v = to_kernel(key), to_kernel(value)
  segments = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
  kernel = _splash_kernel(heads, length + pad, causal, sliding_window, interpret)
  out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(q=s, kv=s)))(
      q, k, v, segments)
  return out.transpose(0, 2, 1, 3)[:, :length].astype(value.dtype)


def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, N, ...] at `index` [B, M] per row; 0 where `index` is -1."""
  out = jax.vmap(lambda row, i: row[i])(x, jnp.maximum(index, 0))
  return jnp.where((index >= 0).reshape(index.shape + (1,) * (x.ndim - 2)), out, 0).astype(x.dtype)


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, inverses: tuple[jax.Array, ...]) -> jax.Array:
  """`x` [B, N, ...] rearranged to [B, M, ...] by `index` [B, M] (-1: a zero entry). `inverses`
  ([B, N] each) list, for every element of `x`, the entries it went to (one per array; -1: none),
  so the gradient is a sum of gathers as well: no scatter (slow on XLA's CPU backend)."""
  return _take_rows(x, index)


def _gather_rows_fwd(x, index, inverses):
  return _take_rows(x, index), inverses


def _gather_rows_bwd(residuals, grad):
  inverses = residuals
  total = _take_rows(grad, inverses[0])
  for inverse in inverses[1:]:
    total = total + _take_rows(grad, inverse)
  return total, None, tuple(None for _ in inverses)


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


class SequenceLayout(NamedTuple):
  """How packed rows map to their sequence slots, for `sequence_attention` (`sequence_layout`)."""
  sequence_index: jax.Array  # [B, S, T] the column of each slot entry; -1: none
  home_index: jax.Array  # [B, S * T] the same, -1 where the column's output is read elsewhere
  row_index: jax.Array  # [B, L] each column's home entry (s * T + t); -1: padding
  second_index: jax.Array  # [B, L] a shared-prompt column's entry in the next slot; -1: none


def sequence_layout(sequence_index: jax.Array, row_index: jax.Array) -> SequenceLayout:
  """The layout of packed rows whose `sequence_index` [B, S, T] lists each sequence's columns and
  `row_index` [B, L] each column's home entry (s * T + t). A column may also appear in the next
  slot at the same offset: a pair's shared prompt, laid out once and listed in both its chosen
  (home) and its rejected sequence (`data.packing`, shared prompts)."""
  rows, slots, length = sequence_index.shape
  flat = sequence_index.reshape(rows, slots * length)
  entries = jnp.arange(slots * length)[None]
  home_of = jnp.take_along_axis(row_index, jnp.maximum(flat, 0), axis=1)
  home_index = jnp.where((flat >= 0) & (home_of == entries), flat, -1)
  candidate = row_index + length
  listed = jnp.take_along_axis(flat, jnp.clip(candidate, 0, slots * length - 1), axis=1)
  shared = (row_index >= 0) & (candidate < slots * length) & (
      listed == jnp.arange(row_index.shape[1])[None])
  return SequenceLayout(sequence_index, home_index, row_index, jnp.where(shared, candidate, -1))


def settings(config: ModelConfig) -> dict[str, Any]:
  """`dot_product_attention`'s implementation and block settings from a model config."""
  return {"implementation": config.attention, "causal_block": config.causal_block,
          "block_bytes": config.attention_block_bytes, "min_block": config.attention_min_block,
          "interpret": config.splash_interpret}


def sequence_attention(query: jax.Array, key: jax.Array, value: jax.Array, layout: SequenceLayout,
                       *, sliding_window: int | None = None, **implementation: Any) -> jax.Array:
  """Causal self-attention of packed rows, computed sequence by sequence.

  query [B, L, H, hd], key/value [B, L, KV, hd] hold several sequences per row, mapped to
  sequence slots by `layout` (`sequence_layout`; padding's output is 0). The sequences are
  gathered into [B * S, T] right-padded rows and attended by the named implementation
  (`implementation`: `dot_product_attention`'s implementation and block settings), so
  attention costs S * T^2 per row instead of L^2 (packed rows of short sequences), every kernel
  runs its plain causal-with-lengths case, and no token sees another sequence by construction.
  A shared prompt's keys and values serve both sequences of its pair (its gradient sums both).
  """
  rows, slots, length = layout.sequence_index.shape
  to_layout = layout.sequence_index.reshape(rows, slots * length)

  def to_sequences(x):
    return gather_rows(x, to_layout, (layout.row_index, layout.second_index)).reshape(
        rows * slots, length, *x.shape[2:])

  lengths = jnp.sum(layout.sequence_index >= 0, axis=-1, dtype=jnp.int32).reshape(-1)
  out = dot_product_attention(to_sequences(query), to_sequences(key), to_sequences(value),
                              lengths=lengths, causal=True, sliding_window=sliding_window,
                              **implementation)
  return gather_rows(out.reshape(rows, slots * length, *out.shape[2:]), layout.row_index,
                     (layout.home_index,))


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          implementation: str = "plain", bias: jax.Array | None = None,
                          lengths: jax.Array | None = None, causal: bool = False,
                          sliding_window: int | None = None,
                          segment_ids: jax.Array | None = None,
                          causal_block: int = CAUSAL_BLOCK, block_bytes: int = 0,
                          min_block: int = 1, interpret: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(hd) + bias + mask) v over grouped heads, by the named implementation
  (`settings(config)` gives the rest: blocked's `causal_block`, `block_bytes`, `min_block`;
  splash's `interpret`). An unresolved "auto" runs blocked."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  kwargs = {"bias": bias, "lengths": lengths, "causal": causal, "sliding_window": sliding_window,
            "segment_ids": segment_ids}
  if implementation == "plain":
    return plain_attention(query, key, value, **kwargs)
  if implementation == "cudnn":
    return cudnn_attention(query, key, value, **kwargs)
  if implementation == "splash":
    return splash_attention(query, key, value, interpret=interpret, **kwargs)
  return blocked_attention(query, key, value, causal_block=causal_block, block_bytes=block_bytes,
                           min_block=min_block, **kwargs)
