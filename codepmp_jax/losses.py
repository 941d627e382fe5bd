"""The PMP objective: Bradley-Terry ranking loss, reward centering and the chosen-response LM loss.

Everything is computed in float32 whatever the input dtype.

Exactness under gradient accumulation and data parallelism. The objective is

  loss = rm_coef * mean_pairs(bt) + center_coef * mean_pairs((r_c + r_r)^2)
         + lm_coef * (sum of LM token losses) / (number of LM tokens),

with both means over the *whole* global batch. Microbatches hold the same number of pairs but
different numbers of LM tokens, so averaging per-microbatch losses would weight LM tokens unevenly.
Instead each microbatch produces sums (`pair_sums`), and `loss_from_sums` divides them by the
global pair and token counts, which are known before the step runs (`count_lm_tokens` on the whole
batch). The loss is linear in the sums once the denominators are fixed, so the gradients of the
microbatch losses add up to exactly the gradient of the full-batch loss; the summed metric sums
turn into the full-batch metrics with `metrics_from_sums`. Across devices the same sums are
reduced by the global jit (or a `psum`).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

LOSS_TYPES = ("sigmoid", "logexp")

# Sums that add up over microbatches and devices; `metrics_from_sums` turns them into metrics.
SUM_KEYS = (
    "num_pairs", "bt_sum", "center_sum", "lm_sum", "lm_count", "correct", "margin_sum",
    "chosen_sum", "chosen_sq_sum", "rejected_sum", "rejected_sq_sum")


def default_loss_config() -> ml_collections.ConfigDict:
  """The objective's fields with the paper's PMP values; RM fine-tuning sets lm_coef to 0."""
  return ml_collections.ConfigDict(dict(
      rm_coef=1.0, lm_coef=1.0, center_coef=0.0, loss_type="sigmoid", use_margin=True))


def split_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits an interleaved `[2B, ...]` array (chosen, rejected, chosen, ...) into chosen and rejected `[B, ...]`."""
  if x.shape[0] % 2:
    raise ValueError(f"interleaved pairs need an even leading size, got shape {x.shape}")
  return x[0::2], x[1::2]


def bradley_terry(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    margin: jax.Array | None = None,
    loss_type: str = "sigmoid",
) -> jax.Array:
  """Per-pair Bradley-Terry loss `[B]`: how strongly the model fails to rank chosen above rejected.

  `sigmoid` is `-log_sigmoid(r_c - r_r - margin)` (TRL RewardTrainer, OpenRLHF PairWiseLoss);
  `logexp` is `log(1 + exp(r_r - r_c + margin))` (OpenRLHF LogExpLoss, which has no margin), computed
  as a softplus so large reward gaps do not overflow. The two are the same function of the reward
  gap; both are offered so configs can name the peer they reproduce.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
  diff = chosen_rewards.astype(jnp.float32) - rejected_rewards.astype(jnp.float32)
  if margin is not None:
    diff = diff - margin.astype(jnp.float32)
  if loss_type == "sigmoid":
    return -jax.nn.log_sigmoid(diff)
  return jax.nn.softplus(-diff)


def reward_centering(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
  """`mean((r_c + r_r)^2)`: the penalty (Eisenstein et al. 2023, TRL) that keeps rewards centred on zero."""
  total = chosen_rewards.astype(jnp.float32) + rejected_rewards.astype(jnp.float32)
  return jnp.mean(jnp.square(total))


def lm_targets(input_ids: jax.Array, lm_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token targets and weights aligned with the logits: position t predicts token t+1.

  The weight at t is `lm_mask[t+1]` (lm_mask marks predicted tokens); the last position predicts
  nothing. Targets and weights keep the length L so the logits never need slicing.
  """
  targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
  weights = jnp.pad(lm_mask[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
  return targets, weights


def count_lm_tokens(lm_mask: jax.Array) -> jax.Array:
  """Number of tokens the LM loss predicts (float32), for the global denominator of `loss_from_sums`."""
  return jnp.sum(lm_mask[..., 1:].astype(jnp.float32))


def lm_cross_entropy(
    logits: jax.Array, input_ids: jax.Array, lm_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over the tokens lm_mask selects, and their count (float32 scalars).

  Returns sums rather than a mean so microbatches and devices combine exactly. Logits may be bf16:
  the log-softmax normaliser is a float32 logsumexp and the target logit is gathered before the
  upcast. Whether XLA still keeps a float32 copy of the `[B, L, V]` logits depends on the backend
  (the CPU one does); `chunked_cross_entropy` (what the train step uses) avoids materialising
  the logits at all; this is its reference.
  """
  if logits.shape[:2] != input_ids.shape or input_ids.shape != lm_mask.shape:
    raise ValueError(
        f"logits {logits.shape}, input_ids {input_ids.shape} and lm_mask {lm_mask.shape} disagree")
  targets, weights = lm_targets(input_ids, lm_mask)
  log_normalizer = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_losses = log_normalizer - target_logits.astype(jnp.float32)
  return jnp.sum(token_losses * weights), jnp.sum(weights)


def chunked_cross_entropy(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array,
                          weights: jax.Array, chunk_len: int = 128) -> tuple[jax.Array, jax.Array]:
  """Weighted cross-entropy sum of `hidden @ lm_head` against `targets`, and the weights' sum.

  `hidden` [B, N, D] (final-normed) predicts `targets` [B, N] with `weights` [B, N]: already
  aligned, e.g. the hidden states gathered before each LM target of a row (`step.microbatch_sums`);
  `lm_head` is `[D, V]` (the `lm_head/kernel`, or `embed/embedding.T` when tied). Logits exist
  `chunk_len` positions at a time, with float32 accumulation, so peak memory holds one
  `[B, chunk_len, V]` float32 block instead of the full logits and their gradient: the
  difference between fitting and not at a 150k vocabulary. Differentiated, each chunk's gradients
  are computed in the forward pass while its logits exist (a fused linear cross-entropy), so the
  backward pass neither recomputes the logits nor keeps them.
  """
  if hidden.shape[:2] != targets.shape or targets.shape != weights.shape:
    raise ValueError(f"hidden {hidden.shape}, targets {targets.shape} and weights {weights.shape} "
                     "disagree")
  weights = weights.astype(jnp.float32)
  chunk_len = min(chunk_len, hidden.shape[1])
  return _linear_cross_entropy(hidden, lm_head, targets, weights, chunk_len), jnp.sum(weights)


def _by_chunk(x: jax.Array, chunk_len: int) -> jax.Array:
  """[B, N, ...] -> [chunks, B, chunk_len, ...], the last chunk padded with zeros."""
  batch, length = x.shape[:2]
  chunks = -(-length // chunk_len)
  x = jnp.pad(x, [(0, 0), (0, chunks * chunk_len - length)] + [(0, 0)] * (x.ndim - 2))
  return jnp.swapaxes(x.reshape((batch, chunks, chunk_len) + x.shape[2:]), 0, 1)


def _from_chunks(x: jax.Array, length: int) -> jax.Array:
  """The inverse of `_by_chunk`."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


def _chunk_losses(h: jax.Array, head: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One chunk's float32 logits [B, C, V], their logsumexp and the per-token losses [B, C]."""
  logits = jnp.einsum("bld,dv->blv", h, head, preferred_element_type=jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
  return logits, log_normalizer, log_normalizer - target_logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _linear_cross_entropy(hidden, lm_head, targets, weights, chunk_len):
  head = lm_head.astype(hidden.dtype)

  def step(total, xs):
    h, t, w = xs
    return total + jnp.sum(_chunk_losses(h, head, t)[2] * w), None

  xs = tuple(_by_chunk(x, chunk_len) for x in (hidden, targets, weights))
  return jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)[0]


def _linear_cross_entropy_fwd(hidden, lm_head, targets, weights, chunk_len):
  head = lm_head.astype(hidden.dtype)

  def step(carry, xs):
    total, grad_head = carry
    h, t, w = xs
    logits, log_normalizer, token_losses = _chunk_losses(h, head, t)
    # d loss / d logits = (softmax - one_hot(target)) * weight
    target = jnp.arange(logits.shape[-1]) == t[..., None]
    grad_logits = ((jnp.exp(logits - log_normalizer[..., None]) - target) * w[..., None]).astype(h.dtype)
    grad_h = jnp.einsum("blv,dv->bld", grad_logits, head, preferred_element_type=jnp.float32)
    grad_head = grad_head + jnp.einsum("bld,blv->dv", h, grad_logits,
                                       preferred_element_type=jnp.float32)
    return (total + jnp.sum(token_losses * w), grad_head), (grad_h.astype(h.dtype), token_losses)

  xs = tuple(_by_chunk(x, chunk_len) for x in (hidden, targets, weights))
  init = (jnp.zeros((), jnp.float32), jnp.zeros(lm_head.shape, jnp.float32))
  (total, grad_head), (grad_hidden, token_losses) = jax.lax.scan(step, init, xs)
  length = hidden.shape[1]
  return total, (_from_chunks(grad_hidden, length), grad_head.astype(lm_head.dtype),
                 _from_chunks(token_losses, length))


def _linear_cross_entropy_bwd(chunk_len, residuals, grad_total):
  del chunk_len
  grad_hidden, grad_head, token_losses = residuals
  return ((grad_total * grad_hidden).astype(grad_hidden.dtype),
          (grad_total * grad_head).astype(grad_head.dtype), None, grad_total * token_losses)


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def pair_sums(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    lm_sum: jax.Array,
    lm_count: jax.Array,
    margin: jax.Array | None,
    cfg: Any,
    valid: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Additive statistics of one (micro)batch, keyed by `SUM_KEYS`; add them across microbatches.

  Rewards, `margin` and `valid` are flat `[P]`. Only the pairs where `valid` is 1 count (a packed
  batch has empty pair slots; None: every pair), so the sums equal those of the valid pairs
  alone. `cfg` needs `loss_type` and `use_margin` (margin is ignored unless `use_margin`).
  """
  chosen = chosen_rewards.astype(jnp.float32)
  rejected = rejected_rewards.astype(jnp.float32)
  w = jnp.ones_like(chosen) if valid is None else valid.astype(jnp.float32)
  bt = bradley_terry(chosen, rejected, margin if cfg.use_margin else None, cfg.loss_type)
  return {
      "num_pairs": jnp.sum(w),
      "bt_sum": jnp.sum(w * bt),
      "center_sum": jnp.sum(w * jnp.square(chosen + rejected)),
      "lm_sum": jnp.asarray(lm_sum, jnp.float32),
      "lm_count": jnp.asarray(lm_count, jnp.float32),
      "correct": jnp.sum(w * (chosen > rejected).astype(jnp.float32)),
      "margin_sum": jnp.sum(w * (chosen - rejected)),
      "chosen_sum": jnp.sum(w * chosen),
      "chosen_sq_sum": jnp.sum(w * jnp.square(chosen)),
      "rejected_sum": jnp.sum(w * rejected),
      "rejected_sq_sum": jnp.sum(w * jnp.square(rejected)),
  }


def loss_from_sums(
    sums: dict[str, jax.Array],
    cfg: Any,
    num_pairs: jax.Array | float | None = None,
    lm_count: jax.Array | float | None = None,
) -> jax.Array:
  """The scalar objective from sums, divided by the global pair and LM-token counts.

  For a microbatch of an accumulated step pass the whole batch's `num_pairs` and `lm_count`
  (see the module docstring); left out, the counts in `sums` are used. `cfg` needs `rm_coef`,
  `lm_coef` and `center_coef`.
  """
  pairs = sums["num_pairs"] if num_pairs is None else jnp.asarray(num_pairs, jnp.float32)
  tokens = sums["lm_count"] if lm_count is None else jnp.asarray(lm_count, jnp.float32)
  loss = cfg.rm_coef * sums["bt_sum"] / pairs
  loss = loss + cfg.center_coef * sums["center_sum"] / pairs
  return loss + cfg.lm_coef * sums["lm_sum"] / jnp.maximum(tokens, 1.0)


def metrics_from_sums(sums: dict[str, jax.Array], cfg: Any) -> dict[str, jax.Array]:
  """Logged metrics of a whole batch from its summed statistics.

  Reward std is the population std (ddof 0), from sums of squares; float32 cancellation makes it
  inexact only when |mean| is ~1e3 times the std, far beyond the rewards a trained RM produces.
  """
  pairs = sums["num_pairs"]

  def std(total, sq_total):
    return jnp.sqrt(jnp.maximum(sq_total / pairs - jnp.square(total / pairs), 0.0))

  return {
      "loss": loss_from_sums(sums, cfg),
      "bt_loss": sums["bt_sum"] / pairs,
      "lm_loss": sums["lm_sum"] / jnp.maximum(sums["lm_count"], 1.0),
      "accuracy": sums["correct"] / pairs,
      "margin": sums["margin_sum"] / pairs,
      "chosen_reward_mean": sums["chosen_sum"] / pairs,
      "chosen_reward_std": std(sums["chosen_sum"], sums["chosen_sq_sum"]),
      "rejected_reward_mean": sums["rejected_sum"] / pairs,
      "rejected_reward_std": std(sums["rejected_sum"], sums["rejected_sq_sum"]),
  }
