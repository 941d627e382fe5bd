"""Sympy equivalence of normalised MATH answers, run in a worker process with a time limit.

Model-written answers can make sympy run for hours (`9^{9^{9}}` evaluates a 370-million-digit
integer inside one C call that no signal interrupts), so the comparison runs in a child process
that is killed and restarted when it overruns; a timed-out comparison counts as not equal.
LaTeX is translated by a small converter (fractions, roots, powers, `\\pi`, products) into
sympy's own syntax, and only a whitelist of names reaches the parser.
"""
from __future__ import annotations

import json
import re
import select
import subprocess
import sys

_ALLOWED_NAMES = {"sqrt", "pi", "oo", "sin", "cos", "tan", "log", "exp"}
_COMMANDS = {
    "\\cdot": "*", "\\times": "*", "\\div": "/", "\\pi": " pi ", "\\infty": " oo ",
    "\\sin": " sin", "\\cos": " cos", "\\tan": " tan", "\\ln": " log", "\\log": " log",
    "\\exp": " exp", "\\,": "", "\\;": "", "\\ ": "",
}
_BRACKETS = {"(": ")", "[": "]"}
_STARTUP_S = 10.0


def _brace_group(s: str, start: int) -> tuple[str, int]:
  """The content of the `{...}` group at `s[start]` (or the single character there), and its end."""
  if start >= len(s):
    raise ValueError("missing argument")
  if s[start] != "{":
    return s[start], start + 1
  depth = 0
  for i in range(start, len(s)):
    depth += {"{": 1, "}": -1}.get(s[i], 0)
    if depth == 0:
      return s[start + 1:i], i + 1
  raise ValueError("unbalanced braces")


def latex_to_sympy_syntax(s: str) -> str:
  """Translates a normalised LaTeX answer into sympy's expression syntax; ValueError if unsupported."""
  out = []
  i = 0
  while i < len(s):
    if s.startswith("\\frac", i):
      num, i = _brace_group(s, i + len("\\frac"))
      den, i = _brace_group(s, i)
      out.append(f"(({latex_to_sympy_syntax(num)})/({latex_to_sympy_syntax(den)}))")
    elif s.startswith("\\sqrt", i):
      i += len("\\sqrt")
      index = None
      if i < len(s) and s[i] == "[":
        close = s.index("]", i)
        index, i = s[i + 1:close], close + 1
      arg, i = _brace_group(s, i)
      arg = latex_to_sympy_syntax(arg)
      if index is None:
        out.append(f"sqrt({arg})")
      else:
        out.append(f"(({arg})**(1/({latex_to_sympy_syntax(index)})))")
    elif s[i] == "^":
      power, i = _brace_group(s, i + 1)
      out.append(f"**({latex_to_sympy_syntax(power)})")
    elif s[i] == "\\":
      for command, replacement in _COMMANDS.items():
        if s.startswith(command, i):
          out.append(replacement)
          i += len(command)
          break
      else:
        raise ValueError(f"unsupported LaTeX command at {s[i:i + 12]!r}")
    elif s[i] in "{}":
      out.append("(" if s[i] == "{" else ")")
      i += 1
    else:
      out.append(s[i])
      i += 1
  return "".join(out)


def _parse(s: str):
  """A sympy expression from a normalised LaTeX answer; ValueError when it cannot be read safely.

  Only digits, operators, single-letter symbols and the whitelisted function names reach
  `parse_expr` (which evaluates code); a run of letters like `xy` reads as the product `x*y`.
  """
  from sympy import Symbol
  from sympy.parsing.sympy_parser import (
      implicit_multiplication_application, parse_expr, standard_transformations)
  text = latex_to_sympy_syntax(s)
  if not re.fullmatch(r"[0-9A-Za-z+\-*/()\s]*(?:\.[0-9][0-9A-Za-z+\-*/()\s]*)*", text):
    raise ValueError(f"unsupported characters in {text!r}")
  if not text.strip():
    raise ValueError("empty answer")
  text = re.sub(r"[A-Za-z]+", lambda m: m.group() if m.group() in _ALLOWED_NAMES
                else "*".join(m.group()), text)
  names = {c: Symbol(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
  transformations = standard_transformations + (implicit_multiplication_application,)
  return parse_expr(text, local_dict=names, transformations=transformations)


def _split_top_level(s: str) -> tuple[str, list[str]]:
  """(`brackets`, elements) of a tuple or interval like `(1,2]`; ('', [s]) when `s` is not one."""
  if len(s) >= 2 and s[0] in _BRACKETS and s[-1] in ")]" and "," in s:
    inner, brackets = s[1:-1], s[0] + s[-1]
  else:
    inner, brackets = s, ""
  parts, depth, current = [], 0, ""
  for c in inner:
    depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(c, 0)
    if c == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += c
  parts.append(current)
  return brackets, parts


def sympy_equal(a: str, b: str) -> bool | None:
  """Whether two normalised LaTeX answers are mathematically equal; None when either can't parse.

  Tuples and intervals compare element by element (same brackets, same length).
  Runs unguarded: call it through `SympyChecker` on untrusted input.
  """
  from sympy import N, simplify
  brackets_a, parts_a = _split_top_level(a)
  brackets_b, parts_b = _split_top_level(b)
  if brackets_a != brackets_b or len(parts_a) != len(parts_b):
    return False
  for x, y in zip(parts_a, parts_b):
    if x == y:
      continue
    try:
      ex, ey = _parse(x), _parse(y)
    except (ValueError, SyntaxError, TypeError, NameError, AttributeError, ZeroDivisionError):
      return None
    if simplify(ex - ey) == 0:
      continue
    if ex.free_symbols or ey.free_symbols:
      return False
    vx, vy = complex(N(ex)), complex(N(ey))
    if abs(vx - vy) > 1e-9 * max(1.0, abs(vy)):
      return False
  return True


class SympyChecker:
  """A persistent worker process answering `sympy_equal` queries, each within `timeout_s` seconds.

  Results are cached; an overrun or a crash kills the worker (the next query starts a fresh one)
  and reads as not equal. `timeouts` counts those and `errors` answers that could not be parsed.
  """

  def __init__(self, timeout_s: float = 5.0, memory_limit_bytes: int = 2 << 30):
    self.timeout_s = timeout_s
    self.memory_limit_bytes = memory_limit_bytes
    self.timeouts = 0
    self.errors = 0
    self._cache: dict[tuple[str, str], bool | None] = {}
    self._proc: subprocess.Popen | None = None

  def _start(self) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "codepmp_jax.eval.sympy_check", str(self.memory_limit_bytes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)

  def equal(self, a: str, b: str) -> bool | None:
    """`sympy_equal(a, b)` computed in the worker; False on timeout, None when unparseable."""
    if (a, b) in self._cache:
      return self._cache[(a, b)]
    started = self._proc is None or self._proc.poll() is not None
    if started:
      self._proc = self._start()
    try:
      self._proc.stdin.write((json.dumps([a, b]) + "\n").encode())
    except BrokenPipeError:  # The worker died (e.g. out of memory) since the last query.
      self._proc, started = self._start(), True
      self._proc.stdin.write((json.dumps([a, b]) + "\n").encode())
    # A fresh worker's first answer also waits for it to import sympy.
    wait = self.timeout_s + (_STARTUP_S if started else 0.0)
    ready, _, _ = select.select([self._proc.stdout], [], [], wait)
    line = self._proc.stdout.readline() if ready else b""
    if not line:
      self.timeouts += 1
      self.close()
      result = False
    else:
      result = json.loads(line)
      self.errors += result is None
    self._cache[(a, b)] = result
    return result

  def close(self) -> None:
    """Stops the worker process."""
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      self._proc = None

  def __del__(self):
    self.close()


def _serve(memory_limit_bytes: int) -> None:
  """Worker loop: reads `[a, b]` JSON lines on stdin, writes `true|false|null` lines on stdout."""
  import resource
  resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
  import sympy  # noqa: F401  (imported before the first query, so queries time only sympy work)
  for line in sys.stdin:
    a, b = json.loads(line)
    try:
      result = sympy_equal(a, b)
    except Exception:  # noqa: BLE001  Any failure on untrusted input means "could not compare".
      result = None
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
  _serve(int(sys.argv[1]))
