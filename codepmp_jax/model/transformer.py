"""The reward model: a Llama / Qwen2 / Mistral decoder with a scalar `score` head and an LM head.

One class serves pretraining (PMP needs both the reward and the LM logits), fine-tuning and
scoring (reward only). It reads one batch layout (docs/contracts.md): rows of tokens with
`segment_ids` (1, 2, ... per sequence, 0 = padding), `positions` (RoPE positions, restarting per
sequence) and `reward_index` (the columns to read rewards at). A row may hold several sequences
(`codepmp_jax.data.packing`) or one (`right_padded`: a right-padded sequence per row, as scoring
builds them); attention stays within each sequence. Dense layers multiply 2-D
`[tokens, features]` activations, which keeps the backward matmuls on the fast path of XLA's CPU
and GPU backends.

Generation (`codepmp_jax.model.generate`) runs the same model incrementally (`decode=True`): every
attention layer writes its keys and values into a preallocated key/value cache (the Flax "cache"
collection, see `init_cache`) at the tokens' positions and attends over the cache.
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
  hidden_states: jax.Array  # [B, L, D] after the final norm ([B, K, D] at `reward_index` when rewards_only)
  rewards: jax.Array  # [B, K] float32 at `reward_index`
  logits: jax.Array | None  # [B, L, V] when asked ([B, K, V] at `reward_index` when decoding)


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
  computes them) and looked up; numpy `positions` look up at trace time too (computed in the
  program instead, cos and sin would be fused into every attention block's consumer and evaluated
  there per element). Without `num_positions` (decoding, where positions are bounded only by the
  cache) they are computed in the program.
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
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               segment_ids: jax.Array | None = None,
               sequences: attention_lib.SequenceLayout | None = None,
               query_index: jax.Array | None = None,
               decode_positions: jax.Array | None = None) -> jax.Array:
    """Causal self-attention of `x` [B, L, D]: within each sequence of `sequences` (a packed
    row's `attention.SequenceLayout`, attended sequence by sequence) or of `segment_ids` [B, L]
    (a same-segment mask), or over the whole row when neither is given. `query_index` [B, K]:
    queries (and the output, [B, K, D]) only at these columns, each over the keys at or before it
    in its segment. `decode_positions` [B, T]: write keys and values into the cache at these
    slots and attend over the cache."""
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
      if segment_ids is not None:
        own = jnp.take_along_axis(segment_ids, query_index, axis=1)
        other = own[:, :, None] != segment_ids[:, None, :]
        bias = jnp.where(other[:, None], attention_lib.MASK_VALUE, bias)
      out = attention_lib.plain_attention(q, k, v, bias=bias)
    elif decode_positions is not None:  # over the cache (stored heads-before-slots)
      k = _write_cache(self, "key", k, decode_positions)
      v = _write_cache(self, "value", v, decode_positions)
      bias = cache_attention_bias(decode_positions, k.shape[2], cfg.sliding_window)[:, :, 0]
      out = attention_lib.plain_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), bias=bias)
    elif sequences is not None:
      out = attention_lib.sequence_attention(q, k, v, sequences, sliding_window=cfg.sliding_window,
                                             **attention_lib.settings(cfg))
    else:
      out = attention_lib.dot_product_attention(
          q, k, v, causal=True, sliding_window=cfg.sliding_window, segment_ids=segment_ids,
          **attention_lib.settings(cfg))
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
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               segment_ids: jax.Array | None = None,
               sequences: attention_lib.SequenceLayout | None = None,
               query_index: jax.Array | None = None,
               decode_positions: jax.Array | None = None):
    """The next hidden states, [B, L, D] (at `query_index` [B, K] only: [B, K, D]); the
    arguments are `Attention`'s."""
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
    attended = Attention(cfg, name="attn")(
        norm("input_norm")(x), cos, sin, segment_ids, sequences, query_index, decode_positions)
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


def _scanned(layer_cls: type[nn.Module], length: int) -> type[nn.Module]:
  """`length` layers under `nn.scan`, their parameters (and cache) stacked on a leading `layers` axis."""
  return nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast,) * 6, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})


def _split_last_layer(variables: dict) -> dict:
  """Stacked layer parameters as `_LastLayerAtRewards` reads them: all but the last, and the last."""
  stacked = variables["params"]
  return {"params": {"head": jax.tree.map(lambda a: a[:-1], stacked),
                     "last": jax.tree.map(lambda a: a[-1], stacked)}}


class _LastLayerAtRewards(nn.Module):
  """A scanned model's layers with the last one run at the reward columns only (`rewards_only`):
  the stacked parameters split by `_split_last_layer`, the layers below the last still scanned."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids, sequences, reward_index):
    if self.config.num_layers > 1:
      x, _ = _scanned(DecoderLayer, self.config.num_layers - 1)(self.config, name="head")(
          x, cos, sin, segment_ids, sequences, None, None)
    return DecoderLayer(self.config, name="last")(x, cos, sin, segment_ids, None, reward_index)[0]


class RewardModel(nn.Module):
  """Decoder LM with a scalar reward head (`score`, as in HF `*ForSequenceClassification`)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array | None, positions: jax.Array,
               reward_index: jax.Array, sequence_index: jax.Array | None = None, *,
               return_logits: bool = False, rewards_only: bool = False,
               decode: bool = False) -> ModelOutput:
    """Final hidden states, rewards at `reward_index` [B, K] and (if asked) LM logits.

    Training and scoring: `input_ids`, `segment_ids`, `positions` [B, L] as in the batch layout
    (docs/contracts.md); a token attends only within its segment. With `sequence_index` [B, S, T]
    (`data.packing`) attention runs sequence by sequence (`attention.sequence_attention`): the same
    outputs for less compute where a row holds several short sequences, and a pair's shared
    prompt laid out once for both its sequences. `rewards_only` (scoring) runs the last layer at
    the reward columns only, as a reward needs nothing else of it (the hidden states are then
    [B, K, D]); it needs every sequence whole in its own segment (no shared prompts).

    Decode (`decode=True`, generation): `positions` [B, T] are the tokens' positions and their
    slots in the key/value cache (apply with a "cache" collection from `init_cache` and
    `mutable=["cache"]`); each token attends to the slots at or before its position, so a
    right-padded prompt batch prefills in one call and later calls feed one token per row.
    `segment_ids` is not read; logits are computed at `reward_index` only ([B, K, V]).
    """
    cfg = self.config
    embed = _embed(cfg)
    x = nn.with_logical_constraint(embed(input_ids), ("batch", "length", "act_embed"))
    cos, sin = rope_tables(cfg, positions, None if decode else input_ids.shape[1])
    if decode:
      segment_ids = sequence_index = None
    sequences = None
    if sequence_index is not None:
      row_index = jnp.where(segment_ids > 0,
                            (segment_ids - 1) * sequence_index.shape[2] + positions, -1)
      sequences = attention_lib.sequence_layout(sequence_index, row_index)
    cache_slots = positions if decode else None

    layer_cls = DecoderLayer
    if cfg.remat_policy != "none" and not decode:
      layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    at_rewards_only = rewards_only and not decode
    if cfg.scan_layers and at_rewards_only:
      x = nn.map_variables(_LastLayerAtRewards, "params", trans_in_fn=_split_last_layer, init=False,
                           mutable=False)(cfg, name="layers")(x, cos, sin, segment_ids, sequences,
                                                              reward_index)
    elif cfg.scan_layers:
      x, _ = _scanned(layer_cls, cfg.num_layers)(cfg, name="layers")(
          x, cos, sin, segment_ids, sequences, None, cache_slots)
    else:
      for i in range(cfg.num_layers):
        last = at_rewards_only and i == cfg.num_layers - 1
        x, _ = layer_cls(cfg, name=f"layers_{i}")(
            x, cos, sin, segment_ids, None if last else sequences, reward_index if last else None,
            cache_slots)
    hidden = _final_norm(cfg)(x)
    at_rewards = hidden if at_rewards_only else jnp.take_along_axis(
        hidden, reward_index[..., None], axis=1)
    rewards = _score_head(cfg)(at_rewards.astype(jnp.float32))[..., 0]

    logits = None
    if return_logits or self.is_initializing():  # init always creates the LM head
      rows = at_rewards if decode else hidden
      if cfg.tie_word_embeddings:
        logits = embed.attend(rows)
      else:
        logits = Linear(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, name="lm_head")(rows)
      logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
    return ModelOutput(hidden, rewards, logits if return_logits else None)


def right_padded(lengths: jax.Array | np.ndarray, length: int,
                 sequence_index: bool = True) -> dict[str, jax.Array]:
  """`RewardModel`'s layout inputs for rows of one right-padded sequence each: `lengths` [B] real
  tokens of `length` columns; segment 1 on the real tokens (0 on padding), positions 0, 1, ...,
  the reward at the last real token, and (with `sequence_index`) the row as its one sequence, so
  attention runs the kernels' causal-with-lengths case.

    model.apply(variables, input_ids, **right_padded(attention_mask.sum(-1), input_ids.shape[1]))
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  columns = jnp.arange(length, dtype=jnp.int32)[None]
  real = columns < lengths[:, None]
  inputs = {"segment_ids": real.astype(jnp.int32),
            "positions": jnp.broadcast_to(columns, real.shape),
            "reward_index": jnp.maximum(lengths - 1, 0)[:, None]}
  if sequence_index:
    inputs["sequence_index"] = jnp.where(real, columns, -1)[:, None]
  return inputs


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Fresh parameters (boxed with their logical axis names) for `config`."""
  ids = jnp.zeros((1, 8), jnp.int32)
  return RewardModel(config).init(rng, ids, **right_padded(jnp.array([8]), 8, False))["params"]


def init_cache(config: ModelConfig, batch_size: int, length: int) -> dict:
  """A zero key/value cache (boxed with its logical axis names) for `length` positions per row.

  Its layout follows the params: `layers_{i}/attn/{key,value}` [B, KV, length, hd], or
  `layers/attn/...` with a leading layer axis when `scan_layers`.
  """
  ids = jnp.zeros((batch_size, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
  abstract = jax.eval_shape(lambda: RewardModel(config).init(
      jax.random.key(0), ids, None, positions, jnp.zeros((batch_size, 1), jnp.int32),
      decode=True)["cache"])
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
