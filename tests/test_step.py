"""The jitted train step: the same loss and gradients on every mesh, and exact gradient accumulation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codepmp_jax import losses, optim, sharding, step
from codepmp_jax.data import packing
from codepmp_jax.data.encode import PairArrays
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset

MODEL = get_preset("tiny", num_heads=4, num_kv_heads=2)
LOSS = ml_collections.ConfigDict(dict(
    rm_coef=1.0, lm_coef=1.0, center_coef=0.01, loss_type="sigmoid", use_margin=True))


def _batch(pairs=8, length=16, seed=0):
  """Random pairs of 4..`length` tokens, one a row (`packing.pair_rows`), with an LM mask on the
  chosen responses."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, length + 1, size=(pairs, 2))
  tokens = rng.integers(3, MODEL.vocab_size, size=int(lengths.sum())).astype(np.int32)
  prompt = rng.integers(1, 4, size=(pairs, 1)).repeat(2, axis=1)
  margin = rng.uniform(0, 0.5, size=(pairs,)).astype(np.float32)
  return packing.pair_rows(PairArrays.from_lengths(tokens, lengths, prompt, margin), length, 0)


def _run_step(mesh_shape, microbatches=1, model_config=MODEL):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  rules = sharding.DEFAULT_RULES
  opt_cfg = optim.default_optimizer_config()
  opt_cfg.lr = 1e-3
  optimizer = optim.make_optimizer(opt_cfg, total_steps=10)
  abstract, state_sharding = step.state_shardings(model_config, optimizer, mesh, rules)
  params = nn.unbox(transformer.init_params(model_config, jax.random.key(1)))
  state = step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  batch_sharding = step.batch_shardings(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.device_put(state, state_sharding)
    batch = jax.device_put(_batch(), batch_sharding)
    train_step = step.jit_train_step(
        step.make_train_step(transformer.RewardModel(model_config), optimizer, LOSS, microbatches),
        state_sharding, batch_sharding, mesh)
    new_state, metrics = train_step(state, batch)
  return state_sharding, jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def reference():
  return _run_step((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [  # (2, 2, 2) uses every axis: the fast tier keeps it
    pytest.param((8, 1, 1), marks=pytest.mark.slow), (2, 2, 2),
    pytest.param((1, 2, 4), marks=pytest.mark.slow)])
def test_same_update_on_every_mesh(reference, mesh_shape):
  _, ref_params, ref_metrics = reference
  _, params, metrics = _run_step(mesh_shape)
  for key in ("loss", "bt_loss", "lm_loss", "grad_norm", "accuracy", "margin"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params)


@pytest.mark.slow
def test_fsdp_shards_every_large_parameter():
  state_sharding, _, _ = _run_step((1, 8, 1), model_config=MODEL.replace(hidden_size=256, intermediate_size=512))
  abstract = jax.eval_shape(lambda: nn.unbox(transformer.init_params(
      MODEL.replace(hidden_size=256, intermediate_size=512), jax.random.key(0))))
  for (path, shape), shard in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                  jax.tree.leaves(state_sharding.params)):
    nbytes = np.prod(shape.shape) * 4
    if nbytes > 64 * 1024:
      assert not shard.is_fully_replicated, jax.tree_util.keystr(path)


def test_gradient_accumulation_equals_full_batch(reference):
  _, ref_params, ref_metrics = reference
  _, params, metrics = _run_step((1, 1, 1), microbatches=4)
  for key in ("loss", "lm_loss", "grad_norm", "chosen_reward_std"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_lm_loss_equals_full_logits(tied):
  """The step's chunked LM head (no [B, L, V] logits) gives the full-logits loss and gradients."""
  model_config = MODEL.replace(tie_word_embeddings=tied)
  model = transformer.RewardModel(model_config)
  params = nn.unbox(transformer.init_params(model_config, jax.random.key(2)))
  batch = jax.tree.map(jnp.asarray, _batch(length=16))

  def loss(p, chunk):
    sums = step.microbatch_sums(model, p, batch, LOSS, chunk)
    return losses.loss_from_sums(sums, LOSS), sums["lm_sum"]

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (full, full_lm), full_grads = grad(params, 0)
  (chunked, chunked_lm), chunked_grads = grad(params, 5)  # 16 LM slots: 4 chunks, the last padded
  np.testing.assert_allclose(chunked_lm, full_lm, rtol=1e-5)
  np.testing.assert_allclose(chunked, full, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               chunked_grads, full_grads)


def test_microbatched_eval_equals_one_batch():
  model = transformer.RewardModel(MODEL)
  params = nn.unbox(transformer.init_params(MODEL, jax.random.key(3)))
  batch = jax.tree.map(jnp.asarray, _batch())
  whole = jax.jit(step.make_eval_step(model, LOSS))(params, batch)
  split = jax.jit(step.make_eval_step(model, LOSS, microbatches=4))(params, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), split, whole)


def test_packing_efficiency_counts_real_tokens():
  batch = _batch()
  want = batch["segment_ids"].astype(bool).sum() / batch["segment_ids"].size
  assert 0.2 < want < 0.9  # pairs of 4..16 tokens in rows of 32: some padding, not all
  np.testing.assert_allclose(step.packing_efficiency(jax.tree.map(jnp.asarray, batch)), want, rtol=1e-6)
