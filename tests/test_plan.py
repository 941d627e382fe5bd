"""`plan`: memory from abstract shapes agrees with what a real run holds on a device."""
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codepmp_jax import optim, plan, sharding, step
from codepmp_jax.data import packing
from codepmp_jax.config import load_config
from codepmp_jax.model import transformer
from codepmp_jax.model.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _device0_bytes(tree) -> int:
  device = jax.devices()[0]
  return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
             if s.device == device)


@pytest.mark.slow
def test_tiny_plan_matches_a_real_run_on_8_devices():
  config = load_config("tiny")
  config.mesh_shape = (2, 4, 1)  # FSDP and data parallelism together
  config.train.update(global_batch=16, seq_len=64)
  model_config = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": 1000})
  planned = plan.plan(config, model_config)

  # The real thing: the state and a batch placed on the same mesh, then one step.
  mesh = sharding.make_mesh(config.mesh_shape)
  optimizer = optim.make_optimizer(config.optimizer, 1000)
  _, state_sharding = step.state_shardings(model_config, optimizer, mesh, sharding.DEFAULT_RULES)
  batch_sharding = step.batch_shardings(mesh, sharding.DEFAULT_RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    params = jax.jit(lambda: nn.unbox(transformer.init_params(model_config, jax.random.key(0))),
                     out_shardings=state_sharding.params)()
    state = jax.jit(lambda p: step.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                    out_shardings=state_sharding)(params)
    shapes = packing.PackedShape.pair_rows(16, 64).array_shapes(1)
    batch = jax.device_put({k: np.ones(s, np.float32 if k in ("margin", "pair_valid") else np.int32)
                            for k, s in shapes.items()}, batch_sharding)
    train_step = step.jit_train_step(
        step.make_train_step(transformer.RewardModel(model_config), optimizer, config.loss),
        state_sharding, batch_sharding, mesh)
    state, _ = train_step(state, batch)
  assert planned.params_bytes == _device0_bytes(state.params)
  assert planned.optimizer_bytes == _device0_bytes(state.opt_state)
  measured = _device0_bytes((state, batch))
  assert abs(planned.argument_bytes - measured) <= 0.2 * measured
  # FSDP really splits the model: a device holds about a quarter of the parameters.
  total = sum(x.nbytes for x in jax.tree.leaves(jax.device_get(state.params)))
  assert planned.params_bytes < 0.3 * total


@pytest.mark.slow
def test_eval_step_memory_shrinks_with_eval_microbatches():
  config = load_config("tiny")
  config.mesh_shape = (8, 1, 1)
  config.train.update(global_batch=16, eval_batch=64, seq_len=128, microbatches=1)
  model_config = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": 1000})
  whole = plan.plan(config, model_config)
  config.train.eval_microbatches = 4
  split = plan.plan(config, model_config)
  assert whole.eval_temp_bytes > 0 and split.eval_temp_bytes < 0.6 * whole.eval_temp_bytes
  assert split.eval_peak_bytes > split.argument_bytes  # it sits on top of the resident train state


@pytest.mark.slow
def test_plan_of_qwen2_7b_on_64_devices():
  out = subprocess.run(
      [sys.executable, "-m", "codepmp_jax.plan", "--config=configs/pmp_qwen2_7b.py", "--devices=64",
       "--device_memory=80GiB"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = {k.strip(): v.strip() for k, v in (line.rsplit("  ", 1) for line in out.stdout.splitlines() if "  " in line)}
  params = float(lines["parameters per device"].split()[0])
  # 7.6e9 fp32 parameters over 64 FSDP shards: about 455 MiB each.
  assert 440 < params < 470, out.stdout
  assert "fits" in out.stdout
