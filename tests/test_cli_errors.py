"""User mistakes end in ONE `error: ...` line naming what and where, exit code 2, no traceback;
`--verbose` brings the traceback back."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from tests import hf_models

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"codepmp_jax.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_convert_errors(tmp_path):
  empty = tmp_path / "no_config"
  empty.mkdir()
  _one_error_line(_run("convert", f"--from_hf={empty}", f"--output={tmp_path / 'out'}"),
                  f"{empty}: no config.json")
  model = hf_models.tiny_hf_model("llama", tmp_path / "hf")
  gguf = tmp_path / "tiny.gguf"
  hf_models.write_tiny_gguf(model, gguf, ["Q8_0"])
  gguf.write_bytes(gguf.read_bytes()[:-200])
  _one_error_line(_run("convert", f"--from_gguf={gguf}", f"--output={tmp_path / 'out'}"),
                  "tiny.gguf: tensor 'output.weight' needs bytes")
  _one_error_line(_run("convert", "--to_hf=x", "--checkpoint=x", "--from_gguf=y"), "exactly one of")
  _one_error_line(_run("convert", "--to_hf=x", "--chekpoint=y"), "chekpoint")
  verbose = _run("convert", f"--from_hf={empty}", f"--output={tmp_path / 'out'}", "--verbose")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.parametrize("module", [pytest.param("score", marks=pytest.mark.slow), "sample_candidates"])
def test_wrong_checkpoint_path(module, tmp_path):
  prompts = tmp_path / "in.jsonl"
  prompts.write_text('{"prompt": "p", "response": "r"}\n')
  missing = tmp_path / "no_such_checkpoint"
  _one_error_line(_run(module, f"--checkpoint={missing}", f"--input={prompts}", f"--output={tmp_path / 'o.jsonl'}"),
                  str(missing))
  _one_error_line(_run(module, "--checkpoint=x"), "--input is required")
