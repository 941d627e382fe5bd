r"""`python -m codepmp_jax.synth`: synthesize code-preference pairs (see --help).

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

import dataclasses
import json
import logging
import os
from typing import Any

from absl import flags

from codepmp_jax import cli
from codepmp_jax.data import registry
from codepmp_jax.synth import backends
from codepmp_jax.synth import classify
from codepmp_jax.synth import merge
from codepmp_jax.synth.decontaminate import SETS
from codepmp_jax.synth.synthesize import (STRATEGIES, SynthSettings, dedup_workers, synthesize,
                                          write_signatures)

STAGES = ("pairs", "signatures", "dedup")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
D = SynthSettings(out="-")


def _csv(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags (all documented in --help); defined only when run as a program."""
  def string(name: str, default: str | None, help: str) -> None:
    flags.DEFINE_string(name, default, help, flag_values=values)

  def integer(name: str, default: int, help: str) -> None:
    flags.DEFINE_integer(name, default, help, flag_values=values)

  def real(name: str, default: float, help: str) -> None:
    flags.DEFINE_float(name, default, help, flag_values=values)

  def boolean(name: str, default: bool, help: str) -> None:
    flags.DEFINE_bool(name, default, help, flag_values=values)

  def enum(name: str, default: str, choices: tuple[str, ...], help: str) -> None:
    flags.DEFINE_enum(name, default, choices, help, flag_values=values, case_sensitive=False)

  # Run.
  string("out", default=None, help="output directory (shards + manifest.json)")
  string("source", default=",".join(D.source),
         help="comma-separated sources: 'stdlib', directories / git checkouts, "
              ".jsonl/.jsonl.gz/.parquet dumps with a 'content' field")
  enum("strategy", default=D.strategy, choices=STRATEGIES,
       help="mutate: offline AST mutants; llm: the paper's describe + strong/weak answers; "
            "human_vs_weak: real code vs the weak model's answer")
  integer("max_pairs", default=D.max_pairs, help="stop after this many pairs (0: all)")
  integer("shard_index", default=D.shard_index, help="this worker's part of the corpus")
  integer("num_shards", default=D.num_shards,
          help="number of independent workers; each writes OUT/part-XXXXX-of-YYYYY")
  integer("docs_per_shard", default=D.docs_per_shard, help="documents per output shard")
  integer("workers", default=min(2, os.cpu_count() or 1),
          help="processes for the corpus scan and the mutate strategy")
  integer("seed", default=D.seed, help="seed of the mutation choices")
  enum("stage", default="pairs", choices=STAGES,
       help="pairs: synthesize; signatures: only this worker's MinHash bands (stage 1 of "
            "a --num_shards run); dedup: only the keep-list across all workers (stage 2)")
  boolean("cross_worker_dedup", default=D.cross_worker_dedup,
          help="with --num_shards > 1, remove near-duplicates across workers (needs the "
               "signatures and dedup stages first); off: each worker dedups its own part")
  boolean("check", default=False, help="only verify the finished run in --out")
  boolean("merge", default=False,
          help="only check and merge the part-* directories of a --num_shards run in --out")
  enum("log_level", default="INFO", choices=LOG_LEVELS,
       help="level of the progress log lines (shown with --verbose; without it only warnings "
            "and errors)")
  # Corpus filters.
  integer("min_bytes", default=D.min_bytes, help="drop smaller files")
  integer("max_bytes", default=D.max_bytes, help="drop larger files")
  integer("max_line_length", default=D.max_line_length,
          help="drop files with a longer line")
  real("max_mean_line_length", default=D.max_mean_line_length,
       help="drop files with longer mean lines (minified)")
  real("min_alnum_fraction", default=D.min_alnum_fraction,
       help="drop files with fewer alphanumeric characters")
  real("max_data_line_fraction", default=D.max_data_line_fraction,
       help="drop files (20+ lines) whose lines are mostly literals only")
  string("languages", default="", help="comma-separated languages to keep ('': all)")
  string("licenses", default=",".join(D.licenses),
         help="license allow-list for dumps that carry licenses ('any': no filter)")
  real("near_dup_threshold", default=D.near_dup_threshold,
       help="MinHash Jaccard threshold for near duplicates (1.0: exact dedup only)")
  string("decontam_sets", default=",".join(D.decontam_sets),
         help=f"evaluation sets to decontaminate against, from {SETS} ('': none)")
  string("decontam_files", default="", help="more files (text or JSONL) to decontaminate against")
  string("eval_data_dir", default=D.eval_data_dir, help="where gsm8k/ and logiqa2/ live ('': found by codepmp_jax.data.registry)")
  integer("decontam_ngram", default=D.decontam_ngram, help="word n-gram length of the overlap test")
  # Mutate strategy.
  integer("mutants_per_function", default=D.mutants_per_function,
          help="pairs per documented function, spread over the operators")
  real("max_length_diff", default=D.max_length_diff,
       help="drop mutants whose length differs from the original by more than this fraction")
  integer("max_function_chars", default=D.max_function_chars,
          help="skip longer functions")
  boolean("execution_check", default=False,
          help="for documents with HumanEval-style test/entry_point fields, keep a mutant "
               "only if the original passes the tests and the mutant fails them")
  real("exec_timeout_s", default=D.exec_timeout_s,
       help="wall-clock limit of one sandboxed test run")
  integer("exec_memory_mb", default=D.exec_memory_mb,
          help="address-space limit of one sandboxed test run")
  # LLM strategies (llm, human_vs_weak).
  enum("backend", default=D.backend, choices=("openai", "jax"),
       help="generation backend: an OpenAI-compatible server (vLLM, SGLang, TGI), or "
            "'jax', the local JAX generator, for which the --*_model flags are checkpoint "
            "paths (python -m codepmp_jax.convert makes them)")
  string("base_url", default=D.base_url, help="server for all three models")
  string("describe_base_url", default="", help="server of the description model ('': --base_url)")
  string("strong_base_url", default="", help="server of the strong model ('': --base_url)")
  string("weak_base_url", default="", help="server of the weak model ('': --base_url)")
  string("describe_model", default=D.describe_model,
         help="writes the instruction for each snippet")
  string("strong_model", default=D.strong_model,
         help="answers -> chosen (llm strategy)")
  string("weak_model", default=D.weak_model,
         help="answers -> rejected")
  enum("api", default=D.api, choices=("completions", "chat"),
       help="/v1/completions (prompt verbatim) or /v1/chat/completions (one user message)")
  string("api_key_env", default=D.api_key_env,
         help="environment variable holding the API key (never logged)")
  integer("concurrency", default=D.concurrency, help="requests in flight per model")
  real("timeout_s", default=D.timeout_s, help="per-request timeout")
  integer("max_retries", default=D.max_retries,
          help="retries of a request after a timeout, dropped connection, 429 or 5xx")
  real("backoff_s", default=D.backoff_s, help="first retry delay; doubles per retry")
  real("describe_temperature", default=D.describe_temperature, help="paper: 0.7")
  real("describe_top_p", default=D.describe_top_p, help="paper: 1.0")
  integer("describe_max_tokens", default=D.describe_max_tokens, help="paper: 1024")
  real("respond_temperature", default=D.respond_temperature,
       help="sampling of the strong and weak answers")
  real("respond_top_p", default=D.respond_top_p, help="as above")
  integer("respond_max_tokens", default=D.respond_max_tokens, help="as above")
  # Type classification (optional stage, before the strategy; off unless --classify_model).
  c = classify.ClassifySettings()
  string("classify_model", default="",
         help="classifier model (released: Qwen2-1.5B); '' skips the stage")
  string("classify_base_url", default="", help="its server ('': --base_url)")
  string("classify_types", default=",".join(c.types), help=f"types kept, from {classify.TYPES}")
  real("classify_min_confidence", default=c.min_confidence,
       help="drop files labelled with a lower confidence")
  string("classify_ratios", default=",".join(f"{t}:{r:g}" for t, r in c.ratios),
         help="fraction of each type kept, e.g. engineering:1,non-engineering:0.3")
  flags.mark_flag_as_required("out", flag_values=values)


def settings_from_flags(values: flags.FlagValues) -> SynthSettings:
  """The settings the parsed flags describe (comma-separated lists become tuples)."""
  settings: dict[str, Any] = {f.name: values[f.name].value for f in dataclasses.fields(SynthSettings)}
  settings["classify_ratios"] = classify.parse_ratios(settings["classify_ratios"])
  for name in ("source", "languages", "decontam_sets", "decontam_files", "classify_types"):
    settings[name] = tuple(_csv(settings[name]))
  settings["licenses"] = None if settings["licenses"] == "any" else tuple(_csv(settings["licenses"]))
  return SynthSettings(**settings)


def main(argv: list[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """Runs the mode the flags select (--merge, --check, --stage) and prints its counts as JSON."""
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]} (flags are --name=value; --help for usage)")
  logging.getLogger().setLevel(values.log_level.upper())
  try:
    if values.merge:
      m = merge.merge(values.out)
      print(json.dumps({"merged_parts": m["merged_parts"], "counts": m["counts"]}, indent=1))
    elif values.check:
      m = merge.check_run(values.out)
      print(f"{values.out}: OK, {m['counts']['pairs_written']} pairs in {len(m['shards'])} shards")
    elif values.stage == "dedup":
      print(json.dumps(dedup_workers(values.out), indent=1))
    elif values.stage == "signatures":
      print(json.dumps(write_signatures(settings_from_flags(values)), indent=1))
    else:
      m = synthesize(settings_from_flags(values))
      print(json.dumps({"counts": m["counts"], "lengths": m["lengths"]}, indent=1))
  except backends.BackendError as e:  # a server that cannot be reached: the user's to fix
    raise ValueError(str(e)) from e
  except registry.DataNotFound as e:  # the evaluation test sets that decontamination reads
    raise FileNotFoundError(
        f"synth decontaminates its pairs against the evaluation test sets (--decontam_sets="
        f"{values.decontam_sets}), every strategy, offline ones too: "
        + str(e).replace("--data_dir=DIR (or CODEPMP_DATA=DIR)", "--eval_data_dir=DIR (or CODEPMP_DATA=DIR)")
        + "; or --decontam_sets= to skip decontamination") from None


if __name__ == "__main__":
  cli.run(main, define_flags)
