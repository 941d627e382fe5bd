"""A `gs://` workdir end to end against a local GCS emulator (gcp-storage-emulator), TF-free.

The trainer runs in a subprocess with TensorFlow hidden, so `etils.epath` takes its fsspec/gcsfs
backend as in an install without TensorFlow; gcsfs and google-cloud-storage (tensorboardX) are
pointed at the emulator by STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) by
TENSORSTORE_GCS_HTTP_URL, all with anonymous credentials.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import gcsfs
import pytest
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import objects

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "bucket"
# The SMALL run of tests/test_train.py, with a constant learning rate so that a run stopped at
# step 5 and resumed to step 8 takes the same updates as one run of 8 steps.
SMALL = [
    f"--config={ROOT}/configs/tiny.py", "--config.data.builtin.name=", "--config.data.source=synthetic",
    "--config.data.vocab_size=256", "--config.data.synthetic_pairs=512", "--config.model.vocab_size=256",
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_layers=2",
    "--config.train.global_batch=8", "--config.train.seq_len=32", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.optimizer.lr=1e-3", "--config.mesh_shape=(-1,1,1)",
    "--config.optimizer.schedule=constant", "--config.optimizer.warmup_ratio=0.0",
    "--config.checkpoint.save_every=2",
]
# The trainer's command line, run with TensorFlow made unimportable first.
RUN_TRAIN = ("import runpy, sys; sys.modules['tensorflow'] = None; sys.argv[0] = 'train'; "
             "runpy.run_module('codepmp_jax.train', run_name='__main__')")


# What `init_from`, `score` and `eval` read from a gs:// workdir (its params, through orbax), and
# a tokenizer saved to and loaded from gs://: argv = gs workdir, local workdir, local scratch dir.
CHECK_READS = """
import sys; sys.modules['tensorflow'] = None
import jax, numpy as np
from codepmp_jax import checkpoint
from codepmp_jax.data.tokenizer import load_tokenizer, train_sentencepiece
remote, remote_config = checkpoint.load_model(sys.argv[1])
local, local_config = checkpoint.load_model(sys.argv[2])
assert remote_config == local_config
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), remote, local)
texts = [f"def f{i}(x):\\n  return x * {i} + {i * i}\\n" for i in range(200)]
tokenizer = train_sentencepiece(texts, 300, sys.argv[3] + "/sp")
tokenizer.save(sys.argv[1] + "/tokenizer_copy")
back = load_tokenizer(sys.argv[1] + "/tokenizer_copy")
assert back.encode(texts[7]) == tokenizer.encode(texts[7]) and back.eos_id == tokenizer.eos_id
print("reads ok")
"""


def _download_with_generation(download):
  """The emulator's object download plus the `x-goog-generation` headers real GCS sends.

  tensorstore reads an object's generation from these headers (and conditions its OCDBT manifest
  writes on it); without them every read looks like a malformed generation."""

  def wrapped(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status.value < 300:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]

  return wrapped


@pytest.fixture(scope="module")
def emulator():
  """The URL of an in-memory GCS emulator on a free local port, with bucket `BUCKET`."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  original = objects.download
  objects.download = _download_with_generation(original)
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.stop()
    objects.download = original


def _env(url: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
  env.update(
      STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
      # gcsfs's default class first asks the storage-control gRPC API for the bucket's layout,
      # which the emulator does not serve (a minute of retries per bucket).
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
      PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return env


def _train(cwd: pathlib.Path, workdir: str, env: dict, *overrides: str) -> str:
  cmd = [sys.executable, "-c", RUN_TRAIN, f"--workdir={workdir}", *SMALL, *overrides]
  proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-4000:]
  return proc.stdout


def _losses(metrics_text: str) -> dict[int, float]:
  return {row["step"]: row["loss"] for row in map(json.loads, metrics_text.splitlines())}


@pytest.mark.slow
def test_gs_workdir_trains_and_resumes_in_the_bucket(emulator, tmp_path):
  env = _env(emulator)
  # The plain class: gcsfs's default one would ask the emulator for the bucket's layout (see _env).
  fs = gcsfs.core.GCSFileSystem(endpoint_url=emulator, token="anon")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  _train(cwd, f"gs://{BUCKET}/run", env, "--config.train.total_steps=5")
  fs.invalidate_cache()

  run = f"{BUCKET}/run"
  names = {pathlib.PurePosixPath(p).name for p in fs.ls(run)}
  assert {"config.json", "metrics.jsonl", "model_config.json", "summary.json",
          "checkpoints"} <= names, names
  assert any(name.startswith("events.out.tfevents.") for name in names), names  # TensorBoard
  steps = {pathlib.PurePosixPath(p).name for p in fs.ls(f"{run}/checkpoints")}
  assert {"2", "4", "5"} <= steps, steps
  assert fs.ls(f"{run}/checkpoints/5/state"), "no arrays in the saved train state"
  assert json.loads(fs.cat(f"{run}/config.json"))["train"]["total_steps"] == 5
  assert sorted(_losses(fs.cat(f"{run}/metrics.jsonl").decode())) == [1, 2, 3, 4, 5]
  assert list(cwd.iterdir()) == [], "the gs:// workdir was (also) made locally"

  # Resumed to 8 steps, it continues from step 5 read back from the bucket: the same losses as
  # one uninterrupted local run of 8 steps (same parameters, optimizer state and data position).
  out = _train(cwd, f"gs://{BUCKET}/run", env, "--config.train.total_steps=8", "--verbose")
  assert "restored step 5 of gs://bucket/run" in out, out[-4000:]
  fs.invalidate_cache()
  assert list(cwd.iterdir()) == []
  resumed = _losses(fs.cat(f"{run}/metrics.jsonl").decode())
  assert sorted(resumed) == list(range(1, 9))
  assert json.loads(fs.cat(f"{run}/summary.json"))["step"] == 8

  local = tmp_path / "local"
  _train(cwd, str(local), env, "--config.train.total_steps=8")
  straight = _losses((local / "metrics.jsonl").read_text())
  for step in range(1, 9):
    assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step

  scratch = tmp_path / "scratch"
  scratch.mkdir()
  proc = subprocess.run([sys.executable, "-c", CHECK_READS, f"gs://{BUCKET}/run", str(local),
                         str(scratch)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=300)
  assert proc.returncode == 0 and "reads ok" in proc.stdout, proc.stdout[-4000:]
  fs.invalidate_cache()
  assert fs.ls(f"{run}/tokenizer_copy")
  assert list(cwd.iterdir()) == []
