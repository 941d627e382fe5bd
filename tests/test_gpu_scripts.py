"""The GPU run rehearsed on CPU: launch/gpu_run.sh's stages at a tiny size, with the modules the
GPU machine lacks hidden, so that the device calls can fail on nothing but the GPU."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from launch.experiments import gpu_reproduction as g

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_gguf(path: pathlib.Path) -> pathlib.Path:
  """A tiny random Llama as a GGUF whose byte-level vocabulary covers every byte (for code)."""
  import torch
  import transformers
  from tests import hf_models
  config = transformers.LlamaConfig(
      vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
      tie_word_embeddings=False)
  torch.manual_seed(0)
  hf_models.write_tiny_gguf(transformers.LlamaForCausalLM(config).eval(), path, ["F32"])
  return path


def test_absent_modules_are_those_the_gpu_lacks():
  absent = g.absent_modules()
  assert {"champ_dataset", "natsort"} <= absent  # installed here (requirements.txt), not there
  assert "tensorflow" in absent  # a test requirement here, not there
  assert not {"ml_collections", "tensorboardX", "gguf", "jax", "flax", "torch", "numpy", "grain",
              "array_record", "tensorflow_datasets", "codepmp_jax"} & absent  # carried, or the tree
  assert "ml_collections" in g.absent_modules(carried=())


def test_hidden_module_fails_to_import_in_the_child():
  code = ("import champ_dataset; del champ_dataset; import sys; del sys.modules['champ_dataset']\n"
          "from launch.experiments import gpu_reproduction as g; g.hide_absent_modules()\n"
          "import importlib.util; assert importlib.util.find_spec('champ_dataset') is None\n"
          "try:\n  import champ_dataset\nexcept ModuleNotFoundError as e:\n  print('hidden', e.name)\n"
          "import numpy, etils")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "hidden champ_dataset"


def test_gguf_parts_join_and_check(tmp_path):
  files = tmp_path / "files"
  blob = os.urandom(1001)
  for i in range(g.GGUF_PARTS):
    part = pathlib.Path(g.gguf_part(files, i))
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(blob[i * 501:(i + 1) * 501])
  import hashlib
  (files / "gguf.json").write_text(json.dumps(
      {"name": "m.gguf", "bytes": 1001, "sha256": hashlib.sha256(blob).hexdigest()}))
  assert pathlib.Path(g.join_gguf(files, tmp_path / "joined")).read_bytes() == blob
  pathlib.Path(g.gguf_part(files, 1)).write_bytes(b"x")
  (tmp_path / "joined" / "m.gguf").unlink()
  with pytest.raises(ValueError, match="sha256"):
    g.join_gguf(files, tmp_path / "joined")


@pytest.mark.rehearse  # `make rehearse`: CI need not repeat the GPU session's CPU rehearsal
def test_gpu_run_rehearses_both_device_calls(tmp_path):
  """`launch/gpu_run.sh rehearse`: call1 and call2 themselves, tiny, GPU-absent modules hidden."""
  env = {**os.environ, "PYTHON": sys.executable, "REHEARSAL_DIR": str(tmp_path)}
  done = subprocess.run([str(ROOT / "launch" / "gpu_run.sh"), "rehearse"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
  files = tmp_path / "files"
  assert (files / "data" / "gsm8k" / "train.jsonl").exists()
  assert (pathlib.Path(f"{files}.part2") / "gguf.part2").exists()
  results = json.loads((tmp_path / "results" / "results.json").read_text())
  assert results["pretraining"]["step"] >= 1
  for metric in ("gsm8k_pairwise", "gsm8k_pairwise_tie_aware", "logiqa2_mc_tie_aware", "champ_bon2"):
    row = results["summary"][metric]["8"]
    for arm in g.ARMS:
      assert row[arm]["n"] == 2 and 0 <= row[arm]["mean"] <= 1
    assert set(row) == {"base", "pmp", "pmp-base"}
  # style baselines beside random/majority/oracle; what each evaluation tied, skipped and cut
  assert {"random", "oracle", "longest", "shortest"} <= set(results["champ_baselines"])
  notes = results["eval_notes"]["pmp/k8/seed0"]
  assert {"ties", "accuracy_tie_aware", "identical_after_truncation", "truncation"} <= set(
      notes["pairwise"])
  assert "truncation" in notes["bon"]
  assert results["pairs_dropped"] is not None
  md = (tmp_path / "results" / "results.md").read_text()
  assert "| gsm8k_pairwise | 8 |" in md and "longest" in md
  assert (tmp_path / "results" / "results.png").stat().st_size > 0
  assert "pmp vs base" in (tmp_path / "results" / "call2.log").read_text()


def test_sources_name_site_packages_directories(tmp_path, capsys):
  paths = g.source_paths(["stdlib", str(tmp_path), "etils", "no_such_package_here"])
  assert paths[:2] == ["stdlib", str(tmp_path)]
  assert paths[2].endswith(os.path.join("site-packages", "etils"))
  assert "skipped: no_such_package_here" in capsys.readouterr().out
  with pytest.raises(FileNotFoundError, match="none of the code sources"):
    g.source_paths(["no_such_package_here"])


def test_child_past_its_time_limit_is_stopped():
  assert not g._python_module("timeit", ["-n1", "-r1", "import time; time.sleep(60)"], False, 2)
  assert g._python_module("timeit", ["-n1", "-r1", "pass"], False, 60)
  with pytest.raises(subprocess.CalledProcessError):
    g._python_module("timeit", ["-n1", "-r1", "1/0"], False, 60)


def test_two_arm_summary_is_the_paired_t_interval():
  from launch.experiments import pmp_control
  s = pmp_control.ControlSettings(ks=(8,), seeds=(0, 1))
  per_run = {("base", 8, 0): {"acc": 0.5}, ("base", 8, 1): {"acc": 0.7},
             ("pmp", 8, 0): {"acc": 0.6}, ("pmp", 8, 1): {"acc": 0.9}}
  row = pmp_control.summarize(s, per_run, g.ARMS)["acc"]["8"]
  assert set(row) == {"base", "pmp", "pmp-base"}
  # differences 0.1 and 0.2: mean 0.15, sd 0.1/sqrt(2), t(0.975, 1 dof) = 12.7062
  half = 12.7062 * (0.1 / 2 ** 0.5) / 2 ** 0.5
  assert row["pmp-base"]["mean"] == pytest.approx(0.15)
  assert row["pmp-base"]["ci95"] == pytest.approx([0.15 - half, 0.15 + half], abs=1e-4)
  table = pmp_control.markdown_table({"acc": {"8": row}}, g.ARMS)
  assert table.splitlines()[0] == "| metric | k | base | pmp | pmp-base |"
