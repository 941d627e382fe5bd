"""Schedules against hand-computed values and transformers' schedules; AdamW against torch.optim.AdamW."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import optimization as hf_optim

from codepmp_jax import optim
from codepmp_jax.model import config as model_config
from codepmp_jax.model import transformer


def _cfg(**overrides):
  cfg = optim.default_optimizer_config()
  cfg.update(overrides)
  return cfg


def _values(schedule, steps):
  return np.array([float(schedule(jnp.asarray(s))) for s in steps])


def test_default_config_fields():
  assert set(optim.default_optimizer_config()) == {
      "lr", "schedule", "warmup_ratio", "decay_ratio", "min_lr_ratio", "decay_shape", "b1", "b2",
      "eps", "weight_decay", "grad_clip"}


def test_constant_with_warmup_hand_computed():
  sched = optim.make_schedule(_cfg(lr=1.0, schedule="constant", warmup_ratio=0.04), 100)
  # ceil(0.04 * 100) = 4 warmup steps: 0, 1/4, 2/4, 3/4, then 1.
  np.testing.assert_allclose(_values(sched, [0, 1, 2, 3, 4, 50, 99]), [0, .25, .5, .75, 1, 1, 1])


def test_wsd_linear_hand_computed():
  # 100 steps: warmup ceil(3) = 3 steps (0.03 * 100 is 3.0000000000000004 in floats), decay over
  # the last 10: steps 90..99 go 1, 0.9*... towards min 0.1 reached at step 100.
  sched = optim.make_schedule(_cfg(lr=2.0, warmup_ratio=0.03, decay_ratio=0.1, min_lr_ratio=0.1), 100)
  got = _values(sched, [0, 1, 2, 3, 89, 90, 91, 95, 99, 100, 150])
  expected = 2.0 * np.array([0, 1 / 3, 2 / 3, 1, 1, 1, 0.1 + 0.9 * 0.9, 0.1 + 0.9 * 0.5,
                             0.1 + 0.9 * 0.1, 0.1, 0.1])
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_cosine_hand_computed():
  sched = optim.make_schedule(_cfg(lr=1.0, schedule="cosine", warmup_ratio=0.1, min_lr_ratio=0.0), 10)
  # One warmup step, then 0.5 * (1 + cos(pi * (s - 1) / 9)).
  got = _values(sched, [0, 1, 4, 10])
  np.testing.assert_allclose(got, [0, 1, 0.5 * (1 + math.cos(math.pi / 3)), 0], atol=1e-7)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_wsd_matches_transformers(shape):
  total, cfg = 57, _cfg(lr=1.0, warmup_ratio=0.07, decay_ratio=0.2, min_lr_ratio=0.05, decay_shape=shape)
  warmup, decay = math.ceil(0.07 * total), math.ceil(0.2 * total)
  ours = _values(optim.make_schedule(cfg, total), range(total))
  hf = [hf_optim._get_wsd_scheduler_lambda(
      s, num_warmup_steps=warmup, num_stable_steps=total - warmup - decay, num_decay_steps=decay,
      warmup_type="linear", decay_type=shape, min_lr_ratio=0.05, num_cycles=0.5) for s in range(total)]
  # transformers warms up from min_lr_ratio, we from 0 (as the paper): compare after warmup.
  np.testing.assert_allclose(ours[warmup:], hf[warmup:], rtol=1e-6)
  np.testing.assert_allclose(ours[:warmup], np.arange(warmup) / warmup, rtol=1e-6)


def test_cosine_matches_transformers():
  total, cfg = 40, _cfg(lr=1.0, schedule="cosine", warmup_ratio=0.25, min_lr_ratio=0.1)
  ours = _values(optim.make_schedule(cfg, total), range(total))
  hf = [hf_optim._get_cosine_schedule_with_warmup_lr_lambda(
      s, num_warmup_steps=10, num_training_steps=total, num_cycles=0.5, min_lr_rate=0.1)
      for s in range(total)]
  np.testing.assert_allclose(ours, hf, rtol=1e-6, atol=1e-7)


def test_schedule_rejects_bad_config():
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(_cfg(schedule="step"), 10)
  with pytest.raises(ValueError, match="exceed total_steps"):
    optim.make_schedule(_cfg(warmup_ratio=0.6, decay_ratio=0.6), 10)
  with pytest.raises(ValueError, match="warmup_ratio"):
    optim.make_schedule(_cfg(warmup_ratio=1.5), 10)


def test_weight_decay_mask_excludes_exactly_norms_and_biases():
  ids = jnp.zeros((1, 4), jnp.int32)
  model = transformer.RewardModel(model_config.get_preset("tiny", qkv_bias=True))
  init = lambda: model.init(jax.random.key(0), ids, **transformer.right_padded(jnp.array([4]), 4))["params"]  # noqa: E731
  mask = optim.weight_decay_mask(jax.eval_shape(init))  # masked by name: the shapes are enough
  flat = {"/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): v
          for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  no_decay = sorted(k for k, v in flat.items() if not v)
  expected = ["final_norm/scale"] + [
      f"layers_{i}/{name}" for i in range(2)
      for name in ("attn/k_proj/bias", "attn/q_proj/bias", "attn/v_proj/bias", "input_norm/scale",
                   "post_attn_norm/scale")]
  assert no_decay == sorted(expected)
  assert flat["embed/embedding"] and flat["score/kernel"] and flat["layers_1/mlp/down_proj/kernel"]
  # Unboxed and scanned (`layers/...` with a leading layer axis) trees are masked by name too.
  stacked = optim.weight_decay_mask(jax.eval_shape(lambda: transformer.stack_layers(nn.meta.unbox(init()), 2)))
  assert not stacked["layers"]["input_norm"]["scale"] and stacked["layers"]["mlp"]["up_proj"]["kernel"]


def _torch_adamw_run(params, grads_per_step, cfg, total, decay_names, clip):
  tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  groups = [
      {"params": [tensors[k] for k in tensors if k in decay_names], "weight_decay": cfg.weight_decay},
      {"params": [tensors[k] for k in tensors if k not in decay_names], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
  warmup, decay = math.ceil(cfg.warmup_ratio * total - 1e-9), math.ceil(cfg.decay_ratio * total - 1e-9)
  sched = hf_optim.get_wsd_schedule(opt, num_warmup_steps=warmup, num_decay_steps=decay,
                                    num_training_steps=total, decay_type="linear")
  for grads in grads_per_step:
    for k, t in tensors.items():
      t.grad = torch.tensor(grads[k])
    if clip:
      torch.nn.utils.clip_grad_norm_(list(tensors.values()), cfg.grad_clip)
    opt.step()
    sched.step()
  return {k: t.detach().numpy() for k, t in tensors.items()}


def _optax_run(params, grads_per_step, cfg, total):
  tree = {"dense": {"kernel": params["kernel"], "bias": params["bias"]}, "norm": {"scale": params["scale"]}}
  tree = jax.tree.map(jnp.asarray, tree)
  tx = optim.make_optimizer(cfg, total)
  state = tx.init(tree)
  for g in grads_per_step:
    gtree = jax.tree.map(jnp.asarray, {"dense": {"kernel": g["kernel"], "bias": g["bias"]},
                                       "norm": {"scale": g["scale"]}})
    updates, state = tx.update(gtree, state, tree)
    tree = jax.tree.map(jnp.add, tree, updates)
  return {"kernel": tree["dense"]["kernel"], "bias": tree["dense"]["bias"], "scale": tree["norm"]["scale"]}


def _problem(steps, scale):
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4), "scale": 1 + rng.normal(size=4)}
  params = {k: v.astype(np.float32) for k, v in params.items()}
  grads = [{k: (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
           for _ in range(steps)]
  return params, grads


def test_one_adamw_step_equals_torch():
  # Constant lr, no warmup, no clipping: the first update of optax adamw vs torch.optim.AdamW.
  cfg = _cfg(lr=0.05, schedule="constant", warmup_ratio=0.0, decay_ratio=0.0, weight_decay=0.3,
             b1=0.8, b2=0.95, eps=1e-6, grad_clip=0.0)
  params, grads = _problem(1, 0.1)
  ours = _optax_run(params, grads, cfg, 1)
  ref = _torch_adamw_run(params, grads, cfg, 1, {"kernel"}, clip=False)
  for k in params:
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # Decay only on the kernel: with lr*wd, torch's p*(1 - lr*wd) factor shows on it alone.
  assert not np.allclose(ours["kernel"], _optax_run(params, grads, _cfg(**{**cfg, "weight_decay": 0.0}), 1)["kernel"])


def test_adamw_wsd_with_clipping_equals_torch_over_steps():
  total = 12
  cfg = _cfg(lr=0.02, schedule="wsd", warmup_ratio=0.25, decay_ratio=0.25, weight_decay=0.1,
             grad_clip=0.5, decay_shape="linear")
  params, grads = _problem(total, 1.0)  # gradient norms ~4: clipping is active
  ours = _optax_run(params, grads, cfg, total)
  ref = _torch_adamw_run(params, grads, cfg, total, {"kernel"}, clip=True)
  for k in params:
    # torch clips by max_norm / (norm + 1e-6), optax by max_norm / norm: ~1e-7 relative.
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
