"""The jitted train and eval steps, and the sharded train state they work on.

The steps read one batch layout (docs/contracts.md, `data.packing`): rows `[R, L]` holding pairs
side by side, several a row when packed (`data.pack`), one a row otherwise (bucketed pairs). The
step optimises `rm_coef * BT + lm_coef * LM (+ centering)`. With `microbatches > 1` the batch is
split inside the step and gradients are accumulated by `lax.scan`; the loss of each microbatch is
divided by the whole batch's pair and LM-token counts, so the accumulated gradient is exactly the
full-batch gradient (see `losses`). The LM loss is computed in chunks from the hidden states
before the LM targets (no `[rows, L, V]` logits).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from codepmp_jax import losses, optim, sharding
from codepmp_jax.data import packing
from codepmp_jax.model import transformer
from codepmp_jax.model.config import ModelConfig

Batch = dict[str, jax.Array]
BATCH_KEYS = packing.PACKED_KEYS
# Positions per block of the chunked LM loss (`train.lm_chunk`; 0 = full logits).
DEFAULT_LM_CHUNK = 256


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def state_shardings(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: sharding.LogicalRules) -> tuple[TrainState, TrainState]:
  """Abstract train state (shapes only) and its NamedShardings from the params' logical axes."""
  boxed = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))
  param_shardings = sharding.logical_sharding(nn.get_partition_spec(boxed), mesh, rules)
  params = nn.unbox(boxed)
  opt_state = jax.eval_shape(optimizer.init, params)
  opt_shardings = optim.opt_state_shardings(opt_state, params, param_shardings,
                                            sharding.replicated(mesh))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
  shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings)
  return abstract, shardings


def batch_shardings(mesh: Mesh, rules: sharding.LogicalRules) -> dict[str, NamedSharding]:
  """Batches are split over their rows (a pair's two sequences share a row, so stay together)."""
  return {key: sharding.batch_sharding(mesh, rules) for key in BATCH_KEYS}


def lm_head_kernel(params: Any, model_config: ModelConfig) -> jax.Array:
  """The `[D, V]` LM head: `lm_head/kernel`, or the transposed embedding when tied."""
  if model_config.tie_word_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


def microbatch_sums(model: transformer.RewardModel, params: Any, batch: Batch, loss_cfg: Any,
                    lm_chunk: int = DEFAULT_LM_CHUNK) -> dict[str, jax.Array]:
  """Additive loss statistics of one (micro)batch.

  Rewards are read at `reward_index` (chosen, rejected, chosen, ... per row); empty pair slots
  (`pair_valid` 0) add nothing. With `lm_chunk > 0` the LM head runs only on the hidden states
  before the LM targets (`lm_index`), `lm_chunk` of them at a time
  (`losses.chunked_cross_entropy`), not over the rejected sequences and padding that share the
  rows, so the `[rows, L, V]` logits and their gradient never exist; 0 computes the full logits
  of every row (the reference). No target crosses a segment boundary: a segment's first token is
  never in `lm_mask`.
  """
  want_lm = loss_cfg.lm_coef != 0
  chunked = want_lm and lm_chunk > 0
  ids = batch["input_ids"]
  out = model.apply({"params": params}, ids, batch["segment_ids"], batch["positions"],
                    batch["reward_index"], batch["sequence_index"],
                    return_logits=want_lm and not chunked)
  chosen, rejected = out.rewards[:, 0::2].reshape(-1), out.rewards[:, 1::2].reshape(-1)
  if chunked:
    index = batch["lm_index"]
    before = jnp.take_along_axis(out.hidden_states, jnp.maximum(index - 1, 0)[..., None], axis=1)
    weights = jnp.take_along_axis(batch["lm_mask"], index, axis=1) * (index > 0)
    lm_sum, lm_count = losses.chunked_cross_entropy(
        before, lm_head_kernel(params, model.config), jnp.take_along_axis(ids, index, axis=1),
        weights, lm_chunk)
  elif want_lm:
    lm_sum, lm_count = losses.lm_cross_entropy(out.logits, ids, batch["lm_mask"])
  else:
    lm_sum = lm_count = jnp.zeros((), jnp.float32)
  return losses.pair_sums(chosen, rejected, lm_sum, lm_count, batch["margin"].reshape(-1), loss_cfg,
                          valid=batch["pair_valid"].reshape(-1))


def batch_counts(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(pairs, LM target tokens) of a whole batch: what every microbatch's loss is divided by."""
  return (jnp.maximum(jnp.sum(batch["pair_valid"].astype(jnp.float32)), 1.0),
          losses.count_lm_tokens(batch["lm_mask"]))


def packing_efficiency(batch: Batch) -> jax.Array:
  """Real tokens (`segment_ids > 0`) / row positions: the share of the step's compute not spent
  on padding."""
  return jnp.mean((batch["segment_ids"] > 0).astype(jnp.float32))


def trainable_grad(loss_fn: Callable, params: Any, trainable: str
                   ) -> tuple[Callable, Callable, Callable]:
  """(grad_fn, complete, keep_frozen) for training only the leaves of `params` (arrays or
  shapes) that `optim.trainable_mask(params, trainable)` marks.

  `grad_fn(params, *args)` is `jax.grad(loss_fn, has_aux=True)` over the trainable leaves only,
  returning (their gradients as a list, aux): frozen weights' gradients are never computed, nor
  accumulated over microbatches, and backpropagation stops below the lowest trainable layer
  (`top:N`). `complete(grads, params)` puts zeros in the frozen places (for the optimizer, which
  ignores them: `optim.make_optimizer`); `keep_frozen(new, old)` takes the frozen leaves from
  `old`, so they stay bit-for-bit what they were.
  """
  treedef = jax.tree.structure(params)
  flags = jax.tree.leaves(optim.trainable_mask(params, trainable))

  def grad_fn(params, *args):
    leaves = treedef.flatten_up_to(params)

    def partial_loss(train, *args):
      train = iter(train)
      return loss_fn(treedef.unflatten([next(train) if f else x for x, f in zip(leaves, flags)]), *args)

    return jax.grad(partial_loss, has_aux=True)([x for x, f in zip(leaves, flags) if f], *args)

  def complete(grads, params):
    grads = iter(grads)
    return treedef.unflatten([next(grads) if f else jnp.zeros_like(x)
                              for x, f in zip(treedef.flatten_up_to(params), flags)])

  def keep_frozen(new, old):
    return treedef.unflatten([n if f else o for n, o, f in zip(
        treedef.flatten_up_to(new), treedef.flatten_up_to(old), flags)])

  return grad_fn, complete, keep_frozen


def _split_microbatches(batch: Batch, microbatches: int) -> Batch:
  """[R, ...] -> [M, R/M, ...] taking every M-th row, so each microbatch spans all devices."""
  def split(x):
    if x.shape[0] % microbatches:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into "
                       f"{microbatches} microbatches")
    return x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def accumulate(fn: Callable[[Batch], Any], batch: Batch, microbatches: int) -> Any:
  """`fn(batch)` (a pytree of sums) as the sum of `fn` over `microbatches` microbatches, added by
  `lax.scan` so only one microbatch's activations are live at a time."""
  if microbatches == 1:
    return fn(batch)
  split = _split_microbatches(batch, microbatches)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, jax.tree.map(lambda x: x[0], split)))
  return jax.lax.scan(lambda carry, mb: (jax.tree.map(jnp.add, carry, fn(mb)), None), zeros, split)[0]


def make_train_step(model: transformer.RewardModel, optimizer: optax.GradientTransformation,
                    loss_cfg: Any, microbatches: int = 1, lm_chunk: int = DEFAULT_LM_CHUNK,
                    trainable: str = "all") -> Callable[[TrainState, Batch], tuple]:
  """(state, batch) -> (new state, metrics); jit it with `jit_train_step`. Microbatches split
  the rows, every M-th one.

  `trainable` (`train.trainable`, the optimizer's too): gradients are computed, accumulated and
  measured (`grad_norm`) for the trainable parameters only (`trainable_grad`); the others stay
  as they are. The loss divides by the whole batch's pairs and LM tokens, so the loss and
  gradients do not depend on how the pairs are packed into rows or split into microbatches.
  Metrics: those of `losses.metrics_from_sums`, `grad_norm`, and `packing_efficiency`.
  """

  def loss_fn(params, microbatch, num_pairs, lm_count):
    sums = microbatch_sums(model, params, microbatch, loss_cfg, lm_chunk)
    return losses.loss_from_sums(sums, loss_cfg, num_pairs, lm_count), sums

  def train_step(state: TrainState, batch: Batch):
    grad_fn, complete, keep_frozen = trainable_grad(loss_fn, state.params, trainable)
    num_pairs, lm_count = batch_counts(batch)
    grads, sums = accumulate(lambda mb: grad_fn(state.params, mb, num_pairs, lm_count), batch,
                             microbatches)
    updates, opt_state = optimizer.update(complete(grads, state.params), state.opt_state,
                                          state.params)
    params = keep_frozen(optax.apply_updates(state.params, updates), state.params)
    metrics = losses.metrics_from_sums(sums, loss_cfg)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["packing_efficiency"] = packing_efficiency(batch)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: transformer.RewardModel, loss_cfg: Any, microbatches: int = 1,
                   lm_chunk: int = DEFAULT_LM_CHUNK) -> Callable[[Any, Batch], dict]:
  """(params, batch) -> additive sums; add them over the eval set, then `losses.metrics_from_sums`.

  With `microbatches > 1` the batch is split as in training and the sums are added by `lax.scan`,
  so evaluation needs no more activation memory than a training microbatch.
  """
  def eval_step(params, batch):
    return accumulate(lambda mb: microbatch_sums(model, params, mb, loss_cfg, lm_chunk),
                      batch, microbatches)
  return eval_step


def jit_train_step(train_step: Callable, state_sharding: TrainState,
                   batch_sharding: dict[str, NamedSharding], mesh: Mesh) -> Callable:
  """One jit with explicit in/out shardings; the old state is donated."""
  return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)


def jit_eval_step(eval_step: Callable, param_sharding: Any,
                  batch_sharding: dict[str, NamedSharding], mesh: Mesh) -> Callable:
  return jax.jit(eval_step, in_shardings=(param_sharding, batch_sharding),
                 out_shardings=sharding.replicated(mesh))
