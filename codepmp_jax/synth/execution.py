"""Sandboxed execution of Python programs against their tests, always in a child process.

The child runs isolated (`python -I`, empty environment) in a fresh temporary directory with CPU,
memory, file-size and wall-clock limits; it gets its own network namespace where the kernel allows
it, and in any case its socket module refuses to connect. Used to confirm that a chosen solution
passes its tests and that the rejected one does not.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

_CLONE_NEWNET = 0x40000000
PRELUDE = '''\
import socket as _socket
def _refuse(*args, **kwargs):
  raise OSError("network access is disabled in the synth sandbox")
_socket.socket = _refuse
_socket.create_connection = _refuse
_socket.getaddrinfo = _refuse
del _socket, _refuse
'''


@dataclasses.dataclass(frozen=True)
class ExecResult:
  """Outcome of one sandboxed run; `output` is the tail of stdout + stderr."""
  passed: bool
  returncode: int | None
  timed_out: bool
  output: str


# Runs in the child before the program (no `preexec_fn`: Python code between fork and exec in a
# process that holds JAX threads can deadlock): limits, no network namespace if allowed, then exec.
_LAUNCHER = f'''\
import ctypes, os, resource, sys
program, timeout_s, memory_mb = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
memory = memory_mb * 2**20
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
cpu = int(timeout_s) + 1
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
  ctypes.CDLL(None, use_errno=True).unshare({_CLONE_NEWNET:#x})
except OSError:
  pass
os.execv(sys.executable, [sys.executable, "-I", "-B", program])
'''


def run_python(program: str, *, timeout_s: float = 10.0, memory_mb: int = 512) -> ExecResult:
  """Run `program` in a sandboxed child; passed means exit status 0 within the limits."""
  with tempfile.TemporaryDirectory(prefix="synth-exec-") as tmp:
    path = pathlib.Path(tmp) / "program.py"
    path.write_text(PRELUDE + program, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", "-c", _LAUNCHER, str(path), str(timeout_s), str(memory_mb)],
        cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "HOME": tmp}, start_new_session=True)
    try:
      out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      out, _ = proc.communicate()
      return ExecResult(False, None, True, out.decode("utf-8", "replace")[-2000:])
    return ExecResult(proc.returncode == 0, proc.returncode, False,
                      out.decode("utf-8", "replace")[-2000:])


def check_solution(solution: str, test: str, entry_point: str, **limits) -> ExecResult:
  """Run HumanEval-style `test` (which defines `check(candidate)`) against `solution`."""
  program = f"{solution}\n\n{test}\n\ncheck({entry_point})\n"
  return run_python(program, **limits)
