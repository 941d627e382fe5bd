"""The execution sandbox: a child process with time and memory limits, no network, a temp dir."""
from __future__ import annotations

import os

from codepmp_jax.synth import execution


def test_pass_and_fail_by_exit_status():
  assert execution.run_python("assert sum(range(5)) == 10\n").passed
  failed = execution.run_python("assert 1 + 1 == 3, 'arithmetic'\n")
  assert not failed.passed and failed.returncode == 1 and "arithmetic" in failed.output


def test_time_limit_kills_the_child():
  r = execution.run_python("while True:\n  pass\n", timeout_s=1.0)
  assert not r.passed and r.timed_out


def test_memory_limit():
  r = execution.run_python("x = bytearray(400 * 2**20)\nprint('allocated')\n", memory_mb=200)
  assert not r.passed and "MemoryError" in r.output


def test_no_network_and_private_temp_dir(monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", "sk-parent-secret")
  r = execution.run_python(
      "import socket\ntry:\n  socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
      "except OSError as e:\n  print('refused:', e)\nelse:\n  raise SystemExit('connected')\n"
      "import os\nprint('cwd', os.getcwd())\nprint('env', sorted(os.environ))\n")
  assert r.passed, r.output
  assert "refused:" in r.output and "synth-exec-" in r.output and os.getcwd() not in r.output.split("cwd ")[1]
  assert "OPENAI_API_KEY" not in r.output and "sk-parent-secret" not in r.output


def test_humaneval_style_check():
  test = "def check(candidate):\n  assert candidate(2, 3) == 5\n  assert candidate(-1, 1) == 0\n"
  assert execution.check_solution("def add(a, b):\n  return a + b\n", test, "add").passed
  assert not execution.check_solution("def add(a, b):\n  return a - b\n", test, "add").passed
