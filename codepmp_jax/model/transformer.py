"""The reward model: a Llama / Qwen2 / Mistral decoder with a scalar `score` head and an LM head.

One class serves pretraining (PMP needs both the reward and the LM logits) and fine-tuning (reward
only). Inputs are right-padded; the reward is read at `length - 1`, with the length computed from
the attention mask. Dense layers multiply 2-D `[tokens, features]` activations, which keeps the
backward matmuls on the fast path of XLA's CPU and GPU backends.

Generation (`codepmp_jax.model.generate`) runs the same model incrementally: given
`decode_positions`, every attention layer writes its keys and values into a preallocated key/value
cache (the Flax "cache" collection, see `init_cache`) at those positions and attends over the cache.
Without `decode_positions` nothing about the training and scoring path changes.

Packed rows (`codepmp_jax.data.packing`): given `segment_ids` and `positions`, each row holds several
sequences back to back; a token attends only within its segment (causal), RoPE positions restart
per segment, and `reward_index` names the columns (each segment's last token) to read rewards at.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codepmp_jax.model import attention as attention_lib
from codepmp_jax.model import lora as lora_lib
from codepmp_jax.model.config import ModelConfig

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# Key/value cache [batch, kv head, cache slot, head dim]; cache slot = token position. Heads before
# slots keep the decode attention matmuls free of per-step transposes of the whole cache.
CACHE_AXES = ("batch", "act_kv_heads", "length", "head_dim")


class ModelOutput(NamedTuple):
  hidden_states: jax.Array  # [B, L, D], after the final norm
  rewards: jax.Array  # [B] float32 ([B, K] at `reward_index` for packed rows)
  logits: jax.Array | None  # [B / logits_every, L, V] when asked


def _normal(stddev: float):
  return nn.initializers.normal(stddev=stddev)


class Linear(nn.Module):
  """y = x @ kernel (+ bias) over the last axis, on a 2-D view of the activations.

  With `lora_rank > 0` it also holds LoRA adapters `lora_a` [in, rank] and `lora_b` [rank, out]
  (`model.lora`) and adds `lora_scale * (x @ lora_a) @ lora_b`; their logical axes are the
  kernel's, with `lora` for the rank.
  """

  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  stddev: float = 0.02
  lora_rank: int = 0
  lora_scale: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(_normal(self.stddev), self.axes),
        (x.shape[-1], self.features), self.param_dtype)
    x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    y = jnp.dot(x2, kernel.astype(self.dtype))
    if self.lora_rank:
      lora_a = self.param(
          lora_lib.A, nn.with_logical_partitioning(lora_lib.init_a, (self.axes[0], "lora")),
          (x.shape[-1], self.lora_rank), self.param_dtype)
      lora_b = self.param(
          lora_lib.B, nn.with_logical_partitioning(nn.initializers.zeros, ("lora", self.axes[1])),
          (self.lora_rank, self.features), self.param_dtype)
      low = jnp.dot(x2, lora_a.astype(self.dtype))
      y = y + jnp.dot(low, lora_b.astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
          (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y.reshape(x.shape[:-1] + (self.features,))


class Embed(nn.Module):
  """Token embedding table; `attend` reuses it as the LM head when embeddings are tied."""

  vocab_size: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(_normal(0.02), ("vocab", "embed")),
        (self.vocab_size, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.reshape(-1, self.features).astype(self.dtype), self.embedding.astype(self.dtype).T)
    return y.reshape(x.shape[:-1] + (self.vocab_size,))


class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * scale.astype(self.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> jax.Array:
  """Per-pair rotation frequencies, with the configured linear or Llama-3 scaling."""
  head_dim = config.resolved_head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  factor = scaling["factor"]
  if scaling["type"] == "linear":
    return inv_freq / factor
  # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
  original = scaling["original_max_position_embeddings"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
  smooth = (original / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= original / high) & (wavelen <= original / low)
  return jnp.where(is_medium, blended, scaled)


def rope_tables(config: ModelConfig, positions: jax.Array | np.ndarray,
                num_positions: int | None = None) -> tuple[jax.Array, jax.Array]:
  """cos and sin at `positions`, [..., L, head_dim], for the "rotate half" RoPE layout.

  Given `num_positions` (every position is below it, e.g. the input length), both tables are
  computed once at trace time for positions 0..num_positions-1 (float32 angles, as transformers
  computes them) and looked up; numpy `positions` look up at trace time too. Computed in the
  program instead, cos and sin are fused into each consumer (every attention block's slice of the
  queries and keys) and evaluated there per element: the tiny model scored 1.2x slower on CPU.
  Without `num_positions` (decoding, where positions are bounded only by the cache) they are
  computed in the program.
  """
  def angles_at(positions):
    freqs = positions[..., None].astype(jnp.float32) * rope_inverse_frequencies(config)
    return jnp.concatenate([freqs, freqs], axis=-1)

  if num_positions is None:
    angles = angles_at(positions)
    return jnp.cos(angles), jnp.sin(angles)
  with jax.ensure_compile_time_eval():
    angles = np.asarray(angles_at(jnp.arange(num_positions)), np.float64)
  tables = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
  if isinstance(positions, np.ndarray):
    return tables[0][positions], tables[1][positions]
  return tuple(jnp.take(table, positions, axis=0) for table in tables)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, L, heads, head_dim] by position; cos/sin are [B or 1, L, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  x32 = x.astype(jnp.float32)
  out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
  return out.astype(x.dtype)


def cache_attention_bias(positions: jax.Array, cache_length: int,
                         sliding_window: int | None) -> jax.Array:
  """Additive [B, 1, 1, T, S] bias for queries at `positions` [B, T] over S cache slots.

  A query sees the slots at or before its own position; later slots hold stale or padding entries.
  """
  slots = jnp.arange(cache_length)[None, None, :]
  query = positions[..., None]
  allowed = slots <= query
  if sliding_window is not None:
    allowed &= query - slots < sliding_window
  return jnp.where(allowed, 0.0, attention_lib.MASK_VALUE)[:, None, None].astype(jnp.float32)


def _write_cache(module: nn.Module, name: str, new: jax.Array, positions: jax.Array) -> jax.Array:
  """Writes `new` [B, T, KV, hd] into cache slots `positions` [B, T]; returns the whole cache.

  The cache, [B, KV, S, hd], is created (zeros, S = the input length) when the model is
  initialized in decode mode.
  """
  batch, length, kv_heads, head_dim = new.shape
  cache = module.variable("cache", name, nn.with_logical_partitioning(jnp.zeros, CACHE_AXES),
                          (batch, kv_heads, length, head_dim), new.dtype)
  rows = jnp.arange(batch)[:, None]
  # Advanced indices around a slice: the indexed view is [B, T, KV, hd], the layout of `new`.
  cache.value = nn.with_logical_constraint(
      cache.value.at[rows, :, positions].set(new.astype(cache.value.dtype)), CACHE_AXES)
  return cache.value


def _lora_fields(cfg: ModelConfig, name: str) -> dict:
  """The `Linear` fields that put `cfg.lora`'s adapters on the projection `name` (if targeted)."""
  if not cfg.lora.rank or name not in cfg.lora.targets:
    return {}
  return {"lora_rank": cfg.lora.rank, "lora_scale": cfg.lora.scale}


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, lengths: jax.Array | None, cos: jax.Array, sin: jax.Array,
               decode_positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               query_index: jax.Array | None = None,
               sequences: attention_lib.SequenceLayout | None = None) -> jax.Array:
    """`lengths` [B]: real tokens per right-padded row (None when decoding over the cache or when
    `segment_ids` [B, L] of packed rows say which tokens see each other). `query_index` [B, K]:
    compute queries (and the output, [B, K, D]) only at these columns of right-padded rows, over
    the keys at or before each. `sequences`: packed rows' `attention.SequenceLayout`, to attend
    sequence by sequence (`attention.sequence_attention`) instead of under a segment mask."""
    cfg = self.config
    batch, length, _ = x.shape
    hd, heads, kv_heads = cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads
    dense = lambda n, axes, name, bias_=cfg.qkv_bias: Linear(  # noqa: E731
        n, axes, use_bias=bias_, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
        **_lora_fields(cfg, name))

    q_cos, q_sin, q_x = cos, sin, x
    if query_index is not None:
      at_queries = lambda a: jnp.take_along_axis(  # noqa: E731
          jnp.broadcast_to(a, (batch,) + a.shape[1:]), query_index[..., None], axis=1)
      q_cos, q_sin, q_x = at_queries(cos), at_queries(sin), at_queries(x)
    q = dense(heads * hd, ("embed", "heads"), "q_proj")(q_x).reshape(batch, q_x.shape[1], heads, hd)
    k = dense(kv_heads * hd, ("embed", "kv_heads"), "k_proj")(x).reshape(batch, length, kv_heads, hd)
    v = dense(kv_heads * hd, ("embed", "kv_heads"), "v_proj")(x).reshape(batch, length, kv_heads, hd)
    q = nn.with_logical_constraint(apply_rope(q, q_cos, q_sin), ("batch", "length", "act_heads", "head_dim"))
    k = nn.with_logical_constraint(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", "head_dim"))
    if query_index is not None:  # a few queries per row: plain attention over an explicit bias
      bias = cache_attention_bias(query_index, length, cfg.sliding_window)[:, :, 0]
      out = attention_lib.plain_attention(q, k, v, bias=bias)
    elif sequences is not None:
      out = attention_lib.sequence_attention(q, k, v, sequences, sliding_window=cfg.sliding_window,
                                             **attention_lib.settings(cfg))
    elif decode_positions is None:
      out = attention_lib.dot_product_attention(
          q, k, v, lengths=lengths, causal=True, sliding_window=cfg.sliding_window,
          segment_ids=segment_ids, **attention_lib.settings(cfg))
    else:  # attend over the cache (stored heads-before-slots) instead of over this input alone
      k = _write_cache(self, "key", k, decode_positions)
      v = _write_cache(self, "value", v, decode_positions)
      bias = cache_attention_bias(decode_positions, k.shape[2], cfg.sliding_window)[:, :, 0]
      out = attention_lib.plain_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), bias=bias)
    out = out.reshape(batch, q.shape[1], heads * hd)
    out = nn.with_logical_constraint(out, ("batch", "length", "act_heads"))
    return dense(cfg.hidden_size, ("heads", "embed"), "o_proj", False)(out)


class Mlp(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda n, axes, name: Linear(  # noqa: E731
        n, axes, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name, **_lora_fields(cfg, name))
    gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
    up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden)


class DecoderLayer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, lengths: jax.Array | None, cos: jax.Array, sin: jax.Array,
               decode_positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               query_index: jax.Array | None = None,
               sequences: attention_lib.SequenceLayout | None = None):
    """The next hidden states, [B, L, D] (at `query_index` [B, K] only: [B, K, D])."""
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
    attended = Attention(cfg, name="attn")(
        norm("input_norm")(x), lengths, cos, sin, decode_positions, segment_ids, query_index,
        sequences)
    if query_index is not None:
      x = jnp.take_along_axis(x, query_index[..., None], axis=1)
    x = x + attended
    x = x + Mlp(cfg, name="mlp")(norm("post_attn_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    # The carry/output pair lets the same layer run under nn.scan.
    return x, None


def _embed(cfg: ModelConfig) -> Embed:
  return Embed(cfg.vocab_size, cfg.hidden_size, cfg.dtype, cfg.param_dtype, name="embed")


def _final_norm(cfg: ModelConfig) -> RMSNorm:
  return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")


def _score_head(cfg: ModelConfig) -> Linear:
  return Linear(1, ("embed", "score"), dtype=jnp.float32, param_dtype=cfg.param_dtype,
                stddev=1.0 / math.sqrt(cfg.hidden_size + 1), name="score")


class RewardModel(nn.Module):
  """Decoder LM with a scalar reward head (`score`, as in HF `*ForSequenceClassification`)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
               return_logits: bool = False, logits_every: int = 1,
               decode_positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, reward_index: jax.Array | None = None,
               sequence_index: jax.Array | None = None) -> ModelOutput:
    """Hidden states, rewards at `length - 1`, and (if asked) LM logits.

    `logits_every=2` computes logits only for rows 0, 2, 4, ... (the chosen sequences of an
    interleaved pair batch), which is all PMP's LM loss needs.

    Decode mode, for generation: `decode_positions` [B, T] gives each input token's position,
    which is also its slot in the key/value cache (apply with a "cache" collection from
    `init_cache` and `mutable=["cache"]`). Each token attends to the cache slots at or before its
    position, so a right-padded prompt batch prefills in one call and later calls feed one token
    per row at per-row positions. Logits are then computed only at `length - 1` (shape [B, 1, V]):
    the next-token distribution is all generation needs.

    Packed rows: `segment_ids` [B, L] (0 = padding) keep attention within each segment,
    `positions` [B, L] are the RoPE positions (restarting at 0 per segment; default 0..L-1), and
    `reward_index` [B, K] gives the columns to read rewards at (rewards [B, K]) instead of
    `length - 1`. `attention_mask` then only marks real tokens; it is not used for attention.
    With `sequence_index` [B, S, T] (`data.packing`) attention runs sequence by sequence
    (`attention.sequence_attention`; needs `segment_ids` and `positions`), which gives the same
    outputs for less compute where a row holds several short sequences, and lets a pair's shared
    prompt be laid out once for both its sequences (`packing.pack_pairs(shared_prompt=...)`).
    """
    cfg = self.config
    decoding = decode_positions is not None
    embed = _embed(cfg)
    x = nn.with_logical_constraint(embed(input_ids), ("batch", "length", "act_embed"))

    if decoding:
      cos, sin = rope_tables(cfg, decode_positions)
      lengths = None  # each layer masks over its cache
    else:
      if positions is None:
        positions = np.arange(input_ids.shape[1])[None]
      cos, sin = rope_tables(cfg, positions, input_ids.shape[1])
      lengths = None if segment_ids is not None else attention_mask.sum(axis=-1).astype(jnp.int32)
    sequences = None
    if sequence_index is not None:
      row_index = jnp.where(segment_ids > 0,
                            (segment_ids - 1) * sequence_index.shape[2] + positions, -1)
      sequences = attention_lib.sequence_layout(sequence_index, row_index)

    layer_cls = DecoderLayer
    if cfg.remat_policy != "none" and not decoding:
      layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(
          layer_cls, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast,) * 7, length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, name="layers")(x, lengths, cos, sin, decode_positions, segment_ids, None,
                                       sequences)
    else:
      for i in range(cfg.num_layers):
        x, _ = layer_cls(cfg, name=f"layers_{i}")(x, lengths, cos, sin, decode_positions,
                                                  segment_ids, None, sequences)
    hidden = _final_norm(cfg)(x)

    if reward_index is None:
      last = jnp.maximum(attention_mask.sum(axis=-1) - 1, 0)
      last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    else:
      last_hidden = jnp.take_along_axis(hidden, reward_index[..., None], axis=1)
    rewards = _score_head(cfg)(last_hidden.astype(jnp.float32))[..., 0]

    logits = None
    if return_logits or self.is_initializing():  # init always creates the LM head
      rows = last_hidden[:, None] if decoding else hidden[::logits_every]
      if cfg.tie_word_embeddings:
        logits = embed.attend(rows)
      else:
        logits = Linear(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, name="lm_head")(rows)
      logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
    return ModelOutput(hidden, rewards, logits if return_logits else None)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Fresh parameters (boxed with their logical axis names) for `config`."""
  ids = jnp.zeros((1, 8), jnp.int32)
  return RewardModel(config).init(rng, ids, jnp.ones_like(ids))["params"]


def init_cache(config: ModelConfig, batch_size: int, length: int) -> dict:
  """A zero key/value cache (boxed with its logical axis names) for `length` positions per row.

  Its layout follows the params: `layers_{i}/attn/{key,value}` [B, KV, length, hd], or
  `layers/attn/...` with a leading layer axis when `scan_layers`.
  """
  ids = jnp.zeros((batch_size, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
  abstract = jax.eval_shape(lambda: RewardModel(config).init(
      jax.random.key(0), ids, jnp.ones_like(ids), decode_positions=positions)["cache"])
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)


def stack_layers(params: dict, num_layers: int) -> dict:
  """Canonical `layers_0` .. `layers_{num_layers-1}` subtrees -> one `layers` subtree with a
  leading layer axis (later layers, if any, stay as they are)."""
  names = [f"layers_{i}" for i in range(num_layers)]
  if not names:
    return dict(params)
  out = {k: v for k, v in params.items() if k not in names}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[name] for name in names])
  return out


def unstack_layers(params: dict) -> dict:
  """The inverse of `stack_layers`."""
  out = {k: v for k, v in params.items() if k != "layers"}
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out
