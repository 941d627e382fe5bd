"""Sampling from the decoder with a key/value cache: Best-of-N candidates and a local synthesis backend.

Prompts of different lengths share one batch right-padded, exactly like training batches: every
position is the token's index in its own sequence, so RoPE and the cache slots start at 0 in every
row. A jitted prefill fills the cache (preallocated for prompt + `max_new_tokens`), then a jitted
`lax.while_loop` samples one token per row per step, writing each row's key/value at its own
position. `n` samples per prompt share one prefill. Rows stop on an end token; stop strings are
checked on the host every `stop_check_every` steps (they need the tokenizer). Under a mesh the
prompts are split over the data axes and the cache is sharded like the activations.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from codepmp_jax import sharding
from codepmp_jax.data.encode import bucket_length
from codepmp_jax.model import transformer
from codepmp_jax.model.config import ModelConfig

PROMPT_BUCKETS_PER_OCTAVE = 4


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample: temperature 0 is greedy; `top_k=0` and `top_p=1` switch those filters off."""

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  n: int = 1
  seed: int = 0
  stop: tuple[str, ...] = ()

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.n < 1:
      raise ValueError(f"n must be >= 1, got {self.n}")


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sampled continuation.

  `tokens` are the generated ids before the end token; `text` (with a tokenizer) is their text
  without special tokens (as transformers' `decode(..., skip_special_tokens=True)`), cut before
  the first stop string. `finish_reason` is "eos", "stop" or "length".
  """

  tokens: list[int]
  finish_reason: str
  text: str | None = None


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits [..., V] with everything outside the top-k and the top-p nucleus set to -inf.

  The nucleus is the smallest set of most likely tokens whose probability reaches `top_p` (the
  Hugging Face / Holtzman et al. definition); tokens tied with its least likely member stay.
  """
  logits = logits.astype(jnp.float32)
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the first has mass 0 before
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """One token per row of `logits` [B, V], each row drawn with its own key (`keys` [B])."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def row_keys(seed: int, prompt_ids: Sequence[int], n: int) -> jax.Array:
  """Keys [len(prompt_ids) * n], one per sample, depending only on (seed, prompt id, sample index).

  A prompt's samples are thus the same whatever batch it lands in, so reruns reproduce them.
  """
  base = jax.random.key(seed)
  per_prompt = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(prompt_ids, jnp.uint32))
  per_sample = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))
  return per_sample(per_prompt).reshape(-1)


class _DecodeState(NamedTuple):
  cache: Any  # the "cache" collection, [B, S, KV, hd] per layer
  logits: jax.Array  # [B, V] float32, the next token's logits
  tokens: jax.Array  # [B, max_new_tokens] int32, pad after a row is done
  positions: jax.Array  # [B] int32, the position (= cache slot) of the next token
  done: jax.Array  # [B] bool
  step: jax.Array  # [] int32, tokens generated so far
  keys: jax.Array  # [B] PRNG keys


class Generator:
  """Batched sampling from one model; jitted programs are reused across calls of the same shapes.

  `mesh` (with logical `rules`) places the params as in training and splits prompts over the data
  axes. Prompts are padded to one of a few lengths (`encode.bucket_length`: at least
  `min_prompt_bucket`, then 4 steps per doubling), which bounds both recompilation and the prefill
  compute spent on padding (under 25%).
  """

  def __init__(self, params: Any, config: ModelConfig, *, tokenizer: Any = None,
               eos_ids: Sequence[int] | None = None, mesh: Mesh | None = None,
               rules: sharding.LogicalRules = sharding.DEFAULT_RULES, min_prompt_bucket: int = 16,
               stop_check_every: int = 16):
    self.config = config.replace(remat_policy="none")
    if config.scan_layers and "layers" not in params:
      params = transformer.stack_layers(params, config.num_layers)
    elif not config.scan_layers and "layers" in params:
      params = transformer.unstack_layers(params)
    self.tokenizer = tokenizer
    if eos_ids is None:
      eos_ids = {i for i in (config.eos_token_id, getattr(tokenizer, "eos_id", None)) if i is not None}
    self.eos_ids = tuple(sorted(eos_ids))
    self.pad_id = next(i for i in (config.pad_token_id, getattr(tokenizer, "pad_id", None), 0)
                       if i is not None)
    self.mesh, self.rules = mesh, rules
    self.min_prompt_bucket, self.stop_check_every = min_prompt_bucket, stop_check_every
    self._model = transformer.RewardModel(self.config)
    self._batch_shards = 1
    if mesh is not None:
      specs = nn.get_partition_spec(jax.eval_shape(
          lambda: transformer.init_params(self.config, jax.random.key(0))))
      params = jax.device_put(params, sharding.logical_sharding(specs, mesh, rules))
      batch_axes = nn.logical_to_mesh_axes(("batch",), rules)[0] or ()
      batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
      self._batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
    else:  # host (numpy) params would be copied to the device again on every call
      params = jax.device_put(params)
    self.params = params
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("n", "max_new_tokens"))
    self._decode = jax.jit(self._decode_fn, static_argnames=("sampler",), donate_argnums=(1,))

  def _context(self) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    if self.mesh is not None:
      stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def _prefill_fn(self, params, ids, lengths, keys, *, n: int, max_new_tokens: int) -> _DecodeState:
    batch, length = ids.shape
    boxed = transformer.init_cache(self.config, batch, length + max_new_tokens)
    specs = nn.get_partition_spec(boxed)
    cache = jax.tree.map(nn.with_logical_constraint, nn.unbox(boxed), specs)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), ids.shape)
    last = jnp.maximum(lengths - 1, 0).astype(jnp.int32)[:, None]
    out, variables = self._model.apply(
        {"params": params, "cache": cache}, ids, None, positions, last, return_logits=True,
        decode=True, mutable=["cache"])
    repeat = lambda x, axis=0: jnp.repeat(x, n, axis=axis)  # noqa: E731  (a prompt's samples adjacent)
    cache = jax.tree.map(lambda c, spec: nn.with_logical_constraint(repeat(c, spec.index("batch")), spec),
                         variables["cache"], specs)
    rows = batch * n
    return _DecodeState(
        cache=cache, logits=repeat(out.logits[:, 0].astype(jnp.float32)),
        tokens=jnp.full((rows, max_new_tokens), self.pad_id, jnp.int32),
        positions=repeat(lengths).astype(jnp.int32), done=repeat(lengths == 0),
        step=jnp.zeros((), jnp.int32), keys=keys)

  def _decode_fn(self, params, state: _DecodeState, stop_at: jax.Array, *,
                 sampler: tuple[float, int, float]) -> _DecodeState:
    eos = jnp.asarray(self.eos_ids or (-1,), jnp.int32)

    def body(s: _DecodeState) -> _DecodeState:
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s.keys, s.step)
      token = jnp.where(s.done, self.pad_id, sample_tokens(s.logits, keys, *sampler))
      tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
      done = s.done | jnp.isin(token, eos)
      out, variables = self._model.apply(
          {"params": params, "cache": s.cache}, token[:, None], None, s.positions[:, None],
          jnp.zeros_like(token[:, None]), return_logits=True, decode=True, mutable=["cache"])
      return s._replace(cache=variables["cache"], logits=out.logits[:, 0].astype(jnp.float32),
                        tokens=tokens, positions=s.positions + 1, done=done, step=s.step + 1)

    def cond(s: _DecodeState) -> jax.Array:
      return (s.step < stop_at) & ~jnp.all(s.done)

    return jax.lax.while_loop(cond, body, state)

  def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
               prompt_ids: Sequence[int] | None = None) -> list[list[Completion]]:
    """`sampling.n` completions of every prompt (token ids), in prompt order.

    `prompt_ids` (default 0, 1, ...) pick each prompt's random stream together with the seed.
    """
    if sampling.stop and self.tokenizer is None:
      raise ValueError("stop strings need a tokenizer (Generator(tokenizer=...))")
    for i, p in enumerate(prompts):
      if not len(p):
        raise ValueError(f"prompt {i} is empty; a prompt needs at least one token")
    prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    if len(prompt_ids) != len(prompts):
      raise ValueError(f"{len(prompt_ids)} prompt ids for {len(prompts)} prompts")
    batch = -(-len(prompts) // self._batch_shards) * self._batch_shards  # filler rows: length 0
    length = bucket_length(max(len(p) for p in prompts), self.min_prompt_bucket,
                           PROMPT_BUCKETS_PER_OCTAVE)
    ids = np.full((batch, length), self.pad_id, np.int32)
    lengths = np.zeros((batch,), np.int32)
    for row, p in enumerate(prompts):
      ids[row, :len(p)] = p
      lengths[row] = len(p)
    keys = row_keys(sampling.seed, prompt_ids + [0] * (batch - len(prompts)), sampling.n)
    tokens = self._run(ids, lengths, keys, sampling)
    return [[self._completion(tokens[i * sampling.n + j], sampling) for j in range(sampling.n)]
            for i in range(len(prompts))]

  def _run(self, ids: np.ndarray, lengths: np.ndarray, keys: jax.Array,
           sampling: SamplingConfig) -> np.ndarray:
    """Generated tokens [rows, max_new_tokens], pad after a row's end token."""
    sampler = (float(sampling.temperature), int(sampling.top_k), float(sampling.top_p))
    chunk = self.stop_check_every if sampling.stop else sampling.max_new_tokens
    with self._context():
      if self.mesh is not None:
        put = lambda x: jax.device_put(  # noqa: E731
            x, sharding.batch_sharding(self.mesh, self.rules))
        ids, lengths, keys = put(ids), put(lengths), put(keys)
      state = self._prefill(self.params, ids, lengths, keys, n=sampling.n,
                            max_new_tokens=sampling.max_new_tokens)
      while True:
        stop_at = min(int(state.step) + chunk, sampling.max_new_tokens)
        state = self._decode(self.params, state, jnp.int32(stop_at), sampler=sampler)
        step, done = int(state.step), np.asarray(state.done)
        if sampling.stop:
          tokens = np.asarray(state.tokens[:, :step])
          for row in np.flatnonzero(~done):
            if any(s in self.tokenizer.decode(tokens[row], skip_special_tokens=True) for s in sampling.stop):
              done[row] = True
          state = state._replace(done=jax.device_put(done, state.done.sharding))
        if step >= sampling.max_new_tokens or done.all():
          return np.asarray(state.tokens)

  def _completion(self, tokens: np.ndarray, sampling: SamplingConfig) -> Completion:
    ends = np.flatnonzero(np.isin(tokens, self.eos_ids)) if self.eos_ids else []
    if len(ends):
      tokens, reason = tokens[:ends[0]], "eos"
    else:
      reason = "length"
    tokens = [int(t) for t in tokens]
    text = None
    if self.tokenizer is not None:
      text = self.tokenizer.decode(tokens, skip_special_tokens=True)  # the text, as transformers decodes it
      cuts = [text.find(s) for s in sampling.stop if s in text]
      if cuts:
        text, reason = text[:min(cuts)], "stop"
    return Completion(tokens, reason, text)

  def generate_text(self, prompts: Sequence[str], sampling: SamplingConfig,
                    prompt_ids: Sequence[int] | None = None, add_bos: bool = False
                    ) -> list[list[Completion]]:
    """`generate` on text prompts (encoded with the tokenizer, optionally after its BOS token)."""
    if self.tokenizer is None:
      raise ValueError("generate_text needs a tokenizer (Generator(tokenizer=...))")
    encoded = self.tokenizer.encode_batch(list(prompts))
    if add_bos:
      if self.tokenizer.bos_id is None:
        raise ValueError("add_bos: the tokenizer has no BOS token")
      encoded = [[self.tokenizer.bos_id] + e for e in encoded]
    return self.generate(encoded, sampling, prompt_ids)

