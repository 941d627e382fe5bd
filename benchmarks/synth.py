"""Throughput of the `mutate` strategy on the standard library, against the parse/unparse floor.

Peer: parsing every file and printing every documented function with `ast.unparse` (the least
work any AST-based mutator does). Then the strategy alone in-process, and the whole pipeline
(`synthesize`: filters, MinHash dedup, decontamination, shards) with 1 and 2 worker processes.

  python -m benchmarks.synth [--files=300] [--mutants_per_function=5]   (from the repo root)
"""
from __future__ import annotations

import argparse
import ast
import pathlib
import sys
import tempfile
import time

from codepmp_jax.synth import corpus
from codepmp_jax.synth import mutations
from codepmp_jax.synth import mutate_strategy
from codepmp_jax.synth.synthesize import SynthSettings, synthesize


def _floor(docs: list[corpus.Document]) -> int:
  functions = 0
  for doc in docs:
    try:
      fns, _ = mutations.extract_functions(doc.content)
    except (SyntaxError, ValueError, RecursionError):
      continue
    for fn in fns:
      ast.unparse(ast.parse(fn.code))
      functions += 1
  return functions


def _strategy(docs: list[corpus.Document], k: int) -> int:
  cfg = mutate_strategy.MutateConfig(mutants_per_function=k)
  return sum(len(mutate_strategy.document_pairs(d, cfg)[0]) for d in docs)


def _cli(root: pathlib.Path, workers: int, k: int, data_dir: str) -> int:
  with tempfile.TemporaryDirectory() as out:
    manifest = synthesize(SynthSettings(out=out, source=(str(root),), workers=workers,
                                        mutants_per_function=k, eval_data_dir=data_dir))
  return manifest["counts"]["pairs_written"]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--files", type=int, default=300, help="first N stdlib .py files (0: all)")
  p.add_argument("--mutants_per_function", type=int, default=5)
  p.add_argument("--eval_data_dir", default="")
  args = p.parse_args()
  docs = [d for d in corpus.iter_documents("stdlib") if d.lang == "python" and d.error is None]
  docs = docs[:args.files] if args.files else docs
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp) / "stdlib_subset"
    for doc in docs:
      path = root / doc.source_id.removeprefix("stdlib/")
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(doc.content)
    rows = []
    for name, fn, unit in [
        ("parse + unparse floor (peer)", lambda: _floor(docs), "functions"),
        ("mutate strategy, in-process", lambda: _strategy(docs, args.mutants_per_function), "pairs"),
        ("synthesize, workers=1", lambda: _cli(root, 1, args.mutants_per_function, args.eval_data_dir), "pairs"),
        ("synthesize, workers=2", lambda: _cli(root, 2, args.mutants_per_function, args.eval_data_dir), "pairs")]:
      start = time.perf_counter()
      n = fn()
      rows.append((name, n, unit, time.perf_counter() - start))
  print(f"{len(docs)} stdlib files, {args.mutants_per_function} mutants per function, "
        f"python {sys.version.split()[0]}")
  print(f"| {'stage':32} | {'items':>8} | {'unit':9} | {'seconds':>8} | {'items/s':>8} |")
  print(f"|{'-' * 34}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
  for name, n, unit, s in rows:
    print(f"| {name:32} | {n:8d} | {unit:9} | {s:8.2f} | {n / s:8.1f} |")
  rate = [n / sec for _, n, _, sec in rows]
  print(f"ratio: mutate strategy {rate[1] / rate[0]:.2f}x the floor's rate (pairs/s vs functions/s); "
        f"synthesize with 2 workers {rate[3] / rate[2]:.2f}x the pairs/s of 1 worker")


if __name__ == "__main__":
  main()
