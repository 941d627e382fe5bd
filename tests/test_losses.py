"""Loss values against hand-computed numbers and the TRL / OpenRLHF formulas evaluated in torch."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from codepmp_jax import losses


def _cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = losses.default_loss_config()
  cfg.update(overrides)
  return cfg


REWARDS_C = np.array([1.5, -0.25, 3.0, 0.0, 2.0, -4.0], np.float32)
REWARDS_R = np.array([0.5, 0.75, -1.0, 0.0, 2.5, -6.0], np.float32)
MARGIN = np.array([0.0, 0.5, 1.0, 0.25, 0.0, 2.0], np.float32)


def test_split_pairs_interleaved():
  x = jnp.arange(12).reshape(6, 2)
  chosen, rejected = losses.split_pairs(x)
  np.testing.assert_array_equal(chosen, [[0, 1], [4, 5], [8, 9]])
  np.testing.assert_array_equal(rejected, [[2, 3], [6, 7], [10, 11]])
  with pytest.raises(ValueError, match="even"):
    losses.split_pairs(jnp.zeros((3, 2)))


def test_bradley_terry_hand_computed():
  # -log_sigmoid(d) = log(1 + exp(-d)).
  bt = losses.bradley_terry(jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 0.0, 0.0]),
                            jnp.array([0.0, 0.0, 3.0]))
  np.testing.assert_allclose(bt, [math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.e)],
                             rtol=1e-6)


def test_bradley_terry_matches_trl_and_openrlhf():
  rc, rr, m = (torch.from_numpy(a) for a in (REWARDS_C, REWARDS_R, MARGIN))
  # TRL RewardTrainer.compute_loss (with margin) and OpenRLHF PairWiseLoss.
  trl = -F.logsigmoid(rc - rr - m).mean()
  ours = losses.bradley_terry(jnp.asarray(REWARDS_C), jnp.asarray(REWARDS_R), jnp.asarray(MARGIN))
  np.testing.assert_allclose(ours.mean(), trl.numpy(), rtol=1e-6)
  # OpenRLHF LogExpLoss: log(1 + exp(reject - chosen)).mean(), no margin.
  logexp = torch.log(1 + torch.exp(rr - rc)).mean()
  ours = losses.bradley_terry(jnp.asarray(REWARDS_C), jnp.asarray(REWARDS_R), loss_type="logexp")
  np.testing.assert_allclose(ours.mean(), logexp.numpy(), rtol=1e-6)


def test_logexp_stable_for_large_gaps():
  bt = losses.bradley_terry(jnp.array([0.0, 200.0]), jnp.array([200.0, 0.0]), loss_type="logexp")
  np.testing.assert_allclose(bt, [200.0, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="loss_type"):
    losses.bradley_terry(jnp.zeros(1), jnp.zeros(1), loss_type="hinge")


def test_bt_in_float32_for_bf16_rewards():
  bt = losses.bradley_terry(jnp.array([1.0], jnp.bfloat16), jnp.array([0.0], jnp.bfloat16))
  assert bt.dtype == jnp.float32


def test_reward_centering_matches_trl():
  rc, rr = torch.from_numpy(REWARDS_C), torch.from_numpy(REWARDS_R)
  trl = torch.mean((rc + rr) ** 2)
  np.testing.assert_allclose(
      losses.reward_centering(jnp.asarray(REWARDS_C), jnp.asarray(REWARDS_R)), trl.numpy(), rtol=1e-6)
  # Hand: (1 + 2)^2 and (-1 + 0)^2 -> mean 5.
  np.testing.assert_allclose(losses.reward_centering(jnp.array([1.0, -1.0]), jnp.array([2.0, 0.0])), 5.0)


def test_lm_cross_entropy_matches_torch_ignore_index():
  rng = np.random.default_rng(0)
  b, l, v = 3, 7, 11
  logits = rng.normal(size=(b, l, v)).astype(np.float32)
  ids = rng.integers(0, v, size=(b, l))
  lm_mask = np.zeros((b, l), np.int32)
  lm_mask[0, 3:6] = 1
  lm_mask[2, 1:] = 1
  total, count = losses.lm_cross_entropy(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(lm_mask))
  labels = torch.from_numpy(np.where(lm_mask == 1, ids, -100))
  # Hugging Face causal-LM loss: shift, then cross_entropy with ignore_index=-100.
  ref_sum = F.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, v), labels[:, 1:].reshape(-1),
                            ignore_index=-100, reduction="sum")
  assert count == 3 + 6
  np.testing.assert_allclose(total, ref_sum.numpy(), rtol=1e-5)


def test_lm_cross_entropy_hand_computed():
  # Uniform logits over 4 tokens: every predicted token costs log 4; lm_mask[0] never counts.
  logits = jnp.zeros((1, 3, 4))
  total, count = losses.lm_cross_entropy(logits, jnp.array([[1, 2, 3]]), jnp.array([[1, 1, 0]]))
  assert count == 1
  np.testing.assert_allclose(total, math.log(4), rtol=1e-6)


def test_lm_cross_entropy_bf16_logits_in_float32():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 5, 300)) * 4, jnp.bfloat16)
  ids = jnp.asarray(rng.integers(0, 300, size=(2, 5)))
  mask = jnp.ones((2, 5), jnp.int32)
  total, count = losses.lm_cross_entropy(logits, ids, mask)
  ref_total, _ = losses.lm_cross_entropy(logits.astype(jnp.float32), ids, mask)
  assert total.dtype == jnp.float32 and count == 8
  np.testing.assert_allclose(total, ref_total, rtol=1e-6)
  with pytest.raises(ValueError, match="disagree"):
    losses.lm_cross_entropy(logits, ids[:, :4], mask[:, :4])


def _pmp_loss(chosen, rejected, lm_sum, lm_count, margin, cfg):
  sums = losses.pair_sums(chosen, rejected, lm_sum, lm_count, margin, cfg)
  return losses.loss_from_sums(sums, cfg), losses.metrics_from_sums(sums, cfg)


def test_pmp_loss_combines_terms_and_metrics():
  cfg = _cfg(rm_coef=1.0, lm_coef=0.5, center_coef=0.01)
  rc, rr, m = (jnp.asarray(a) for a in (REWARDS_C, REWARDS_R, MARGIN))
  loss, metrics = _pmp_loss(rc, rr, jnp.float32(12.0), jnp.float32(4.0), m, cfg)
  tc, tr, tm = (torch.from_numpy(a) for a in (REWARDS_C, REWARDS_R, MARGIN))
  bt = -F.logsigmoid(tc - tr - tm).mean()
  expected = bt + 0.5 * 12.0 / 4.0 + 0.01 * torch.mean((tc + tr) ** 2)
  np.testing.assert_allclose(loss, expected.numpy(), rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], loss)
  np.testing.assert_allclose(metrics["bt_loss"], bt.numpy(), rtol=1e-6)
  np.testing.assert_allclose(metrics["lm_loss"], 3.0)
  # Pairs 1, 3 and 6 win; pair 4 is a tie (0 vs 0) and counts as wrong: 3 of 6.
  np.testing.assert_allclose(metrics["accuracy"], 0.5)
  np.testing.assert_allclose(metrics["margin"], (tc - tr).mean().numpy(), rtol=1e-6)
  np.testing.assert_allclose(metrics["chosen_reward_mean"], REWARDS_C.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["chosen_reward_std"], REWARDS_C.std(), rtol=1e-5)
  np.testing.assert_allclose(metrics["rejected_reward_mean"], REWARDS_R.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["rejected_reward_std"], REWARDS_R.std(), rtol=1e-5)


def test_accuracy_ties_are_wrong_and_margin_switch():
  z = jnp.zeros(4)
  _, metrics = _pmp_loss(z, z, 0.0, 0.0, jnp.ones(4), _cfg(use_margin=False))
  assert metrics["accuracy"] == 0.0
  np.testing.assert_allclose(metrics["bt_loss"], math.log(2), rtol=1e-6)  # margin ignored
  np.testing.assert_allclose(metrics["lm_loss"], 0.0)  # no LM tokens: no division by zero
  _, metrics = _pmp_loss(z, z, 0.0, 0.0, jnp.ones(4), _cfg(use_margin=True))
  np.testing.assert_allclose(metrics["bt_loss"], math.log(1 + math.e), rtol=1e-6)


def test_pair_sums_keys():
  sums = losses.pair_sums(jnp.zeros(2), jnp.zeros(2), 0.0, 0.0, None, _cfg())
  assert tuple(sums) == losses.SUM_KEYS


def test_pair_sums_of_valid_slots_equal_those_of_the_valid_pairs_alone():
  cfg = _cfg(center_coef=0.1)
  rc, rr, m = (jnp.asarray(a) for a in (REWARDS_C, REWARDS_R, MARGIN))
  valid = np.arange(len(REWARDS_C)) % 3 != 1
  want = losses.pair_sums(rc[valid], rr[valid], 2.0, 3.0, m[valid], cfg)
  got = losses.pair_sums(rc, rr, 2.0, 3.0, m, cfg, valid=jnp.asarray(valid, jnp.float32))
  assert 0 < float(got["num_pairs"]) < len(REWARDS_C)
  for key in losses.SUM_KEYS:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


def test_microbatch_sums_give_exact_full_batch_loss_and_gradient():
  """4 microbatches with unequal LM token counts give the full batch's loss, gradient and metrics."""
  rng = np.random.default_rng(2)
  pairs, length, vocab, dim = 8, 6, 13, 5
  cfg = _cfg(lm_coef=1.0, center_coef=0.1)
  ids = jnp.asarray(rng.integers(0, vocab, size=(2 * pairs, length)))
  feats = jnp.asarray(rng.normal(size=(2 * pairs, length, dim)), jnp.float32)
  lm_mask = np.zeros((2 * pairs, length), np.int32)
  for i in range(0, 2 * pairs, 2):  # chosen rows only, a different number of tokens each
    lm_mask[i, length - 1 - i // 2 % 5:] = 1
  lm_mask = jnp.asarray(lm_mask)
  margin = jnp.asarray(rng.uniform(size=pairs), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32),
            "r": jnp.asarray(rng.normal(size=(dim,)), jnp.float32)}

  def sums_of(p, f, i, m, mg):
    logits = f @ p["w"]
    rewards = f[:, -1] @ p["r"]
    lm_sum, lm_count = losses.lm_cross_entropy(logits, i, m)
    chosen, rejected = losses.split_pairs(rewards)
    return losses.pair_sums(chosen, rejected, lm_sum, lm_count, mg, cfg)

  def full_loss(p):
    return losses.loss_from_sums(sums_of(p, feats, ids, lm_mask, margin), cfg)

  total_pairs, total_tokens = float(pairs), losses.count_lm_tokens(lm_mask)

  @jax.jit
  @functools.partial(jax.value_and_grad, has_aux=True)
  def micro_loss(p, f, i, m, mg):
    sums = sums_of(p, f, i, m, mg)
    return losses.loss_from_sums(sums, cfg, total_pairs, total_tokens), sums

  micro = 4
  step = 2 * pairs // micro
  grads, acc_loss, acc_sums = None, 0.0, None
  for k in range(micro):
    rows = slice(k * step, (k + 1) * step)
    mg = margin[k * step // 2:(k + 1) * step // 2]
    (value, sums), g = micro_loss(params, feats[rows], ids[rows], lm_mask[rows], mg)
    acc_loss += value
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    acc_sums = sums if acc_sums is None else jax.tree.map(jnp.add, acc_sums, sums)

  loss, full_grads = jax.jit(jax.value_and_grad(full_loss))(params)
  np.testing.assert_allclose(acc_loss, loss, rtol=1e-6)
  for key in params:
    np.testing.assert_allclose(grads[key], full_grads[key], rtol=1e-5, atol=1e-7)
  full_metrics = losses.metrics_from_sums(sums_of(params, feats, ids, lm_mask, margin), cfg)
  acc_metrics = losses.metrics_from_sums(acc_sums, cfg)
  for key, value in full_metrics.items():
    np.testing.assert_allclose(acc_metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def _chunked_lm(hidden, kernel, ids, mask, chunk_len=128):
  """`chunked_cross_entropy` against the LM targets of `ids` under `mask` (`lm_cross_entropy`'s)."""
  return losses.chunked_cross_entropy(hidden, kernel, *losses.lm_targets(ids, mask), chunk_len)


def test_chunked_lm_cross_entropy_equals_full_logits():
  rng = np.random.default_rng(3)
  b, l, d, v = 2, 11, 8, 37  # 11 positions in chunks of 4: the last chunk is padded
  hidden = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, v, size=(b, l)))
  mask = jnp.asarray(rng.integers(0, 2, size=(b, l)))

  def full(h, k):
    return losses.lm_cross_entropy(h @ k, ids, mask)[0]

  def chunked(h, k):
    return _chunked_lm(h, k, ids, mask, chunk_len=4)[0]

  np.testing.assert_allclose(jax.jit(chunked)(hidden, kernel), full(hidden, kernel), rtol=1e-6)
  assert _chunked_lm(hidden, kernel, ids, mask)[1] == mask[:, 1:].sum()
  got_grads = jax.jit(jax.grad(chunked, (0, 1)))(hidden, kernel)
  for got, want in zip(got_grads, jax.jit(jax.grad(full, (0, 1)))(hidden, kernel)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  bf16 = jax.jit(chunked)(hidden.astype(jnp.bfloat16), kernel)
  np.testing.assert_allclose(bf16, full(hidden, kernel), rtol=2e-2)
  # The aligned core's gradients (computed in its forward pass) against autodiff of the plain
  # formula, for the weights too, under a scaled cotangent.
  targets = jnp.asarray(rng.integers(0, v, size=(b, l)))
  weights = jnp.asarray(rng.uniform(size=(b, l)), jnp.float32)

  def plain(h, k, w):
    logits = h @ k
    token = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return 3.0 * jnp.sum(token * w)

  core = lambda h, k, w: 3.0 * losses.chunked_cross_entropy(h, k, targets, w, chunk_len=4)[0]  # noqa: E731
  for got, want in zip(jax.jit(jax.grad(core, (0, 1, 2)))(hidden, kernel, weights),
                       jax.grad(plain, (0, 1, 2))(hidden, kernel, weights)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_lm_cross_entropy_saves_memory():
  b, l, d, v = 2, 512, 64, 32768
  hidden = jax.ShapeDtypeStruct((b, l, d), jnp.bfloat16)
  kernel = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((b, l), jnp.int32)

  def temp_bytes(loss):
    grad = jax.grad(lambda h, k, i, m: loss(h, k, i, m)[0], (0, 1))
    return jax.jit(grad).lower(hidden, kernel, ids, ids).compile().memory_analysis().temp_size_in_bytes

  full = temp_bytes(lambda h, k, i, m: losses.lm_cross_entropy(h @ k, i, m))
  chunked = temp_bytes(lambda h, k, i, m: _chunked_lm(h, k, i, m, chunk_len=64))
  logits_f32 = b * l * v * 4
  assert full >= logits_f32 and chunked < logits_f32 / 2, (full, chunked)
