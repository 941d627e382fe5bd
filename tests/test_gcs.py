"""Every stage with `gs://` paths, end to end against a local GCS emulator, TF-free.

A `gs://` train workdir (resumed there); `prepare` from and into the bucket (a crash before the
end leaves no manifest, the rerun reuses the shards copied up) and training from the prepared data
there; `decay_from` a checkpoint there; `convert` in and out, `score`, `eval` and
`sample_candidates` writing there. Each equals the same stage on local paths.

The stages run in subprocesses with TensorFlow hidden from imports (`NO_TF`), so `etils.epath`
takes its fsspec/gcsfs backend, and TFDS its TensorFlow-free code, as in an install without
TensorFlow; gcsfs and google-cloud-storage (tensorboardX) are pointed at the emulator by
STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) by TENSORSTORE_GCS_HTTP_URL, all with
anonymous credentials. The emulator is gcp-storage-emulator, in this process.
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
# The prelude of every subprocess: no import finder finds a tensorflow module, as on a machine
# without TensorFlow (TFDS then runs its TensorFlow-free code, which `sys.modules['tensorflow'] =
# None` would break).
NO_TF = """
import sys

from launch.experiments.gpu_reproduction import hide_modules
hide_modules({"tensorflow"})
"""
# The trainer's command line, run with TensorFlow hidden.
RUN_TRAIN = NO_TF + ("import runpy; sys.argv[0] = 'train'; "
                     "runpy.run_module('codepmp_jax.train', run_name='__main__')")


# What `init_from`, `score` and `eval` read from a gs:// workdir (its params, through orbax), and
# a tokenizer saved to and loaded from gs://: argv = gs workdir, local workdir, local scratch dir.
CHECK_READS = NO_TF + """
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


def _rows(metrics_text: str) -> dict[int, dict]:
  return {row["step"]: row for row in map(json.loads, metrics_text.splitlines())}


def _losses(metrics_text: str) -> dict[int, float]:
  return {step: row["loss"] for step, row in _rows(metrics_text).items()}


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


def _fs(url: str) -> gcsfs.GCSFileSystem:
  # The plain class: gcsfs's default one would ask the emulator for the bucket's layout (see _env).
  return gcsfs.core.GCSFileSystem(endpoint_url=url, token="anon")


def _run(script: str, env: dict, *args: str, timeout: int = 400) -> str:
  """`script` (NO_TF first) in a subprocess; its output, after checking that it succeeded."""
  proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-4000:]
  return proc.stdout


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without(report: dict, *keys: str) -> dict:
  return {k: v for k, v in report.items() if k not in keys}


PAIRS = [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}.",
          "rejected": f"It is {2 * i + 1}.", "margin": i % 3} for i in range(40)]

# prepare from and into the bucket (a crash while the second train shard is copied up, then the
# rerun), and the same locally; then training from the prepared data in the bucket (its workdir
# there too), from the local copy, and decaying from the bucket's stable-phase checkpoint.
# argv: local dir, bucket dir.
PREPARE_AND_TRAIN = NO_TF + """
import os
from etils import epath
from codepmp_jax import cli, train
from codepmp_jax.config import default_config
from codepmp_jax.data import prepare, prepared

local, bucket = sys.argv[1], sys.argv[2]


def run_prepare(root):
  cli.call(prepare.main, prepare.define_flags, [
      f"--input={root}/raw/*.jsonl", "--format=pairs", f"--tokenizer={root}/tok.model", "--seq_len=24",
      f"--out={root}/prepared", "--num_shards=2", "--split=train:0.75,eval:0.25"])
  return prepared.read_manifest(f"{root}/prepared")


run_prepare(local)
publish = prepare._Staging.publish


def crash_at_second_train_shard(staging, name):
  if name == "stats/train-00001-of-00002.json":  # its records and sizes are up, its stats not
    raise RuntimeError("injected crash")
  publish(staging, name)


prepare._Staging.publish = crash_at_second_train_shard
try:
  run_prepare(bucket)
  raise AssertionError("no crash")
except RuntimeError as e:
  assert str(e) == "injected crash", e
prepare._Staging.publish = publish
out = epath.Path(bucket) / "prepared"
assert (out / prepared.shard_file("train", 1, 2)).exists()
assert not (out / prepared.MANIFEST).exists(), "a manifest before the end"
try:
  prepared.read_manifest(out)
  raise AssertionError("an incomplete directory read as prepared data")
except FileNotFoundError as e:
  assert "not prepared data" in str(e), e
manifest = run_prepare(bucket)
reused = manifest["splits"]["train"]["shards"][0]["pairs"]
assert manifest["dropped"] == {"overlong": 0, "identical_after_truncation": 0}, manifest["dropped"]
assert manifest["throughput"]["pairs_encoded"] == manifest["records_loaded"] - reused, manifest
staged = [n for n in os.listdir(os.environ["TMPDIR"]) if n.startswith(("prepare-", ".spill-"))]
assert not staged, staged


def run_train(data, workdir, decay_from=""):
  config = default_config()
  config.data.path = data
  config.model.update(vocab_size=0, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1)
  config.train.update(global_batch=8, seq_len=24, total_steps=4, log_every=1, eval_every=0,
                      decay_steps=2)
  config.optimizer.update(schedule="wsd", warmup_ratio=0.0, decay_ratio=0.5)  # decays after step 2
  config.checkpoint.save_every = 2
  config.mesh_shape = (-1, 1, 1)
  config.compilation_cache_dir = f"{local}/jit"  # the later runs reuse the first one's compiles
  config.decay_from = decay_from
  train.train(config, workdir)


run_train(f"{bucket}/prepared", f"{bucket}/stable")
run_train(f"{local}/prepared", f"{local}/stable")
run_train(f"{bucket}/prepared", f"{local}/decayed", decay_from=f"{bucket}/stable:2")
print("stages ok")
"""


@pytest.mark.slow
def test_gs_prepare_training_from_the_bucket_and_decay_from(emulator, tmp_path):
  from codepmp_jax.data.tokenizer import train_sentencepiece
  fs = _fs(emulator)
  local, tmp, cache = tmp_path / "local", tmp_path / "tmp", tmp_path / "cache"
  for d in (local / "raw", tmp):
    d.mkdir(parents=True)
  for k in range(2):
    (local / "raw" / f"pairs{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS[k::2]))
  train_sentencepiece([r["prompt"] + r["chosen"] + r["rejected"] for r in PAIRS] * 5, 300, local / "tok")
  fs.put(str(local / "raw"), f"{BUCKET}/data/raw", recursive=True)
  fs.put(str(local / "tok.model"), f"{BUCKET}/data/tok.model")
  env = {**_env(emulator), "TMPDIR": str(tmp), "CODEPMP_CACHE": str(cache)}
  out = _run(PREPARE_AND_TRAIN, env, str(local), f"gs://{BUCKET}/data")
  assert "stages ok" in out, out[-4000:]
  fs.invalidate_cache()

  # The prepared directory in the bucket holds the local one's files, byte for byte, but for the
  # inputs' paths (gs:// there) and what they enter: the settings hash, and the time taken.
  fs.get(f"{BUCKET}/data/prepared", str(tmp_path / "from_bucket"), recursive=True)
  remote, here = _files(tmp_path / "from_bucket"), _files(local / "prepared")
  assert sorted(remote) == sorted(here)
  for name in here:
    if name != "manifest.json" and not name.startswith("stats/"):
      assert remote[name] == here[name], name
      continue
    a, b = json.loads(remote[name]), json.loads(here[name])
    for info in (a, b):
      info.pop("settings_hash")
      info.pop("throughput", None)
      for source in info.get("sources", []):
        source["path"] = pathlib.PurePosixPath(source["path"]).name
    assert a == b, name

  # Training read the bucket's train shards through the local cache (only those: with no
  # held-out evaluation it never opened an eval shard), and took the local run's steps.
  cached = sorted(p.name for p in (cache / "prepared").rglob("*") if p.is_file())
  assert cached == [f"codepmp_pairs-train.array_record-0000{i}-of-00002" for i in range(2)], cached
  stable = _rows(fs.cat(f"{BUCKET}/data/stable/metrics.jsonl").decode())
  straight = _rows((local / "stable" / "metrics.jsonl").read_text())
  assert sorted(stable) == sorted(straight) == [1, 2, 3, 4]
  assert fs.ls(f"{BUCKET}/data/stable/checkpoints/2/state")
  decayed = _rows((local / "decayed" / "metrics.jsonl").read_text())
  assert sorted(decayed) == [3, 4]  # decay_from=gs://.../stable:2 continued from step 2
  for step, row in [*stable.items(), *decayed.items()]:
    for key in ("loss", "accuracy", "lr"):
      assert row[key] == pytest.approx(straight[step][key], abs=1e-6), (step, key)


# convert (Hugging Face in, our checkpoint out, and back), score, eval pairwise, sample_candidates
# and eval bon (its scores and plot), on local paths and then in the bucket, where the candidates
# are sampled in two runs (the second resumes the output there). argv: local dir, bucket dir.
STAGES = NO_TF + """
import importlib
import jax
from codepmp_jax import cli, convert, sample_candidates, score

jax.config.update("jax_compilation_cache_dir", sys.argv[1] + "/jit")  # the bucket's stages reuse them
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
evaluate = importlib.import_module("codepmp_jax.eval.__main__")


def run(program, *argv):
  cli.call(program.main, program.define_flags, list(argv))


for root in sys.argv[1:]:
  run(convert, f"--from_hf={root}/hf", f"--output={root}/ckpt")
  run(convert, f"--to_hf={root}/export", f"--checkpoint={root}/ckpt")
  model = [f"--checkpoint={root}/ckpt", "--batch_size=4", "--max_length=48"]
  run(score, *model, f"--input={root}/in/score.jsonl", f"--output={root}/out/scored.jsonl")
  run(evaluate, "pairwise", *model, f"--data={root}/in/pairs.jsonl", "--format=pairs",
      f"--out={root}/out/pairwise.json")
  sample = [f"--checkpoint={root}/ckpt", f"--output={root}/out/candidates.jsonl", "--n=3",
            "--max_new_tokens=4", "--batch_size=2"]
  if "://" in root:
    run(sample_candidates, *sample, f"--input={root}/in/first_prompts.jsonl")
  run(sample_candidates, *sample, f"--input={root}/in/prompts.jsonl")
  run(evaluate, "bon", *model, f"--candidates={root}/out/candidates.jsonl", "--task=gsm8k",
      "--n=1,2", f"--out={root}/out/bon.json", f"--save_scores={root}/out/bon_scores.jsonl")
print("stages ok")
"""

QUESTIONS = [{"id": i, "question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
             for i in range(3)]


@pytest.mark.slow
def test_gs_convert_score_eval_and_generate_read_and_write_the_bucket(emulator, tmp_path):
  import flax.linen as nn
  import jax
  from codepmp_jax import convert
  from codepmp_jax.data.tokenizer import train_sentencepiece
  from codepmp_jax.model import transformer
  from codepmp_jax.model.config import get_preset

  fs = _fs(emulator)
  local = tmp_path / "local"
  # The inputs: a tiny Hugging Face model (math prompt format) and a file for each stage.
  texts = [f"Instruction:{q['question']}\n\nResponse:{q['answer']}" for q in QUESTIONS] * 20
  texts += [r["prompt"] + r["chosen"] + r["rejected"] for r in PAIRS]
  tokenizer = train_sentencepiece(texts, 300, tmp_path / "sp")
  config = get_preset("tiny", vocab_size=300, hidden_size=32, intermediate_size=64, num_heads=2,
                      num_kv_heads=1, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
  params = nn.unbox(transformer.init_params(config, jax.random.key(3)))
  convert.save_hf(local / "hf", params, config, tokenizer, template="math")
  inputs = {
      "score.jsonl": [{"prompt": "What is 2 + 2?", "response": " 4"}, {"text": "def f(x): return x"},
                      {"prompt": "What is 1 + 1?", "chosen": " 2", "rejected": " 3"}],
      "pairs.jsonl": PAIRS[:6], "prompts.jsonl": QUESTIONS, "first_prompts.jsonl": QUESTIONS[:2]}
  (local / "in").mkdir()
  for name, records in inputs.items():
    (local / "in" / name).write_text("".join(json.dumps(r) + "\n" for r in records))
  fs.put(str(local / "hf"), f"{BUCKET}/stages/hf", recursive=True)
  fs.put(str(local / "in"), f"{BUCKET}/stages/in", recursive=True)

  assert "stages ok" in _run(STAGES, _env(emulator), str(local), f"gs://{BUCKET}/stages")
  fs.invalidate_cache()
  assert fs.ls(f"{BUCKET}/stages/ckpt/params"), "convert --output wrote no parameters to the bucket"
  fs.get(f"{BUCKET}/stages/export", str(tmp_path / "export"), recursive=True)
  fs.get(f"{BUCKET}/stages/out", str(tmp_path / "out"), recursive=True)

  # The export of the checkpoint converted in the bucket is the local one, file for file; the
  # outputs are the local ones (the candidates sampled in two runs too), but for the paths the
  # reports name.
  assert _files(tmp_path / "export") == _files(local / "export")
  remote, here = _files(tmp_path / "out"), _files(local / "out")
  assert sorted(remote) == sorted(here) == ["bon.json", "bon.png", "bon_scores.jsonl",
                                            "candidates.jsonl", "pairwise.json", "scored.jsonl"]
  for name in ("scored.jsonl", "candidates.jsonl", "bon_scores.jsonl", "bon.png"):
    assert remote[name] == here[name], name
  assert len(here["candidates.jsonl"].splitlines()) == len(QUESTIONS)
  paths = ("data", "candidates", "checkpoint", "plot")
  for name in ("pairwise.json", "bon.json"):
    assert _without(json.loads(remote[name]), *paths) == _without(json.loads(here[name]), *paths), name
  assert json.loads(remote["bon.json"])["plot"] == f"gs://{BUCKET}/stages/out/bon.png"
