"""Pod-scale training on fake CPU devices: init_from into sharded layouts, multi-host rehearsal."""
import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from codepmp_jax import checkpoint, optim, sharding, step, train
from codepmp_jax.config import default_config
from codepmp_jax.data import prepare
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.model import transformer
from codepmp_jax.model.config import ModelConfig, get_preset

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = get_preset("tiny", hidden_size=64, intermediate_size=128, num_layers=2)
# ModelConfig fields that say what the model is (taken from an init_from checkpoint). Every field
# must be here or in train.NUMERICS_FIELDS, so a new kernel setting has to be classified.
SHAPE_FIELDS = {
    "architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
    "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "qkv_bias", "sliding_window",
    "bos_token_id", "eos_token_id", "pad_token_id"}


def _save_bf16_checkpoint(path, model_config=MODEL, tokenizer=None, seed=3):
  """A converted checkpoint as `convert --param_dtype=bfloat16` writes it."""
  params = nn.unbox(transformer.init_params(model_config, jax.random.key(seed)))
  params = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16)), params)
  checkpoint.save_model(path, params, model_config.replace(param_dtype="bfloat16"), tokenizer)
  return params


def _config(**model):
  config = default_config()
  config.model.update(dataclasses.asdict(MODEL))
  config.model.update(model)
  return config


def test_every_model_field_is_shape_or_numerics():
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  assert fields == SHAPE_FIELDS | set(train.NUMERICS_FIELDS), fields ^ (SHAPE_FIELDS | set(train.NUMERICS_FIELDS))


def test_run_numerics_override_the_checkpoint(tmp_path):
  """attention=cudnn (and every other numerics field) reaches a converted model."""
  _save_bf16_checkpoint(tmp_path / "ckpt")
  config = _config(attention="cudnn", dtype="bfloat16", param_dtype="float32", remat_policy="full",
                   scan_layers=True, hidden_size=999)
  config.init_from = str(tmp_path / "ckpt")
  got = train.resolve_model_config(config, tokenizer=None)
  assert (got.attention, got.dtype, got.param_dtype, got.remat_policy, got.scan_layers) == (
      "cudnn", "bfloat16", "float32", "full", True)
  assert got.hidden_size == MODEL.hidden_size  # the shape is the checkpoint's


@pytest.mark.parametrize("scan_layers", [True, False])
def test_bf16_init_from_lands_sharded_in_float32(tmp_path, scan_layers):
  """fsdp=8: each device holds ~1/8 of the model, in the run's layout and float32 masters."""
  saved = _save_bf16_checkpoint(tmp_path / "ckpt")
  run_model = MODEL.replace(scan_layers=scan_layers, param_dtype="float32")
  config = _config(scan_layers=scan_layers)
  config.init_from = str(tmp_path / "ckpt")
  mesh = sharding.make_mesh((1, 8, 1))
  optimizer = optim.make_optimizer(config.optimizer, 10)
  abstract, shardings = step.state_shardings(run_model, optimizer, mesh, sharding.DEFAULT_RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    params = train.initial_params(config, run_model, abstract.params, shardings.params)
  assert ("layers" in params) == scan_layers
  leaves = jax.tree.leaves(params)
  assert all(x.dtype == jnp.float32 for x in leaves)
  jax.tree.map(lambda a, b: assert_sharding_equal(a, b), params, shardings.params)
  total = sum(x.nbytes for x in leaves)
  per_device = [sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == d)
                for d in jax.devices()]
  assert max(per_device) < total / 8 * 1.1, (per_device, total)
  canonical = transformer.unstack_layers(params) if scan_layers else params
  jax.tree.map(lambda got, want: np.testing.assert_array_equal(
      np.asarray(got), np.asarray(want).astype(np.float32)), canonical, saved)


def assert_sharding_equal(array, want):
  assert array.sharding.is_equivalent_to(want, array.ndim), (array.sharding, want)


@pytest.mark.slow
def test_bf16_init_from_trains_float32_masters(tmp_path):
  """3 steps at lr 1e-5 from a bf16 checkpoint change nearly every float32 master weight, and
  the optimizer state is float32."""
  saved = _save_bf16_checkpoint(tmp_path / "ckpt")
  config = _config(scan_layers=True, param_dtype="float32")
  config.init_from = str(tmp_path / "ckpt")
  config.data.update(builtin=dict(name=""), source="synthetic", vocab_size=MODEL.vocab_size,
                     synthetic_pairs=64)
  config.optimizer.update(lr=1e-5, warmup_ratio=0.0)
  config.train.update(global_batch=8, seq_len=32, total_steps=3, log_every=1, eval_every=0)
  config.mesh_shape = (1, 8, 1)
  train.train(config, tmp_path / "run")
  state_dir = tmp_path / "run" / "checkpoints" / "3" / "state"
  stored = checkpoint.ocp.PyTreeCheckpointer().metadata(state_dir)
  stored = getattr(stored, "item_metadata", stored)  # orbax versions differ in the wrapper
  opt_leaves = [x for x in jax.tree.leaves(stored["opt_state"]) if x.shape]  # not the step counts
  assert opt_leaves and {np.dtype(x.dtype) for x in opt_leaves} == {np.dtype(np.float32)}
  trained, _ = checkpoint.load_model(tmp_path / "run")
  changed = np.mean(np.concatenate([
      (np.asarray(a, np.float32) != np.asarray(b, np.float32)).reshape(-1)
      for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(saved))]))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(trained))
  assert changed > 0.9, changed


def test_init_from_placeholder_refuses_and_scratch_starts_fresh(tmp_path):
  config = default_config()
  config.init_from = config_dict.placeholder(str)
  with pytest.raises(ValueError, match=r"needs --config.init_from=CKPT .* --config.init_from=scratch"):
    train.train(config, tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()
  config.init_from = "scratch"
  assert train.init_source(config) == ""
  config.init_from = ""
  assert train.init_source(config) == ""


@pytest.mark.slow
def test_one_epoch_is_exactly_the_full_batches(tmp_path):
  """50 pairs in batches of 8: one epoch is 6 steps (not ceil(50 / 8) = 7)."""
  config = _config()
  config.data.update(builtin=dict(name=""), source="synthetic", vocab_size=MODEL.vocab_size,
                     synthetic_pairs=50)
  config.train.update(global_batch=8, seq_len=16, total_steps=0, epochs=1.0, log_every=100,
                      eval_every=0)
  config.mesh_shape = (-1, 1, 1)
  train.train(config, tmp_path / "run")
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["step"] == 6 and summary["finished"]


def test_uri_paths_are_never_made_local(monkeypatch):
  for uri in ("gs://bucket/run", "gs://bucket/run/checkpoints"):
    assert os.fspath(checkpoint.as_path(uri)) == uri
    assert checkpoint.is_remote(uri)
  assert os.fspath(checkpoint.as_path("rel/dir")) == os.path.abspath("rel/dir")
  # decay_from keeps the URI whole, with or without a step.
  seen = []
  monkeypatch.setattr(checkpoint, "latest_train_step", lambda p: seen.append(os.fspath(p)) or 7)
  monkeypatch.setattr(type(checkpoint.as_path("gs://b/x")), "is_dir", lambda self: True)
  path, found = train.parse_decay_from("gs://b/run:7")
  assert (os.fspath(path), found) == ("gs://b/run", 7)
  path, found = train.parse_decay_from("gs://b/run")
  assert (os.fspath(path), found, seen) == ("gs://b/run", 7, ["gs://b/run"])


def test_orbax_gets_the_uri_unchanged(monkeypatch):
  """The checkpoint manager of a gs:// workdir is opened on the gs:// path itself."""
  opened = []

  class FakeManager:
    def __init__(self, directory, **kwargs):
      opened.append(os.fspath(directory))

  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", FakeManager)
  checkpoint.TrainCheckpoints("gs://bucket/run", keep=1)
  assert opened == ["gs://bucket/run/checkpoints"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _metrics(workdir) -> dict[int, dict]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {row["step"]: row for row in map(json.loads, lines)}


WORDS = ("alpha beta gamma delta sum list loop return value index count print sort map filter "
         "read write open close key item").split()


def _rehearsal_data(tmp_path):
  """Prepared multi-shard pairs, a tokenizer, and a bf16 checkpoint made with that tokenizer."""
  rng = np.random.default_rng(0)
  def text(n):
    return " ".join(rng.choice(WORDS, size=n))
  records = [{"prompt": f"task {i}: {text(int(rng.integers(3, 20)))}",
              "chosen": text(int(rng.integers(5, 60))), "rejected": text(int(rng.integers(5, 60)))}
             for i in range(320)]
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
  tokenizer = train_sentencepiece([r["prompt"] + r["chosen"] + r["rejected"] for r in records], 300,
                                  tmp_path / "spm")
  prepare.prepare(prepare.PrepareSettings(
      inputs=(str(pairs),), format="pairs", tokenizer=str(tmp_path / "spm.model"), seq_len=256,
      out=str(tmp_path / "prepared"), num_shards=3, split="train:0.8,eval:0.2", num_workers=1))
  model = get_preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id)
  _save_bf16_checkpoint(tmp_path / "ckpt", model, tokenizer)
  return tmp_path / "prepared", tmp_path / "ckpt"


def _launch(workdir, flags, processes, devices_per_process):
  port = _free_port()
  procs = []
  for process_id in range(processes):
    env = os.environ.copy()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    distributed = [] if processes == 1 else [
        f"--config.distributed.coordinator_address=localhost:{port}",
        f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={process_id}"]
    cmd = [sys.executable, "-m", "codepmp_jax.train", f"--workdir={workdir}", *flags, *distributed]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs, timeout):
  outs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    outs.append(out)
  return outs


@pytest.mark.slow
def test_pod_rehearsal_preempt_one_host_resume_equals_one_process(tmp_path):
  """4 processes x 2 devices, one shared workdir, scan + remat, a bf16 init_from trained in
  float32, prepared multi-shard data read by Grain with prefetch and packed into one shape,
  microbatched eval. SIGTERM to one process: all four save the same step, record it in
  summary.json and exit 0; the resumed run's losses equal a 1-process 8-device run's at every
  step. (The suite's one multi-process equivalence and one SIGTERM.)"""
  data, ckpt = _rehearsal_data(tmp_path)
  total = 16
  flags = [
      "--config=configs/tiny.py", "--config.data.builtin.name=", "--config.data.source=prepared",
      f"--config.data.path={data}", "--config.data.read_groups=4", "--config.data.pack=True",
      "--config.data.reader=grain", "--config.data.prefetch=2",
      f"--config.init_from={ckpt}", "--config.model.scan_layers=True",
      "--config.model.remat_policy=full", "--config.model.param_dtype=float32",
      "--config.train.global_batch=8", "--config.train.microbatches=2", "--config.train.seq_len=256",
      f"--config.train.total_steps={total}", "--config.train.log_every=1",
      "--config.train.eval_every=8", "--config.train.eval_batch=8", "--config.train.eval_batches=2",
      "--config.checkpoint.save_every=1000", "--config.optimizer.lr=1e-3",
      "--config.mesh_shape=(2,4,1)", "--config.compilation_cache_dir=",
  ]
  _finish(_launch(tmp_path / "one", flags, 1, 8), timeout=600)
  pod = tmp_path / "pod"
  procs = _launch(pod, flags, 4, 2)
  deadline = time.time() + 600
  while not ((pod / "metrics.jsonl").is_file()
             and len((pod / "metrics.jsonl").read_text().splitlines()) >= 3):
    assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
    assert time.time() < deadline, "the pod run did not start"
    time.sleep(0.2)
  procs[2].send_signal(signal.SIGTERM)
  signalled = time.time()
  outs = _finish(procs, timeout=90)
  assert time.time() - signalled < 60
  saved = {int(m) for out in outs for m in re.findall(r"preempted: saved step (\d+)", out)}
  assert len(saved) == 1 and sum("preempted: saved step" in out for out in outs) == 4, saved
  (stop_step,) = saved
  assert stop_step < total and checkpoint.latest_train_step(pod) == stop_step
  assert json.loads((pod / "summary.json").read_text())["step"] == stop_step
  _finish(_launch(pod, flags, 4, 2), timeout=600)

  one, resumed = _metrics(tmp_path / "one"), _metrics(pod)
  assert sorted(resumed) == sorted(one) == list(range(1, total + 1))
  for step_number in one:
    for key in ("loss", "bt_loss", "lm_loss", "accuracy", "grad_norm", "packing_efficiency",
                "eval/loss", "eval/accuracy"):
      if key in one[step_number]:
        assert resumed[step_number][key] == pytest.approx(one[step_number][key], rel=1e-5, abs=1e-5), (
            step_number, key)
  assert all(one[s]["compiles_train_step"] == 1 for s in one)  # one packed shape
  assert "eval/loss" in one[8] and "eval/loss" in resumed[total]


def test_compilation_cache_setting(monkeypatch, tmp_path):
  updates = []
  monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
  config = default_config()
  assert train.setup_compilation_cache(config, checkpoint.as_path(tmp_path)) == ""  # auto, 1 CPU process
  config.compilation_cache_dir = "gs://bucket/cache"
  assert train.setup_compilation_cache(config, checkpoint.as_path(tmp_path)) == "gs://bucket/cache"
  assert updates == [("jax_compilation_cache_dir", "gs://bucket/cache")]


@pytest.mark.slow
def test_unshared_workdir_stops_at_once(tmp_path):
  """Two processes whose workdirs differ (as two hosts' local disks would): both stop, naming it."""
  port = _free_port()
  procs = []
  for process_id in range(2):
    env = os.environ.copy()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    cmd = [sys.executable, "-m", "codepmp_jax.train", f"--workdir={tmp_path}/host{process_id}/run",
           "--config=configs/tiny.py", "--config.data.builtin.name=", "--config.data.source=synthetic",
           f"--config.distributed.coordinator_address=localhost:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode != 0 for p in procs)
  assert any(re.search(r"workdir .*host\d/run is not shared: processes \[1\] .* use gs://", out)
             for out in outs), outs[0][-2000:]
  assert not (tmp_path / "host0" / "run" / "checkpoints").exists()
