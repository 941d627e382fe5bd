"""`python -m codepmp_jax.synth`: synthesize code-preference pairs (see --help).

The flags become a `SynthSettings` and this calls `synthesize.synthesize` (or another stage).
Examples:
  python -m codepmp_jax.synth --source=stdlib --strategy=mutate --out=/tmp/pairs
  python -m codepmp_jax.synth --source=repo_dir,dump.jsonl.gz --strategy=llm \
      --base_url=http://localhost:8000 --out=/tmp/llm_pairs
  K workers (launch/synth_slurm.sbatch runs these as Slurm arrays):
  python -m codepmp_jax.synth --out=/tmp/pairs --num_shards=K --shard_index=i --stage=signatures
  python -m codepmp_jax.synth --out=/tmp/pairs --stage=dedup
  python -m codepmp_jax.synth --out=/tmp/pairs --num_shards=K --shard_index=i
  python -m codepmp_jax.synth --out=/tmp/pairs --merge
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from codepmp_jax.synth import backends
from codepmp_jax.synth import classify
from codepmp_jax.synth import merge
from codepmp_jax.synth.decontaminate import SETS
from codepmp_jax.synth.synthesize import (STRATEGIES, SynthSettings, dedup_workers, synthesize,
                                          write_signatures)

STAGES = ("pairs", "signatures", "dedup")
MODE_FLAGS = ("stage", "check", "merge", "log_level")
D = SynthSettings(out="-")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Shows defaults and keeps the examples' line breaks."""


def _csv(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


def parse_flags(argv: list[str] | None = None) -> argparse.Namespace:
  """The command-line flags (all documented in --help)."""
  p = argparse.ArgumentParser(
      prog="python -m codepmp_jax.synth", description=__doc__,
      formatter_class=_HelpFormatter)
  g = p.add_argument_group("run")
  g.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
  g.add_argument("--source", default=",".join(D.source),
                 help="comma-separated sources: 'stdlib', directories / git checkouts, "
                      ".jsonl/.jsonl.gz/.parquet dumps with a 'content' field")
  g.add_argument("--strategy", default=D.strategy, choices=STRATEGIES,
                 help="mutate: offline AST mutants; llm: the paper's describe + strong/weak answers; "
                      "human_vs_weak: real code vs the weak model's answer")
  g.add_argument("--max_pairs", type=int, default=D.max_pairs, help="stop after this many pairs (0: all)")
  g.add_argument("--shard_index", type=int, default=D.shard_index, help="this worker's part of the corpus")
  g.add_argument("--num_shards", type=int, default=D.num_shards,
                 help="number of independent workers; each writes OUT/part-XXXXX-of-YYYYY")
  g.add_argument("--docs_per_shard", type=int, default=D.docs_per_shard, help="documents per output shard")
  g.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                 help="processes for the corpus scan and the mutate strategy")
  g.add_argument("--seed", type=int, default=D.seed, help="seed of the mutation choices")
  g.add_argument("--stage", default="pairs", choices=STAGES,
                 help="pairs: synthesize; signatures: only this worker's MinHash bands (stage 1 of "
                      "a --num_shards run); dedup: only the keep-list across all workers (stage 2)")
  g.add_argument("--cross_worker_dedup", action=argparse.BooleanOptionalAction,
                 default=D.cross_worker_dedup,
                 help="with --num_shards > 1, remove near-duplicates across workers (needs the "
                      "signatures and dedup stages first); off: each worker dedups its own part")
  g.add_argument("--check", action="store_true", help="only verify the finished run in --out")
  g.add_argument("--merge", action="store_true",
                 help="only check and merge the part-* directories of a --num_shards run in --out")
  g.add_argument("--log_level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
  g = p.add_argument_group("corpus filters")
  d = D
  g.add_argument("--min_bytes", type=int, default=d.min_bytes, help="drop smaller files")
  g.add_argument("--max_bytes", type=int, default=d.max_bytes, help="drop larger files")
  g.add_argument("--max_line_length", type=int, default=d.max_line_length,
                 help="drop files with a longer line")
  g.add_argument("--max_mean_line_length", type=float, default=d.max_mean_line_length,
                 help="drop files with longer mean lines (minified)")
  g.add_argument("--min_alnum_fraction", type=float, default=d.min_alnum_fraction,
                 help="drop files with fewer alphanumeric characters")
  g.add_argument("--max_data_line_fraction", type=float, default=d.max_data_line_fraction,
                 help="drop files (20+ lines) whose lines are mostly literals only")
  g.add_argument("--languages", default="", help="comma-separated languages to keep ('': all)")
  g.add_argument("--licenses", default=",".join(D.licenses),
                 help="license allow-list for dumps that carry licenses ('any': no filter)")
  g.add_argument("--near_dup_threshold", type=float, default=D.near_dup_threshold,
                 help="MinHash Jaccard threshold for near duplicates (1.0: exact dedup only)")
  g.add_argument("--decontam_sets", default=",".join(D.decontam_sets),
                 help=f"evaluation sets to decontaminate against, from {SETS} ('': none)")
  g.add_argument("--decontam_files", default="", help="more files (text or JSONL) to decontaminate against")
  g.add_argument("--eval_data_dir", default=D.eval_data_dir, help="where gsm8k/ and logiqa2/ live ('': found by codepmp_jax.data.registry)")
  g.add_argument("--decontam_ngram", type=int, default=D.decontam_ngram, help="word n-gram length of the overlap test")
  g = p.add_argument_group("mutate strategy")
  m = D
  g.add_argument("--mutants_per_function", type=int, default=m.mutants_per_function,
                 help="pairs per documented function, spread over the operators")
  g.add_argument("--max_length_diff", type=float, default=m.max_length_diff,
                 help="drop mutants whose length differs from the original by more than this fraction")
  g.add_argument("--max_function_chars", type=int, default=m.max_function_chars,
                 help="skip longer functions")
  g.add_argument("--execution_check", action="store_true",
                 help="for documents with HumanEval-style test/entry_point fields, keep a mutant "
                      "only if the original passes the tests and the mutant fails them")
  g.add_argument("--exec_timeout_s", type=float, default=m.exec_timeout_s,
                 help="wall-clock limit of one sandboxed test run")
  g.add_argument("--exec_memory_mb", type=int, default=m.exec_memory_mb,
                 help="address-space limit of one sandboxed test run")
  g = p.add_argument_group("LLM strategies (llm, human_vs_weak)")
  g.add_argument("--backend", default=D.backend, choices=("openai", "jax"),
                 help="generation backend: an OpenAI-compatible server (vLLM, SGLang, TGI), or "
                      "'jax', the local JAX generator, for which the --*_model flags are checkpoint "
                      "paths (python -m codepmp_jax.convert makes them)")
  g.add_argument("--base_url", default=D.base_url, help="server for all three models")
  g.add_argument("--describe_base_url", default="", help="server of the description model ('': --base_url)")
  g.add_argument("--strong_base_url", default="", help="server of the strong model ('': --base_url)")
  g.add_argument("--weak_base_url", default="", help="server of the weak model ('': --base_url)")
  g.add_argument("--describe_model", default=D.describe_model,
                 help="writes the instruction for each snippet")
  g.add_argument("--strong_model", default=D.strong_model,
                 help="answers -> chosen (llm strategy)")
  g.add_argument("--weak_model", default=D.weak_model,
                 help="answers -> rejected")
  g.add_argument("--api", default=D.api, choices=("completions", "chat"),
                 help="/v1/completions (prompt verbatim) or /v1/chat/completions (one user message)")
  g.add_argument("--api_key_env", default=D.api_key_env,
                 help="environment variable holding the API key (never logged)")
  g.add_argument("--concurrency", type=int, default=D.concurrency, help="requests in flight per model")
  g.add_argument("--timeout_s", type=float, default=D.timeout_s, help="per-request timeout")
  g.add_argument("--max_retries", type=int, default=D.max_retries,
                 help="retries of a request after a timeout, dropped connection, 429 or 5xx")
  g.add_argument("--backoff_s", type=float, default=D.backoff_s, help="first retry delay; doubles per retry")
  g.add_argument("--describe_temperature", type=float, default=D.describe_temperature, help="paper: 0.7")
  g.add_argument("--describe_top_p", type=float, default=D.describe_top_p, help="paper: 1.0")
  g.add_argument("--describe_max_tokens", type=int, default=D.describe_max_tokens, help="paper: 1024")
  g.add_argument("--respond_temperature", type=float, default=D.respond_temperature,
                 help="sampling of the strong and weak answers")
  g.add_argument("--respond_top_p", type=float, default=D.respond_top_p, help="as above")
  g.add_argument("--respond_max_tokens", type=int, default=D.respond_max_tokens, help="as above")
  classify.add_flags(p)
  return p.parse_args(argv)


def settings_from_flags(args: argparse.Namespace) -> SynthSettings:
  """The settings the parsed flags describe (comma-separated lists become tuples)."""
  values = {k: v for k, v in vars(args).items() if k not in MODE_FLAGS}
  values["classify_ratios"] = classify.parse_ratios(values["classify_ratios"])
  for name in ("source", "languages", "decontam_sets", "decontam_files", "classify_types"):
    values[name] = tuple(_csv(values[name]))
  values["licenses"] = None if values["licenses"] == "any" else tuple(_csv(values["licenses"]))
  return SynthSettings(**values)


def main(argv: list[str] | None = None) -> int:
  args = parse_flags(argv)
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
  try:
    if args.merge:
      m = merge.merge(args.out)
      print(json.dumps({"merged_parts": m["merged_parts"], "counts": m["counts"]}, indent=1))
    elif args.check:
      m = merge.check_run(args.out)
      print(f"{args.out}: OK, {m['counts']['pairs_written']} pairs in {len(m['shards'])} shards")
    elif args.stage == "dedup":
      print(json.dumps(dedup_workers(args.out), indent=1))
    elif args.stage == "signatures":
      print(json.dumps(write_signatures(settings_from_flags(args)), indent=1))
    else:
      m = synthesize(settings_from_flags(args))
      print(json.dumps({"counts": m["counts"], "lengths": m["lengths"]}, indent=1))
  except (merge.CheckError, backends.BackendError, ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
