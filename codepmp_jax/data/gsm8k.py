"""GSM8K solutions as preference pairs: the reference solution vs a consistently wrong one.

A GSM8K answer is a worked solution whose computations carry calculator annotations
(`48/2 = <<48/2=24>>24`) and whose last line is `#### <final answer>`. The chosen response is the
solution without annotations, ending in `The answer is N`. A rejected response changes the result
of ONE computation and then redoes the rest of the solution with the wrong value: every later
annotation that uses it is re-evaluated, and the numbers written in the text are rewritten to
match, so the solution reads as a plausible, self-consistent mistake whose final answer differs.

A computation is an annotation or a written-out equation (`20/4 = $5`). A later number refers to
an earlier computation when it equals that computation's result (the most recent one with that
value); that is how the dependency chain is recovered from the text.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import operator
import random
import re

ANNOTATION = re.compile(r"<<([^<>]*)>>")
_NUMBER = r"\d+(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+"
# A minus directly before digits is a sign unless it follows a word or a closing parenthesis.
_SIGNED = rf"(?:(?<![\w)])-)?(?:{_NUMBER})"
# A written-out equation: numbers joined by operators, `=`, a number (`12+5 = $17`).
_EXPRESSION = rf"\$?(?:{_SIGNED})(?:\s*[-+*/x×]\s*\$?(?:{_SIGNED}))+"
_TOKEN = re.compile(rf"(<<[^<>]*>>)|({_EXPRESSION})(\s*=\s*\$?)({_SIGNED})|({_SIGNED})")
_NUMBER_RE = re.compile(_SIGNED)
_FINAL = re.compile(r"^\s*(-?)\s*\$?\s*(" + _NUMBER + r")\s*$")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
              ast.Pow: operator.pow}
_VALUES_PER_STEP = 6


class NoPerturbation(ValueError):
  """This solution has no computation whose change reaches the final answer."""


@dataclasses.dataclass(frozen=True)
class Gsm8kPairs:
  """The chosen solution of one question and its distinct wrong variants."""
  chosen: str
  rejected: tuple[str, ...]
  final_answer: str
  rejected_answers: tuple[str, ...]


def final_answer_line(answer: str) -> tuple[str, str]:
  """(solution body, final answer text) of a GSM8K answer; ValueError if `#### N` is missing."""
  body, sep, final = answer.rpartition("####")
  if not sep or not final.strip():
    raise ValueError("the answer has no '#### <number>' final line")
  return body.rstrip(), final.strip()


def clean_solution(body: str, final: str) -> str:
  """The solution as a model would write it: annotations removed, `The answer is N` last."""
  return f"{ANNOTATION.sub('', body).rstrip()}\nThe answer is {final}"


def make_pairs(answer: str, seed: int, key: str, num_rejected: int = 1) -> Gsm8kPairs:
  """Chosen and up to `num_rejected` distinct rejected solutions, deterministic in (seed, key).

  Raises ValueError when the answer lacks a final line and `NoPerturbation` when no single
  changed computation alters the final answer.
  """
  body, final = final_answer_line(answer)
  final_value = _parse_final(final)
  chain = _Chain(body)
  rng = random.Random(hashlib.sha256(f"{seed}\0{key}".encode()).digest())
  steps = list(range(len(chain.results)))
  rng.shuffle(steps)
  rejected, answers = [], []
  for step in steps:
    for value in _wrong_values(chain.results[step], chain.decimals[step], rng):
      try:
        text, new_final = chain.rewrite(step, value, final_value)
      except (ArithmeticError, ValueError, OverflowError):
        continue
      if new_final is None or _key(new_final) == _key(final_value):
        continue
      new_final_text = _format(new_final, final)
      candidate = clean_solution(text, new_final_text)
      if candidate not in rejected:
        rejected.append(candidate)
        answers.append(new_final_text)
        break  # one wrong value per step, so several rejected differ in where the mistake is
    if len(rejected) == num_rejected:
      break
  if not rejected:
    raise NoPerturbation("no single computation change reaches the final answer")
  return Gsm8kPairs(clean_solution(body, final), tuple(rejected), final, tuple(answers))


class _Chain:
  """The computations of a solution, in order: calculator annotations and written-out equations."""

  def __init__(self, body: str):
    self.body = body
    self.results: list[float] = []
    self.decimals: list[int] = []
    for match in _TOKEN.finditer(body):
      computation = _computation(match)
      if computation is not None:
        self.results.append(computation[1])
        self.decimals.append(_decimals(computation[2]))

  def rewrite(self, step: int, value: float, final: float) -> tuple[str, float | None]:
    """The body with computation `step` giving `value` and everything after it redone.

    Returns the new body and the new final answer (None if the final does not follow a
    computation).
    """
    latest: dict[float, int] = {}  # result value -> most recent computation giving it
    new: dict[int, float] = {}  # changed computations -> their new results
    out, position, index = [], 0, 0

    def substitute(match: re.Match) -> str:
      node = latest.get(_key(_to_float(match.group(0))))
      if node is None or node not in new:
        return match.group(0)
      return _format(new[node], match.group(0))

    for match in _TOKEN.finditer(self.body):
      out.append(self.body[position:match.start()])
      position = match.end()
      computation = _computation(match)
      if computation is None:
        out.append(substitute(match) if match.group(5) else match.group(0))
        continue
      expression, old, result_text = computation
      rewritten = _NUMBER_RE.sub(substitute, expression)
      if index == step:
        result = value
      elif rewritten != expression:
        result = _evaluate(rewritten)
      else:
        result = old
      if _key(result) != _key(old):
        new[index] = result
      latest[_key(old)] = index
      if match.group(1):
        out.append(f"<<{rewritten}={_format(result, result_text)}>>")
      else:
        out.append(f"{rewritten}{match.group(3)}{_format(result, result_text)}")
      index += 1
    out.append(self.body[position:])
    node = latest.get(_key(final))
    return "".join(out), (new[node] if node in new else None)


def _computation(match: re.Match) -> tuple[str, float, str] | None:
  """(expression, result, result text) of an annotation or a written-out equation, else None."""
  if match.group(1):
    expression, sep, result = match.group(1)[2:-2].rpartition("=")
    number = _FINAL.match(result)
    if not sep or not number:
      return None
    return expression, (-1.0 if number.group(1) else 1.0) * _to_float(number.group(2)), result
  if match.group(2):
    return match.group(2), _to_float(match.group(4)), match.group(4)
  return None


def _parse_final(final: str) -> float:
  match = _FINAL.match(final)
  if not match:
    raise ValueError(f"final answer {final!r} is not a number")
  return (-1.0 if match.group(1) else 1.0) * _to_float(match.group(2))


def _to_float(text: str) -> float:
  return float(text.replace(",", ""))


def _key(value: float) -> float:
  return round(value, 6)


def _decimals(text: str) -> int:
  digits = text.strip().partition(".")[2]
  return len(digits.rstrip())


def _format(value: float, like: str) -> str:
  """`value` written like the number it replaces (thousands separators kept)."""
  if abs(value - round(value)) < 1e-9:
    text = f"{int(round(value)):,}" if "," in like else str(int(round(value)))
  else:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
  return text


def _wrong_values(value: float, decimals: int, rng: random.Random) -> list[float]:
  """Plausible wrong results for a computation: small off-by-k slips of the same precision."""
  unit = 10.0 ** -decimals if decimals else 1.0
  scale = max(1, int(abs(value) / unit) // 10)
  offsets = [k * scale for k in range(1, 4)]
  candidates = [value + o * unit for o in offsets] + [value - o * unit for o in offsets]
  candidates = [round(c, decimals) for c in candidates if value < 0 or c > 0]
  rng.shuffle(candidates)
  return candidates[:_VALUES_PER_STEP]


def _evaluate(expression: str) -> float:
  """The value of an arithmetic expression (numbers, + - * / // % **, parentheses)."""
  text = re.sub(r"(?<=\d),(?=\d{3})", "", expression).replace("$", "")
  text = text.replace("x", "*").replace("×", "*").replace("^", "**")
  try:
    tree = ast.parse(" ".join(text.split()), mode="eval")
  except SyntaxError as e:
    raise ValueError(f"unsupported expression {expression!r}") from e

  def value(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
      return value(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
      return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
      return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
      left, right = value(node.left), value(node.right)
      if isinstance(node.op, ast.Pow) and abs(right) > 64:
        raise OverflowError("exponent too large")
      result = _OPERATORS[type(node.op)](left, right)
      if not math.isfinite(result):
        raise OverflowError("not finite")
      return result
    raise ValueError(f"unsupported expression {expression!r}")

  return value(tree)
