"""Parameter-efficient training: `train.trainable` (frozen parameters untouched and without
optimizer state) and LoRA (`model.lora`: the initial model is the base, an export merges the
adapters and scores in transformers as our unmerged model does)."""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from codepmp_jax import checkpoint, convert, optim, plan, sharding, step, train
from codepmp_jax.config import default_config
from codepmp_jax.data import packing
from codepmp_jax.data.encode import PairArrays
from codepmp_jax.model import lora, transformer
from codepmp_jax.model.config import ModelConfig, get_preset
from tests import hf_models

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
             num_kv_heads=2, pad_token_id=0)


def _config(**train_fields):
  """A small synthetic run with weight decay on (frozen weights must escape it too)."""
  config = default_config()
  config.data.builtin.name = ""
  config.data.update(source="synthetic", vocab_size=256, synthetic_pairs=256)
  config.model.update(MODEL)
  config.optimizer.update(lr=1e-2, warmup_ratio=0.0, weight_decay=0.1)
  config.train.update(global_batch=8, seq_len=32, total_steps=3, log_every=1, eval_every=0,
                      **train_fields)
  config.mesh_shape = (-1, 1, 1)
  config.checkpoint.save_every = 3
  config.compilation_cache_dir = ""
  return config


def _initial(model_config: ModelConfig, seed: int = 0) -> dict:
  return nn.unbox(transformer.init_params(model_config.replace(scan_layers=False), jax.random.key(seed)))


def _run_start(config, model_config: ModelConfig) -> dict:
  """The very params a fresh run of `config` starts from (the same jitted, sharded init, so the
  same bits: an eager init can differ in the last place)."""
  mesh = sharding.make_mesh(config.mesh_shape)
  optimizer = optim.make_optimizer(config.optimizer, 10, config.train.trainable)
  abstract, shardings = step.state_shardings(model_config, optimizer, mesh, sharding.DEFAULT_RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    params = jax.device_get(train.initial_params(config, model_config, abstract.params, shardings.params))
  return transformer.unstack_layers(params) if "layers" in params else params


def _train_steps(model_config: ModelConfig, trainable: str, steps: int = 3, microbatches: int = 2):
  """(params before, params after) `steps` jitted train steps on random pairs, 8 devices, data x fsdp."""
  config = _config(trainable=trainable, microbatches=microbatches)
  mesh = sharding.make_mesh((2, 4, 1))
  rules = sharding.DEFAULT_RULES
  optimizer = optim.make_optimizer(config.optimizer, 10, trainable)
  _, state_sharding = step.state_shardings(model_config, optimizer, mesh, rules)
  batch_sharding = step.batch_shardings(mesh, rules)
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda: _initial(model_config), out_shardings=state_sharding.params)()
    before = jax.device_get(params)
    state = jax.jit(lambda p: step.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                    out_shardings=state_sharding)(params)
    train_step = step.jit_train_step(
        step.make_train_step(transformer.RewardModel(model_config), optimizer, config.loss,
                             microbatches, trainable=trainable),
        state_sharding, batch_sharding, mesh)
    for _ in range(steps):
      lengths = rng.integers(4, 17, (8, 2))
      pairs = PairArrays.from_lengths(rng.integers(1, 256, int(lengths.sum())).astype(np.int32),
                                      lengths, np.ones((8, 2), np.int32), np.zeros(8, np.float32))
      batch = jax.device_put(packing.pair_rows(pairs, 16, 0), batch_sharding)
      state, metrics = train_step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  return before, jax.device_get(state.params)


def _flat(tree) -> dict[str, np.ndarray]:
  return {optim.param_path(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _moment_paths(opt_state) -> set[str]:
  """Parameter paths that have an Adam first moment in `opt_state`."""
  out = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    attrs = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    if attrs and attrs[-1] == "mu":
      out.add(optim.param_path(path).removeprefix("trainable/"))
  return out


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- which leaves train

@pytest.mark.slow
def test_trainable_specs():
  params = _initial(get_preset("tiny", **MODEL))
  trains = lambda spec: {p for p, t in _flat(optim.trainable_mask(params, spec)).items() if t}  # noqa: E731
  every = set(_flat(params))
  assert trains("all") == every
  assert trains("top:1") == {p for p in every if p.startswith(("layers_1/", "score/"))}
  assert trains("top:0") == {"score/kernel"}
  assert trains("regex:(layers_0/mlp|score)") == {p for p in every if p.startswith(("layers_0/mlp/", "score/"))}
  with_lora = _initial(get_preset("tiny", **MODEL, lora={"rank": 2, "targets": ("q_proj", "up_proj")}))
  adapters = {p for p in _flat(with_lora) if p.endswith(("lora_a", "lora_b"))}
  assert len(adapters) == 2 * 2 * 2  # 2 layers x 2 targets x (A, B)
  trains = lambda spec: {p for p, t in _flat(optim.trainable_mask(with_lora, spec)).items() if t}  # noqa: E731
  assert trains("all") == adapters | {"score/kernel"}
  assert trains("top:1") == {p for p in adapters if p.startswith("layers_1/")} | {"score/kernel"}
  for bad, message in (("top:3", "only 2 layers"), ("top:x", "whole number"), ("some", "not all"),
                       ("regex:(", "bad regular"), ("regex:nothing_like_this", "no parameter")):
    with pytest.raises(ValueError, match=message):
      optim.trainable_mask(params, bad)


@pytest.mark.slow
def test_top_n_on_scanned_layers_is_a_clear_error():
  params = transformer.stack_layers(_initial(get_preset("tiny", **MODEL)), 2)
  with pytest.raises(ValueError, match="model.scan_layers=False"):
    optim.trainable_mask(params, "top:1")
  trains = {p for p, t in _flat(optim.trainable_mask(params, "top:2")).items() if t}
  assert trains == {p for p in _flat(params) if p.startswith(("layers/", "score/"))}  # whole stack


def test_frozen_parameters_have_no_optimizer_state():
  """Adam's mu and nu exist for the trainable leaves only; the state shrinks accordingly."""
  cfg = optim.default_optimizer_config()
  params = _initial(get_preset("tiny", **MODEL))
  full = optim.make_optimizer(cfg, 10).init(params)
  top1 = optim.make_optimizer(cfg, 10, "top:1").init(params)
  trainable = {p for p, t in _flat(optim.trainable_mask(params, "top:1")).items() if t}
  assert _moment_paths(full) == set(_flat(params))
  assert _moment_paths(top1) == trainable
  trainable_bytes = sum(v.nbytes for p, v in _flat(params).items() if p in trainable)
  # Two moments per trainable parameter, plus step counts (int32 scalars).
  assert _nbytes(full) - 2 * _nbytes(params) < 16
  assert _nbytes(top1) - 2 * trainable_bytes < 16
  assert _nbytes(top1) < 0.6 * _nbytes(full)


# ----------------------------------------------------------------------------- training

@pytest.mark.slow
def test_top1_steps_leave_frozen_weights_bit_equal():
  """Three sharded steps of top:1 (microbatched, weight decay on): only layers_1 and score move."""
  before, after = _train_steps(get_preset("tiny", **MODEL), "top:1")
  before, after = _flat(before), _flat(after)
  for path, value in after.items():
    if path.startswith(("layers_1/", "score/")):
      assert not np.array_equal(value, before[path]), f"{path} did not train"
    else:
      np.testing.assert_array_equal(value, before[path], err_msg=f"{path} is frozen")


@pytest.mark.slow
def test_top1_run_leaves_frozen_weights_bit_equal(tmp_path):
  """A run of top:1 (with microbatches, weight decay and a resume) changes only layers_1 and score."""
  config = _config(trainable="top:1", microbatches=2)
  train.train(config, tmp_path / "run")
  config.train.total_steps = 5  # resume from step 3: the partitioned optimizer state round-trips
  config.checkpoint.save_every = 5
  train.train(config, tmp_path / "run")
  params, model_config = checkpoint.load_model(tmp_path / "run")
  assert checkpoint.latest_train_step(tmp_path / "run") == 5
  before, after = _flat(_run_start(config, model_config)), _flat(params)
  assert before.keys() == after.keys()
  for path, value in after.items():
    if path.startswith(("layers_1/", "score/")):
      assert not np.array_equal(value, before[path]), f"{path} did not train"
    else:
      np.testing.assert_array_equal(value, before[path], err_msg=f"{path} is frozen")
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all(r["grad_norm"] > 0 for r in rows)


# ----------------------------------------------------------------------------- LoRA

@pytest.mark.slow
def test_lora_starts_as_the_base_model():
  base = get_preset("tiny", **MODEL)
  adapted = base.replace(lora={"rank": 4, "alpha": 8.0})
  params = _initial(adapted)
  a = params["layers_0"]["mlp"]["down_proj"]["lora_a"]
  assert a.shape == (64, 4) and np.abs(a).max() <= 1 / math.sqrt(64) and np.abs(a).std() > 0
  assert params["layers_0"]["mlp"]["down_proj"]["lora_b"].shape == (4, 32)
  ids, mask = hf_models.padded_batch([9, 5], 256)
  layout = transformer.right_padded(mask.sum(-1), ids.shape[1])
  ours = transformer.RewardModel(adapted).apply({"params": params}, ids, **layout).rewards
  plain = transformer.RewardModel(base).apply({"params": lora.strip(params)}, ids, **layout).rewards
  np.testing.assert_array_equal(ours, plain)
  # Logical axis names: the kernel's, with `lora` for the rank.
  specs = nn.get_partition_spec(transformer.init_params(adapted, jax.random.key(0)))
  assert tuple(specs["layers_0"]["attn"]["q_proj"]["lora_a"]) == ("embed", "lora")
  assert tuple(specs["layers_0"]["attn"]["q_proj"]["lora_b"]) == ("lora", "heads")


LORA = {"rank": 4, "alpha": 8.0, "targets": ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")}


def test_init_from_a_base_checkpoint_adds_fresh_adapters(tmp_path):
  """The usual LoRA recipe: a plain (converted) checkpoint plus `model.lora` from the run."""
  base = get_preset("tiny", **MODEL)
  saved = _initial(base, seed=5)
  checkpoint.save_model(tmp_path / "base", saved, base)
  config = _config()
  config.init_from = str(tmp_path / "base")
  config.model.lora.update(rank=2, targets=("v_proj",))
  model_config = train.resolve_model_config(config, tokenizer=None)
  assert model_config.lora.rank == 2 and model_config.lora.targets == ("v_proj",)
  params = _run_start(config, model_config)
  jax.tree.map(np.testing.assert_array_equal, lora.strip(params), jax.device_get(saved))
  v = params["layers_1"]["attn"]["v_proj"]
  assert v["lora_a"].shape == (32, 2) and np.abs(v["lora_a"]).max() > 0 and not np.any(v["lora_b"])
  # A checkpoint that holds adapters itself must be merged before it is built on.
  checkpoint.save_model(tmp_path / "adapted", params, model_config)
  config.init_from = str(tmp_path / "adapted")
  with pytest.raises(ValueError, match="holds LoRA adapters"):
    _run_start(config, train.resolve_model_config(config, tokenizer=None))


def _assert_hf_export_scores_like_ours(params, model_config, out):
  """The export has no adapter tensors, and transformers scores it as our unmerged model."""
  with safe_open(out / "model.safetensors", "np") as f:
    names = set(f.keys())
  assert not [n for n in names if "lora" in n] and "score.weight" in names
  ids, mask = hf_models.padded_batch([11, 7, 3], 256)
  ours = np.asarray(transformer.RewardModel(model_config.replace(scan_layers=False)).apply(
      {"params": params}, ids, **transformer.right_padded(mask.sum(-1), ids.shape[1])).rewards[:, 0])
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long()).logits[:, 0].numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def _assert_only_adapters_and_score_trained(before, after):
  before, after = _flat(before), _flat(after)
  for path, value in after.items():
    changed = not np.array_equal(value, before[path])
    assert changed == path.endswith(("lora_a", "lora_b", "score/kernel")), path
  assert np.abs(after["layers_1/mlp/down_proj/lora_b"]).max() > 1e-3


@pytest.mark.slow
def test_lora_steps_then_export_merges_and_scores_like_ours(tmp_path):
  model_config = get_preset("tiny", **MODEL, lora=LORA)
  before, params = _train_steps(model_config, "all")
  _assert_only_adapters_and_score_trained(before, params)
  out = convert.save_hf(tmp_path / "hf", params, model_config, tokenizer=None)
  _assert_hf_export_scores_like_ours(params, model_config, out)
  # The merge itself: W + alpha / rank * A @ B.
  merged, merged_config = lora.merge(params, model_config)
  q = params["layers_0"]["attn"]["q_proj"]
  np.testing.assert_allclose(merged["layers_0"]["attn"]["q_proj"]["kernel"],
                             q["kernel"] + 2.0 * np.asarray(q["lora_a"]) @ np.asarray(q["lora_b"]), atol=1e-6)
  assert merged_config.lora.rank == 0 and not lora.has_lora(merged)


@pytest.mark.slow
def test_lora_run_then_convert_cli_exports_a_merged_model(tmp_path):
  """A LoRA training run (scanned layers), read back as score and eval read it, exported by the
  `convert --to_hf` command."""
  config = _config()
  config.model.lora.update(**LORA)
  config.model.scan_layers = True
  train.train(config, tmp_path / "run")
  params, model_config = checkpoint.load_model(tmp_path / "run")
  assert model_config.lora == get_preset("tiny", lora=LORA).lora
  _assert_only_adapters_and_score_trained(_run_start(config, model_config), params)
  result = subprocess.run(
      [sys.executable, "-m", "codepmp_jax.convert", f"--to_hf={tmp_path / 'hf'}",
       f"--checkpoint={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "merging the LoRA adapters" in result.stdout
  _assert_hf_export_scores_like_ours(params, model_config, tmp_path / "hf")


# ----------------------------------------------------------------------------- plan

@pytest.mark.slow
def test_plan_shows_the_smaller_optimizer_state():
  config = _config()
  config.mesh_shape = (8, 1, 1)
  model_config = ModelConfig.from_dict(config.model.to_dict())
  full = plan.plan(config, model_config)
  config.train.trainable = "top:1"
  top1 = plan.plan(config, model_config)
  assert top1.params_bytes == full.params_bytes
  assert top1.optimizer_bytes < 0.6 * full.optimizer_bytes
  assert top1.trainable_params < 0.6 * top1.total_params == 0.6 * full.trainable_params
  assert "trainable parameters" in plan.format_plan(top1, None)
