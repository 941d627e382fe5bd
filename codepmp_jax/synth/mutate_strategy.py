"""Documents -> `mutate` pair records, with counts, optionally confirmed by running tests.

With `execution_check`, documents that carry HumanEval-style `test`/`entry_point` fields only
yield pairs for the entry point, and only when the original passes its tests and the mutant fails
them (a surviving mutant may be semantically equivalent, so it is dropped and counted).
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import random

from codepmp_jax.synth import execution
from codepmp_jax.synth import mutations
from codepmp_jax.synth import prompts
from codepmp_jax.synth.corpus import Document


@dataclasses.dataclass(frozen=True)
class MutateConfig:
  """Settings of the `mutate` strategy."""
  mutants_per_function: int = 5
  max_length_diff: float = 0.15
  max_function_chars: int = 4000
  seed: int = 0
  execution_check: bool = False
  exec_timeout_s: float = 10.0
  exec_memory_mb: int = 512


def document_pairs(doc: Document, cfg: MutateConfig) -> tuple[list[dict], collections.Counter]:
  """The pair records of one Python document, in a fixed order, and what happened to its functions."""
  counts = collections.Counter()
  if doc.lang != "python":
    counts["not_python"] += 1
    return [], counts
  try:
    functions, found = mutations.extract_functions(doc.content)
  except (SyntaxError, ValueError, RecursionError):
    counts["syntax_error"] += 1
    return [], counts
  counts.update(found)
  tests = doc.extra.get("test") if cfg.execution_check else None
  records, balance = [], 0
  for fn in functions:
    if tests is not None and fn.qualname != doc.extra.get("entry_point"):
      continue
    if len(fn.code) > cfg.max_function_chars:
      counts["function_too_long"] += 1
      continue
    counts["functions_used"] += 1
    rng = random.Random(f"{cfg.seed}:{doc.source_id}:{fn.qualname}")
    picked, balance = mutations.mutants(fn, cfg.mutants_per_function, rng, cfg.max_length_diff, counts,
                                     balance)
    for m in picked:
      if tests is not None and not _killed_by_tests(doc, fn, m, cfg, counts):
        continue
      counts[f"operator_{m.site.op}"] += 1
      records.append({
          "prompt": prompts.code_prompt(fn.description), "chosen": fn.code, "rejected": m.code,
          "id": mutations.pair_id(doc.source_id, fn.qualname, m.site),
          "meta": {"strategy": "mutate", "source": doc.source_id, "function": fn.qualname,
                   "operator": m.site.op, "lang": "python"}})
  return records, counts


def _module_with(doc: Document, name: str, code: str) -> str:
  """The document's module with top-level function `name` replaced by `code`."""
  tree = ast.parse(doc.content)
  replacement = ast.parse(code).body[0]
  tree.body = [replacement if getattr(s, "name", None) == name else s for s in tree.body]
  return ast.unparse(tree)


def _killed_by_tests(doc: Document, fn: mutations.Function, m: mutations.Mutant, cfg: MutateConfig,
                     counts: collections.Counter) -> bool:
  """Whether the original passes the document's tests and the mutant fails them (counted)."""
  limits = {"timeout_s": cfg.exec_timeout_s, "memory_mb": cfg.exec_memory_mb}
  entry, test = doc.extra["entry_point"], doc.extra["test"]
  if not execution.check_solution(_module_with(doc, fn.qualname, fn.code), test, entry, **limits).passed:
    counts["exec_original_failed"] += 1
    return False
  if execution.check_solution(_module_with(doc, fn.qualname, m.code), test, entry, **limits).passed:
    counts["exec_mutant_survived"] += 1
    return False
  counts["exec_mutant_killed"] += 1
  return True
