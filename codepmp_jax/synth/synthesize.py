"""Synthesis as library calls: `synthesize(SynthSettings(...))` and the stages of a many-worker run.

One worker (`num_shards=1`):   synthesize(settings)
`K` workers (a Slurm array, `launch/synth_slurm.sbatch`), near-duplicates removed across workers:
  1. write_signatures(settings with shard_index=i)   every i: MinHash band hashes of its documents
  2. dedup_workers(out)                              once: one keep-list across all workers
  3. synthesize(settings with shard_index=i)         every i: pairs from its kept documents only
  4. merge.merge(out)                                once: check every part, one manifest
Each stage is resumable: its outputs are written atomically and a rerun skips what is complete.
`cross_worker_dedup=False` skips stages 1-2 (each worker then deduplicates only its own part).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np
from etils import epath

from codepmp_jax.synth import backends
from codepmp_jax.synth import classify
from codepmp_jax.synth import dedup
from codepmp_jax.synth import filters
from codepmp_jax.synth import llm_strategy
from codepmp_jax.synth import mutate_strategy
from codepmp_jax.synth import prompts
from codepmp_jax.synth import workers
from codepmp_jax.synth import writer as writer_lib
from codepmp_jax.synth.decontaminate import SETS

STRATEGIES = ("mutate",) + llm_strategy.STRATEGIES
SIGNATURES = "signatures.npz"
DEDUP_DIR = "dedup"
DEDUP_SUMMARY = "summary.json"
_FILTERS = filters.FilterConfig()
_MUTATE = mutate_strategy.MutateConfig()
_SAMPLING = prompts.DESCRIBE_SAMPLING


@dataclasses.dataclass(frozen=True)
class SynthSettings:
  """Everything a synthesis worker does (the CLI flags of `python -m codepmp_jax.synth`, same names).

  Fields in `RUNTIME_FIELDS` may change between a run and its resumption; the rest decide the output.
  """
  out: str
  source: tuple[str, ...] = ("stdlib",)
  strategy: str = "mutate"
  max_pairs: int = 0
  shard_index: int = 0
  num_shards: int = 1
  docs_per_shard: int = 32
  workers: int = 1
  seed: int = 0
  cross_worker_dedup: bool = True
  # corpus filters
  min_bytes: int = _FILTERS.min_bytes
  max_bytes: int = _FILTERS.max_bytes
  max_line_length: int = _FILTERS.max_line_length
  max_mean_line_length: float = _FILTERS.max_mean_line_length
  min_alnum_fraction: float = _FILTERS.min_alnum_fraction
  max_data_line_fraction: float = _FILTERS.max_data_line_fraction
  languages: tuple[str, ...] = ()
  licenses: tuple[str, ...] | None = filters.PERMISSIVE_LICENSES  # None: no license filter
  near_dup_threshold: float = 0.85
  decontam_sets: tuple[str, ...] = SETS
  decontam_files: tuple[str, ...] = ()
  eval_data_dir: str = ""  # "": the data registry's search order
  decontam_ngram: int = 13
  # mutate strategy
  mutants_per_function: int = _MUTATE.mutants_per_function
  max_length_diff: float = _MUTATE.max_length_diff
  max_function_chars: int = _MUTATE.max_function_chars
  execution_check: bool = False
  exec_timeout_s: float = _MUTATE.exec_timeout_s
  exec_memory_mb: int = _MUTATE.exec_memory_mb
  # LLM strategies
  backend: str = "openai"
  base_url: str = "http://localhost:8000"
  describe_base_url: str = ""
  strong_base_url: str = ""
  weak_base_url: str = ""
  describe_model: str = "deepseek-ai/deepseek-coder-1.3b-instruct"
  strong_model: str = "deepseek-ai/deepseek-coder-6.7b-instruct"
  weak_model: str = "deepseek-ai/deepseek-coder-1.3b-instruct"
  api: str = "completions"
  api_key_env: str = "OPENAI_API_KEY"
  concurrency: int = 8
  timeout_s: float = 120.0
  max_retries: int = 5
  backoff_s: float = 1.0
  describe_temperature: float = _SAMPLING["temperature"]
  describe_top_p: float = _SAMPLING["top_p"]
  describe_max_tokens: int = _SAMPLING["max_tokens"]
  respond_temperature: float = _SAMPLING["temperature"]
  respond_top_p: float = _SAMPLING["top_p"]
  respond_max_tokens: int = _SAMPLING["max_tokens"]
  # optional type-classification stage (released recipe; off while classify_model is "")
  classify_model: str = ""
  classify_base_url: str = ""
  classify_types: tuple[str, ...] = classify.TYPES
  classify_min_confidence: float = 0.0
  classify_ratios: tuple[tuple[str, float], ...] = classify.ClassifySettings().ratios

  def __post_init__(self):
    if not self.out:
      raise ValueError("SynthSettings.out (--out) is required")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
    if not 0 <= self.shard_index < self.num_shards:
      raise ValueError(f"shard_index={self.shard_index} must be in [0, num_shards={self.num_shards})")
    if self.docs_per_shard < 1 or self.max_pairs < 0:
      raise ValueError("docs_per_shard must be >= 1 and max_pairs >= 0")


RUNTIME_FIELDS = {"out", "max_pairs", "workers", "concurrency", "timeout_s", "max_retries",
                  "backoff_s", "api_key_env", "base_url", "describe_base_url", "strong_base_url",
                  "weak_base_url", "classify_base_url"}


def content_settings(settings: SynthSettings) -> dict:
  """The fields that decide the output, as JSON values (what the manifests record and hash)."""
  fields = dataclasses.asdict(settings)
  return json.loads(json.dumps({k: fields[k] for k in sorted(fields) if k not in RUNTIME_FIELDS}))


def _shared_hash(settings: SynthSettings) -> str:
  """The fingerprint every worker of one run shares (the settings but `shard_index`)."""
  return writer_lib.settings_hash({**content_settings(settings), "shard_index": None})


def _cross_dedup(settings: SynthSettings) -> bool:
  return settings.num_shards > 1 and settings.cross_worker_dedup


def _scan_state(settings: SynthSettings) -> dict:
  filter_cfg = filters.FilterConfig(
      settings.min_bytes, settings.max_bytes, settings.max_line_length,
      settings.max_mean_line_length, settings.min_alnum_fraction, settings.max_data_line_fraction,
      languages=tuple(settings.languages),
      licenses=None if settings.licenses is None else tuple(x.lower() for x in settings.licenses))
  mutate_cfg = mutate_strategy.MutateConfig(
      settings.mutants_per_function, settings.max_length_diff, settings.max_function_chars,
      settings.seed, settings.execution_check, settings.exec_timeout_s, settings.exec_memory_mb)
  decontaminator = workers.load_decontaminator(
      list(settings.decontam_sets), list(settings.decontam_files), settings.eval_data_dir,
      settings.decontam_ngram)
  return {"filters": filter_cfg, "decontaminator": decontaminator, "mutate": mutate_cfg,
          "near_dup_threshold": settings.near_dup_threshold}


def write_signatures(settings: SynthSettings) -> dict:
  """Stage 1 of a many-worker run: this worker's kept documents and their LSH band hashes, in
  `<part>/signatures.npz` (skipped when already there for the same settings); returns its summary."""
  part = workers.output_dir(settings.out, settings.shard_index, settings.num_shards)
  path = part / SIGNATURES
  if path.exists():
    with path.open("rb") as f:
      data = np.load(f)
      if str(data["settings_hash"]) == _shared_hash(settings):
        return {"file": str(path), "documents": len(data["sha256"])}
    raise ValueError(f"{path}: written with other settings; use another --out or delete it")
  with workers.worker_pool(settings.workers, _scan_state(settings)) as pmap:
    docs, _, _, _, signatures = workers.collect_documents(
        list(settings.source), settings.shard_index, settings.num_shards, pmap,
        settings.near_dup_threshold)
  bands, rows = (dedup.lsh_layout(settings.near_dup_threshold) if settings.near_dup_threshold < 1
                 else (0, 0))
  band_array = np.zeros((len(docs), bands), np.uint64)
  for i, (_, hashvalues) in enumerate(signatures):
    if bands:
      band_array[i] = dedup.band_hashes(hashvalues, bands, rows)
  part.mkdir(parents=True, exist_ok=True)
  tmp = part / f".{SIGNATURES}.tmp"
  with tmp.open("wb") as f:
    np.savez(f, source_id=np.array([d.source_id for d in docs], str),
             sha256=np.array([sha for sha, _ in signatures], "S64"), bands=band_array,
             settings_hash=np.array(_shared_hash(settings)))
  tmp.rename(path)
  logging.info("worker %d: %d document signatures in %s", settings.shard_index, len(docs), path)
  return {"file": str(path), "documents": len(docs)}


def dedup_workers(out: str) -> dict:
  """Stage 2: the keep-list across every worker's signatures (`<out>/dedup/`); returns the summary."""
  root = epath.Path(out)
  parts = sorted(p for p in root.glob("part-*-of-*") if p.is_dir())
  if not parts:
    raise ValueError(f"{out}: no part-XXXXX-of-YYYYY directories; run the signatures stage first")
  num = int(parts[0].name.rpartition("-of-")[2])
  missing = [i for i in range(num) if not (root / workers.output_dir("", i, num).name / SIGNATURES).exists()]
  if missing:
    raise ValueError(f"{out}: workers {missing} have no {SIGNATURES}; run their signatures stage")
  ids, shas, bands, owners, hashes = [], [], [], [], set()
  for i in range(num):
    with (root / workers.output_dir("", i, num).name / SIGNATURES).open("rb") as f:
      data = np.load(f)
      ids.append(data["source_id"])
      shas.append(data["sha256"])
      bands.append(data["bands"])
      hashes.add(str(data["settings_hash"]))
    owners.append(np.full(len(shas[-1]), i))
  if len(hashes) != 1:
    raise ValueError(f"{out}: the workers' signatures come from different settings ({sorted(hashes)})")
  removed = dedup.cross_worker_removals(np.concatenate(shas), np.concatenate(bands))
  all_ids, all_owners = np.concatenate(ids), np.concatenate(owners)
  per_worker: list[dict[str, str]] = [{} for _ in range(num)]
  for index, reason in sorted(removed.items()):
    per_worker[int(all_owners[index])][str(all_ids[index])] = reason
  directory = root / DEDUP_DIR
  directory.mkdir(parents=True, exist_ok=True)
  for i, entries in enumerate(per_worker):
    (directory / f"removed-{i:05d}-of-{num:05d}.json").write_text(json.dumps(entries, indent=0))
  counts = {reason: sum(r == reason for r in removed.values())
            for reason in ("cross_worker_exact_duplicate", "cross_worker_near_duplicate")}
  summary = {"workers": num, "documents": len(all_ids), "removed": counts,
             "settings_hash": hashes.pop()}
  (directory / DEDUP_SUMMARY).write_text(json.dumps(summary, indent=1))  # last: marks it complete
  logging.info("dedup across %d workers: %d documents, removed %s", num, len(all_ids), counts)
  return summary


def _removed_here(settings: SynthSettings) -> dict[str, str]:
  """This worker's documents that the keep-list drops (source_id -> reason)."""
  directory = epath.Path(settings.out) / DEDUP_DIR
  summary = directory / DEDUP_SUMMARY
  if not summary.exists():
    raise ValueError(
        f"{summary}: missing. With num_shards={settings.num_shards}, near-duplicates are removed "
        "across workers first: run --stage=signatures on every worker, then --stage=dedup once "
        "(or pass --nocross_worker_dedup to deduplicate each worker's part only)")
  if json.loads(summary.read_text())["settings_hash"] != _shared_hash(settings):
    raise ValueError(f"{summary}: computed for other settings; run the signatures and dedup stages again")
  name = f"removed-{settings.shard_index:05d}-of-{settings.num_shards:05d}.json"
  return json.loads((directory / name).read_text())


def _backend(settings: SynthSettings, model: str, url: str) -> backends.Backend:
  if settings.backend == "jax":
    from codepmp_jax.synth.jax_backend import JaxBackend  # imports jax only when asked for
    return JaxBackend.from_checkpoint(model)
  b = backends.OpenAIBackend(url or settings.base_url, model, settings.api, settings.api_key_env,
                             settings.concurrency, settings.timeout_s, settings.max_retries,
                             settings.backoff_s)
  b.check()
  return b


def synthesize(settings: SynthSettings) -> dict:
  """One worker's synthesis run (resumable); returns its manifest."""
  start = time.time()
  record = content_settings(settings)
  removed = _removed_here(settings) if _cross_dedup(settings) else {}
  state = _scan_state(settings)
  decontaminator = state["decontaminator"]
  models, used_backends = None, []
  with workers.worker_pool(settings.workers, state) as pmap:
    docs, corpus_counts, sources, examples, _ = workers.collect_documents(
        list(settings.source), settings.shard_index, settings.num_shards, pmap,
        settings.near_dup_threshold)
    if _cross_dedup(settings):
      for doc in docs:
        if doc.source_id in removed:
          corpus_counts[removed[doc.source_id]] = corpus_counts.get(removed[doc.source_id], 0) + 1
      docs = [d for d in docs if d.source_id not in removed]
      corpus_counts = dict(sorted({**corpus_counts, "kept": len(docs)}.items()))
    classify_counts = None
    if settings.classify_model:
      classifier = _backend(settings, settings.classify_model, settings.classify_base_url)
      used_backends.append(classifier)
      docs, classify_counts = classify.select(docs, classifier, classify.ClassifySettings(
          types=settings.classify_types, min_confidence=settings.classify_min_confidence,
          ratios=settings.classify_ratios, seed=settings.seed))
    chunks = [docs[i:i + settings.docs_per_shard] for i in range(0, len(docs), settings.docs_per_shard)]
    out = workers.output_dir(settings.out, settings.shard_index, settings.num_shards)
    writer = writer_lib.ShardWriter(out, record, len(chunks))
    writer.check_sources(sources)
    base = {"complete": False, "strategy": settings.strategy, "prompts": prompts.prompt_texts(),
            "sources": sources, "planned_shards": len(chunks),
            # What pairs were checked against: distinct n-grams indexed per evaluation set.
            "decontamination": None if decontaminator is None else {
                "ngram": decontaminator.n, "indexed_ngrams": decontaminator.sizes}}
    writer.write_manifest(base)
    if settings.strategy == "mutate":
      compute = workers.mutate_compute(chunks, pmap)
    else:
      describer = _backend(settings, settings.describe_model, settings.describe_base_url)
      weak = _backend(settings, settings.weak_model, settings.weak_base_url)
      strong = (_backend(settings, settings.strong_model, settings.strong_base_url)
                if settings.strategy == "llm" else None)
      used_backends += [b for b in (describer, strong, weak) if b is not None]
      models = {"describe": describer.name, "strong": strong.name if strong else "human",
                "weak": weak.name}
      describe = llm_strategy.Sampling(settings.describe_temperature, settings.describe_top_p,
                                       settings.describe_max_tokens)
      respond = llm_strategy.Sampling(settings.respond_temperature, settings.respond_top_p,
                                      settings.respond_max_tokens)

      def compute(pending):
        for k in pending:
          records, counts = llm_strategy.shard_pairs(chunks[k], settings.strategy, describer, strong,
                                                     weak, describe, respond, decontaminator)
          yield k, records, counts

    used = workers.write_shards(writer, chunks, compute, settings.max_pairs)
  strategy_counts, lengths = workers.summarize(used)
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
      "counts": {"corpus": corpus_counts, "strategy": strategy_counts, "pairs_written": pairs,
                 **({"classify": classify_counts} if classify_counts is not None else {})},
      "lengths": lengths, "length_sums": length_sums, "bad_input_examples": examples,
      "backend_requests": {b.name: dict(b.stats) for b in used_backends},
      "shards": [{k: s[k] for k in ("file", "records", "available", "sha256")} for s in used],
      "elapsed_s": round(elapsed, 1)}
  path = writer.write_manifest(manifest)
  logging.info("wrote %d pairs in %d shards to %s in %.1f s (%.1f pairs/s); manifest %s",
               pairs, len(used), out, elapsed, pairs / max(elapsed, 1e-9), path)
  return manifest
