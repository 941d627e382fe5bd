"""Final-answer extraction and checking for GSM8K and MATH, used to grade Best-of-N picks.

GSM8K answers are numbers compared exactly as fractions; CHAMP answers are the number a
one-sentence summary states (`extract_stated`), compared the same way; MATH answers are LaTeX strings compared
after the MATH benchmark's string normalisation (Hendrycks et al. 2021) and, when both sides
parse, by sympy in a time-limited worker process (`sympy_check.SympyChecker`).
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Hashable

from codepmp_jax.eval import sympy_check

TASKS = ("gsm8k", "math", "champ")

# A number as written in prose: optional sign and dollar sign, thousands separators, decimals, and
# an optional `/denominator`. The look-behind keeps `16-3` from reading as `16` and `-3`.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>-)?\$?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<frac>\.\d+)?"
    r"(?:/(?P<den>\d+)(?!\d|\.\d))?"
)
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_GSM8K_MARKERS = (
    (re.compile(r"####"), "first"),
    (re.compile(r"answer is", re.IGNORECASE), "first"),
    (re.compile(r"\\boxed"), "first"),
    (re.compile(r"(?<![A-Za-z])A:"), "last"),
)


def _numbers(text: str) -> list[Fraction]:
  """Every number in `text`, in order, as exact fractions."""
  text = _LATEX_FRAC.sub(r"\1/\2", text)
  out = []
  for m in _NUMBER.finditer(text):
    if not (m.group("int") or m.group("frac")):
      continue
    value = Fraction((m.group("int") or "0").replace(",", "") + (m.group("frac") or ""))
    if m.group("den") and int(m.group("den")) != 0:
      value /= int(m.group("den"))
    out.append(-value if m.group("sign") else value)
  return out


def parse_number(text: str) -> Fraction | None:
  """The single number written in `text` (`"$1,200.50"`, `"-3"`, `"3/4"`), or None."""
  found = _numbers(text)
  return found[0] if found else None


def extract_gsm8k(text: str) -> Fraction | None:
  """The final numeric answer of a GSM8K-style solution, or None when it holds no number.

  Looks, in order, after the last `####`, the last `answer is` (`The answer is`, `The final
  answer is`), the last `\\boxed` and the last `A:`; the first number after the first three
  counts, and the last number after `A:` (the answer ends the worked solution); a marker followed by no number means no answer (a guess from earlier text
  would be graded as if the model had answered). Without any marker, the last number of the text.
  Commas, `$`, `%`, units and trailing `.0` do not change the value.
  """
  for marker, which in _GSM8K_MARKERS:
    starts = [m.end() for m in marker.finditer(text)]
    if starts:
      found = _numbers(text[starts[-1]:])
      if not found:
        return None
      return found[0] if which == "first" else found[-1]
  found = _numbers(text)
  return found[-1] if found else None


_STATING_VERB = re.compile(r"\b(?:is|are|equals|be)\b")


def extract_stated(text: str) -> Fraction | None:
  """The number a one-sentence answer states: the first number after its last `is`/`are`/`equals`.

  A summary restates the problem before giving its answer ("The number of strings of length 6
  ... is 239", "There are 144 ways to fill a 2 x 11 rectangle"), so neither the first nor the
  last number of the sentence is reliable; the verb that introduces the answer is. Falls back to
  `extract_gsm8k` when no such verb is followed by a number.
  """
  for verb in reversed(list(_STATING_VERB.finditer(text))):
    found = _numbers(text[verb.end():])
    if found:
      return found[0]
  return extract_gsm8k(text)


# --- MATH: the benchmark's string normalisation (hendrycks/math, `is_equiv` / `_strip_string`).


def last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed x`) in `text`, or None."""
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if start < 0:
    return None
  rest = text[start:]
  if rest.startswith("\\boxed ") and not rest.startswith("\\boxed {"):
    return rest[len("\\boxed "):].split("$")[0].strip()
  brace = rest.find("{")
  if brace < 0:
    return None
  depth = 0
  for i in range(brace, len(rest)):
    if rest[i] == "{":
      depth += 1
    elif rest[i] == "}":
      depth -= 1
      if depth == 0:
        return rest[brace + 1:i]
  return None


def _fix_fracs(s: str) -> str:
  """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`."""
  parts = s.split("\\frac")
  out = parts[0]
  for part in parts[1:]:
    out += "\\frac"
    if part.startswith("{") or len(part) < 2:
      out += part
      continue
    a, b, rest = part[0], part[1], part[2:]
    out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
  return out


def _fix_a_slash_b(s: str) -> str:
  """`3/4` -> `\\frac{3}{4}` when both sides are integers."""
  if s.count("/") != 1:
    return s
  a, b = s.split("/")
  if re.fullmatch(r"-?\d+", a) and re.fullmatch(r"\d+", b):
    return "\\frac{" + a + "}{" + b + "}"
  return s


def _fix_sqrt(s: str) -> str:
  """`\\sqrt3` -> `\\sqrt{3}`."""
  return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _remove_right_units(s: str) -> str:
  """`5\\text{ cm}` -> `5`."""
  if "\\text{ " in s:
    return s.split("\\text{ ")[0]
  return s


def normalize_math(s: str) -> str:
  """The MATH benchmark's canonical form of an answer string (spaces, `\\left`, units, `0.5`...)."""
  s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
  s = s.replace("tfrac", "frac").replace("dfrac", "frac")
  s = s.replace("\\left", "").replace("\\right", "")
  s = s.replace("^{\\circ}", "").replace("^\\circ", "")
  s = s.replace("\\$", "").replace("$", "")
  s = _remove_right_units(s)
  s = s.replace("\\%", "").replace("%", "")
  s = s.replace(" .", " 0.").replace("{.", "{0.")
  if s.startswith("."):
    s = "0" + s
  if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
    s = s.split("=")[1]
  s = _fix_sqrt(s)
  s = s.replace(" ", "")
  s = _fix_fracs(s)
  if s == "0.5":
    s = "\\frac{1}{2}"
  return _fix_a_slash_b(s)


_MATH_ANSWER_IS = re.compile(r"the answer is:?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def extract_math(text: str) -> str | None:
  """The final answer of a MATH-style solution: the last `\\boxed{}`, else `The answer is: X`."""
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed
  found = _MATH_ANSWER_IS.findall(text)
  if not found:
    return None
  answer = found[-1].strip()
  return answer[:-1].strip() if answer.endswith(".") else answer


class AnswerChecker:
  """Grades candidate solutions of one task against references, and keys answers for voting.

  `key(text)` is a hashable canonical answer (None when no answer can be read), so that equal
  answers vote together; `correct(text, reference)` is the grade. For MATH, voting groups by the
  normalised string, while grading also accepts sympy-equivalent forms.
  """

  def __init__(self, task: str, sympy_timeout_s: float = 5.0):
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    self.task = task
    self._sympy = sympy_check.SympyChecker(sympy_timeout_s) if task == "math" else None

  def key(self, text: str) -> Hashable | None:
    """Canonical answer of a candidate solution, or None when none can be extracted."""
    if self.task == "gsm8k":
      return extract_gsm8k(text)
    if self.task == "champ":
      return extract_stated(text)
    answer = extract_math(text)
    return None if answer is None else normalize_math(answer)

  def reference_key(self, reference: str) -> Hashable:
    """Canonical answer of a reference: a full solution (`####`, `\\boxed`) or the bare answer."""
    if self.task in ("gsm8k", "champ"):
      value = extract_gsm8k(reference)
      if value is None:
        raise ValueError(f"{self.task} reference holds no number: {reference!r}")
      return value
    boxed = last_boxed(reference)
    return normalize_math(reference if boxed is None else boxed)

  def equal_keys(self, a: Hashable | None, b: Hashable) -> bool:
    """Whether two canonical answers are the same (MATH: equal strings or sympy-equivalent)."""
    if a is None:
      return False
    if a == b:
      return True
    return self.task == "math" and bool(self._sympy.equal(a, b))

  def correct(self, text: str, reference: str) -> bool:
    """Whether a candidate solution's final answer matches the reference."""
    return self.equal_keys(self.key(text), self.reference_key(reference))

  def sympy_counts(self) -> dict[str, int]:
    """Sympy comparisons that timed out or could not parse so far (empty for GSM8K)."""
    if self._sympy is None:
      return {}
    return {"sympy_timeouts": self._sympy.timeouts, "sympy_unparsed": self._sympy.errors}

  def close(self) -> None:
    """Stops the sympy worker, if one was started."""
    if self._sympy is not None:
      self._sympy.close()

  def __enter__(self) -> AnswerChecker:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def math_equal(a: str, b: str, checker: sympy_check.SympyChecker | None = None) -> bool:
  """Whether two MATH answer strings are equivalent: equal after normalisation, else by sympy."""
  na, nb = normalize_math(a), normalize_math(b)
  if na == nb:
    return True
  return checker is not None and bool(checker.equal(na, nb))
