"""`python -m codepmp_jax.synth`: synthesize code-preference pairs (see --help).

Examples:
  python -m codepmp_jax.synth --source=stdlib --strategy=mutate --out=/tmp/pairs
  python -m codepmp_jax.synth --source=repo_dir,dump.jsonl.gz --strategy=llm \
      --base_url=http://localhost:8000 --out=/tmp/llm_pairs
  python -m codepmp_jax.synth --out=/tmp/pairs --merge     # after --num_shards workers
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time

from codepmp_jax.synth import backends
from codepmp_jax.synth import classify
from codepmp_jax.synth import filters
from codepmp_jax.synth import llm_strategy
from codepmp_jax.synth import merge
from codepmp_jax.synth import mutate_strategy
from codepmp_jax.synth import pipeline
from codepmp_jax.synth import prompts
from codepmp_jax.synth import writer as writer_lib
from codepmp_jax.synth.decontaminate import SETS

STRATEGIES = ("mutate",) + llm_strategy.STRATEGIES
# Flags that do not change what is written (a resumed run may change them).
RUNTIME_FLAGS = {"out", "max_pairs", "workers", "check", "merge", "log_level", "concurrency",
                 "timeout_s", "max_retries", "backoff_s", "api_key_env", "base_url",
                 "describe_base_url", "strong_base_url", "weak_base_url", "classify_base_url"}


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
  g.add_argument("--source", default="stdlib",
                 help="comma-separated sources: 'stdlib', directories / git checkouts, "
                      ".jsonl/.jsonl.gz/.parquet dumps with a 'content' field")
  g.add_argument("--strategy", default="mutate", choices=STRATEGIES,
                 help="mutate: offline AST mutants; llm: the paper's describe + strong/weak answers; "
                      "human_vs_weak: real code vs the weak model's answer")
  g.add_argument("--max_pairs", type=int, default=0, help="stop after this many pairs (0: all)")
  g.add_argument("--shard_index", type=int, default=0, help="this worker's part of the corpus")
  g.add_argument("--num_shards", type=int, default=1,
                 help="number of independent workers; each writes OUT/part-XXXXX-of-YYYYY")
  g.add_argument("--docs_per_shard", type=int, default=32, help="documents per output shard")
  g.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                 help="processes for the corpus scan and the mutate strategy")
  g.add_argument("--seed", type=int, default=0, help="seed of the mutation choices")
  g.add_argument("--check", action="store_true", help="only verify the finished run in --out")
  g.add_argument("--merge", action="store_true",
                 help="only check and merge the part-* directories of a --num_shards run in --out")
  g.add_argument("--log_level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
  g = p.add_argument_group("corpus filters")
  d = filters.FilterConfig()
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
  g.add_argument("--licenses", default=",".join(filters.PERMISSIVE_LICENSES),
                 help="license allow-list for dumps that carry licenses ('any': no filter)")
  g.add_argument("--near_dup_threshold", type=float, default=0.85,
                 help="MinHash Jaccard threshold for near duplicates (1.0: exact dedup only)")
  g.add_argument("--decontam_sets", default=",".join(SETS),
                 help=f"evaluation sets to decontaminate against, from {SETS} ('': none)")
  g.add_argument("--decontam_files", default="", help="more files (text or JSONL) to decontaminate against")
  g.add_argument("--eval_data_dir", default="../shared/data", help="where gsm8k/ and logiqa2/ live")
  g.add_argument("--decontam_ngram", type=int, default=13, help="word n-gram length of the overlap test")
  g = p.add_argument_group("mutate strategy")
  m = mutate_strategy.MutateConfig()
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
  g.add_argument("--backend", default="openai", choices=("openai", "jax"),
                 help="generation backend: an OpenAI-compatible server (vLLM, SGLang, TGI), or "
                      "'jax', the local JAX generator, for which the --*_model flags are checkpoint "
                      "paths (python -m codepmp_jax.convert makes them)")
  g.add_argument("--base_url", default="http://localhost:8000", help="server for all three models")
  g.add_argument("--describe_base_url", default="", help="server of the description model ('': --base_url)")
  g.add_argument("--strong_base_url", default="", help="server of the strong model ('': --base_url)")
  g.add_argument("--weak_base_url", default="", help="server of the weak model ('': --base_url)")
  g.add_argument("--describe_model", default="deepseek-ai/deepseek-coder-1.3b-instruct",
                 help="writes the instruction for each snippet")
  g.add_argument("--strong_model", default="deepseek-ai/deepseek-coder-6.7b-instruct",
                 help="answers -> chosen (llm strategy)")
  g.add_argument("--weak_model", default="deepseek-ai/deepseek-coder-1.3b-instruct",
                 help="answers -> rejected")
  g.add_argument("--api", default="completions", choices=("completions", "chat"),
                 help="/v1/completions (prompt verbatim) or /v1/chat/completions (one user message)")
  g.add_argument("--api_key_env", default="OPENAI_API_KEY",
                 help="environment variable holding the API key (never logged)")
  g.add_argument("--concurrency", type=int, default=8, help="requests in flight per model")
  g.add_argument("--timeout_s", type=float, default=120.0, help="per-request timeout")
  g.add_argument("--max_retries", type=int, default=5,
                 help="retries of a request after a timeout, dropped connection, 429 or 5xx")
  g.add_argument("--backoff_s", type=float, default=1.0, help="first retry delay; doubles per retry")
  s = prompts.DESCRIBE_SAMPLING
  g.add_argument("--describe_temperature", type=float, default=s["temperature"], help="paper: 0.7")
  g.add_argument("--describe_top_p", type=float, default=s["top_p"], help="paper: 1.0")
  g.add_argument("--describe_max_tokens", type=int, default=s["max_tokens"], help="paper: 1024")
  g.add_argument("--respond_temperature", type=float, default=s["temperature"],
                 help="sampling of the strong and weak answers")
  g.add_argument("--respond_top_p", type=float, default=s["top_p"], help="as above")
  g.add_argument("--respond_max_tokens", type=int, default=s["max_tokens"], help="as above")
  classify.add_flags(p)
  args = p.parse_args(argv)
  if not 0 <= args.shard_index < args.num_shards:
    p.error(f"--shard_index={args.shard_index} must be in [0, --num_shards={args.num_shards})")
  if args.docs_per_shard < 1 or args.max_pairs < 0:
    p.error("--docs_per_shard must be >= 1 and --max_pairs >= 0")
  return args


def _backend(args: argparse.Namespace, model: str, url: str) -> backends.Backend:
  if args.backend == "jax":
    from codepmp_jax.synth.jax_backend import JaxBackend  # imports jax only when asked for
    return JaxBackend.from_checkpoint(model)
  b = backends.OpenAIBackend(url or args.base_url, model, args.api, args.api_key_env,
                             args.concurrency, args.timeout_s, args.max_retries, args.backoff_s)
  b.check()
  return b


def run(args: argparse.Namespace) -> dict:
  """One worker's synthesis run; returns its manifest."""
  start = time.time()
  settings = {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_FLAGS}
  licenses = None if args.licenses == "any" else tuple(x.lower() for x in _csv(args.licenses))
  filter_cfg = filters.FilterConfig(
      args.min_bytes, args.max_bytes, args.max_line_length, args.max_mean_line_length,
      args.min_alnum_fraction, args.max_data_line_fraction, languages=tuple(_csv(args.languages)),
      licenses=licenses)
  mutate_cfg = mutate_strategy.MutateConfig(
      args.mutants_per_function, args.max_length_diff, args.max_function_chars, args.seed,
      args.execution_check, args.exec_timeout_s, args.exec_memory_mb)
  decontaminator = pipeline.load_decontaminator(
      _csv(args.decontam_sets), _csv(args.decontam_files), args.eval_data_dir, args.decontam_ngram)
  state = {"filters": filter_cfg, "decontaminator": decontaminator, "mutate": mutate_cfg,
           "near_dup_threshold": args.near_dup_threshold}
  models, used_backends = None, []
  with pipeline.worker_pool(args.workers, state) as pmap:
    docs, corpus_counts, sources, examples = pipeline.collect_documents(
        _csv(args.source), args.shard_index, args.num_shards, pmap, args.near_dup_threshold)
    classify_counts = None
    if args.classify_model:
      classifier = _backend(args, args.classify_model, args.classify_base_url)
      used_backends.append(classifier)
      docs, classify_counts = classify.select(docs, classifier, classify.settings_from_flags(args))
    chunks = [docs[i:i + args.docs_per_shard] for i in range(0, len(docs), args.docs_per_shard)]
    out = pipeline.output_dir(args.out, args.shard_index, args.num_shards)
    writer = writer_lib.ShardWriter(out, settings, len(chunks))
    writer.check_sources(sources)
    base = {"complete": False, "strategy": args.strategy, "prompts": prompts.prompt_texts(),
            "sources": sources, "planned_shards": len(chunks)}
    writer.write_manifest(base)
    if args.strategy == "mutate":
      compute = pipeline.mutate_compute(chunks, pmap)
    else:
      describer = _backend(args, args.describe_model, args.describe_base_url)
      weak = _backend(args, args.weak_model, args.weak_base_url)
      strong = _backend(args, args.strong_model, args.strong_base_url) if args.strategy == "llm" else None
      used_backends += [b for b in (describer, strong, weak) if b is not None]
      models = {"describe": describer.name, "strong": strong.name if strong else "human",
                "weak": weak.name}
      describe = llm_strategy.Sampling(args.describe_temperature, args.describe_top_p,
                                       args.describe_max_tokens)
      respond = llm_strategy.Sampling(args.respond_temperature, args.respond_top_p,
                                      args.respond_max_tokens)

      def compute(pending):
        for k in pending:
          records, counts = llm_strategy.shard_pairs(chunks[k], args.strategy, describer, strong,
                                                     weak, describe, respond, decontaminator)
          yield k, records, counts

    used = pipeline.write_shards(writer, chunks, compute, args.max_pairs)
  strategy_counts, lengths = pipeline.summarize(used)
  length_sums = {}
  for s in used:
    for key, v in s["lengths"].items():
      length_sums[key] = length_sums.get(key, 0) + v
  elapsed = time.time() - start
  pairs = strategy_counts.pop("pairs_written")
  manifest = {
      **base, "complete": True, "models": models,
      "sampling": None if models is None else {
          "describe": describe.kwargs(), "respond": respond.kwargs()},
      "counts": {"corpus": corpus_counts, "classify": classify_counts, "strategy": strategy_counts,
                 "pairs_written": pairs},
      "lengths": lengths, "length_sums": length_sums, "bad_input_examples": examples,
      "backend_requests": {b.name: dict(b.stats) for b in used_backends},
      "shards": [{k: s[k] for k in ("file", "records", "available", "sha256")} for s in used],
      "elapsed_s": round(elapsed, 1)}
  path = writer.write_manifest(manifest)
  logging.info("wrote %d pairs in %d shards to %s in %.1f s (%.1f pairs/s); manifest %s",
               pairs, len(used), out, elapsed, pairs / max(elapsed, 1e-9), path)
  return manifest


def main(argv: list[str] | None = None) -> int:
  args = parse_flags(argv)
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
  try:
    if args.merge:
      m = merge.merge(pathlib.Path(args.out))
      print(json.dumps({"merged_parts": m["merged_parts"], "counts": m["counts"]}, indent=1))
    elif args.check:
      m = merge.check_run(pathlib.Path(args.out))
      print(f"{args.out}: OK, {m['counts']['pairs_written']} pairs in {len(m['shards'])} shards")
    else:
      m = run(args)
      print(json.dumps({"counts": m["counts"], "lengths": m["lengths"]}, indent=1))
  except (merge.CheckError, backends.BackendError, ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
