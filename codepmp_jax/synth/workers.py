"""The stages of one synthesis worker: corpus -> filters -> dedup -> decontamination -> strategy -> shards.

The corpus stage and the `mutate` strategy run in a process pool; results are consumed in document
order, so the kept documents, the shard contents and a `--max_pairs` cut are the same on every run
with the same settings, whatever the number of workers.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any

import tqdm
from etils import epath

from codepmp_jax.synth import corpus
from codepmp_jax.synth import dedup
from codepmp_jax.synth import filters
from codepmp_jax.synth import mutate_strategy
from codepmp_jax.synth import writer as writer_lib
from codepmp_jax.synth.corpus import Document
from codepmp_jax.synth.decontaminate import Decontaminator

EXAMPLES_KEPT = 5
_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
  _STATE.update(state)


def _scan(doc: Document) -> tuple[Document, str | None, str, Any]:
  """Filter and decontaminate one document and compute its MinHash (in a worker)."""
  reason = filters.rejection_reason(doc, _STATE["filters"])
  decontaminator = _STATE["decontaminator"]
  if reason is None and decontaminator is not None and decontaminator.contaminated(doc.content):
    reason = "contaminated"
  near = reason is None and _STATE["near_dup_threshold"] < 1.0
  return doc, reason, doc.sha256, dedup.signature(doc.content) if near else None


def _mutate_shard(task: tuple[int, list[Document]]) -> tuple[int, list[dict], collections.Counter]:
  k, docs = task
  records, counts = [], collections.Counter()
  for doc in docs:
    r, c = mutate_strategy.document_pairs(doc, _STATE["mutate"])
    records += r
    counts.update(c)
  return k, records, counts


@contextlib.contextmanager
def worker_pool(workers: int, state: dict[str, Any]) -> Iterator[Callable]:
  """An ordered `map(fn, items)`: a forkserver pool when workers > 1, else in-process.

  forkserver, not fork: the caller may hold threads (JAX's, a backend's HTTP pool) that a forked
  child would inherit mid-operation (a deadlock risk); the state is pickled to each worker.
  """
  _init_worker(state)
  if workers <= 1:
    yield map
    return
  pool = multiprocessing.get_context("forkserver").Pool(workers, _init_worker, (state,))
  try:
    yield lambda fn, items: pool.imap(fn, items, chunksize=1)
  finally:
    pool.terminate()
    pool.join()


def collect_documents(specs: list[str], shard_index: int, num_shards: int, pmap: Callable,
                      near_dup_threshold: float
                      ) -> tuple[list[Document], dict, list[dict], list[str], list[tuple[str, Any]]]:
  """The kept documents of this worker, corpus counts, per-source hashes, bad-input examples and
  the kept documents' (content sha256, MinHash values or None) for deduplication across workers."""
  counts = collections.Counter()
  deduplicator = dedup.Deduplicator(near_dup_threshold)
  kept, sources, examples, signatures = [], [], [], []
  for spec in specs:
    digest = hashlib.sha256()
    docs = corpus.iter_documents(spec, shard_index, num_shards)
    for doc, reason, sha, signature in tqdm.tqdm(pmap(_scan, docs), desc=f"corpus {spec}",
                                                 unit="file", mininterval=2.0):
      counts["documents"] += 1
      digest.update(f"{doc.source_id}\0{sha}\n".encode("utf-8", "surrogatepass"))
      if reason is None:
        reason = deduplicator.check(doc.source_id, sha, signature)
      if reason is None:
        kept.append(doc)
        signatures.append((sha, signature))
        continue
      counts[reason] += 1
      if reason == "unreadable" and len(examples) < EXAMPLES_KEPT:
        logging.warning("bad input: %s", doc.error)
        examples.append(doc.error)
    sources.append({"spec": spec, "sha256": digest.hexdigest()})
  counts["kept"] = len(kept)
  return kept, dict(sorted(counts.items())), sources, examples, signatures


def write_shards(writer: writer_lib.ShardWriter, chunks: list[list[Document]],
                 compute: Callable[[list[int]], Iterator[tuple[int, list[dict], collections.Counter]]],
                 max_pairs: int) -> list[dict]:
  """Write every missing shard in order (stopping at `max_pairs` when > 0); the stats of those used."""
  done = {k: s for k in range(len(chunks)) if (s := writer.finished(k)) is not None}
  pending = [k for k in range(len(chunks)) if k not in done or done[k]["records"] != done[k]["available"]]
  results = compute(pending)
  used, total = [], 0
  bar = tqdm.tqdm(total=max_pairs or None, desc="pairs", unit="pair", mininterval=1.0)
  for k in range(len(chunks)):
    if max_pairs and total >= max_pairs:
      break
    stats = done.get(k)
    if k not in pending and max_pairs and total + stats["records"] > max_pairs:
      stats = writer.write(k, writer.read(k)[:max_pairs - total], stats["available"], stats["counts"])
    elif k in pending:
      got, records, counts = next(results)
      assert got == k, (got, k)
      exact_cut = stats is not None and max_pairs and total + stats["records"] == max_pairs
      if not exact_cut:
        keep = records[:max_pairs - total] if max_pairs else records
        stats = writer.write(k, keep, len(records), counts)
    total += stats["records"]
    used.append(stats)
    bar.update(stats["records"])
    bar.set_postfix(shard=f"{k + 1}/{len(chunks)}")
  bar.close()
  for k in range(len(used), len(chunks)):
    writer.remove(k)
  return used


def summarize(used: list[dict]) -> tuple[dict, dict]:
  """Summed strategy counts and length statistics over the used shards."""
  counts, lengths = collections.Counter(), collections.Counter()
  for s in used:
    counts.update(s["counts"])
    lengths.update(s["lengths"])
  counts["pairs_written"] = sum(s["records"] for s in used)
  counts["pairs_cut_by_max_pairs"] = sum(s["available"] - s["records"] for s in used)
  return dict(sorted(counts.items())), writer_lib.length_summary(lengths)


def mutate_compute(chunks: list[list[Document]], pmap: Callable) -> Callable:
  """The `compute` of `write_shards` for the mutate strategy (shards in the worker pool)."""
  return lambda pending: iter(pmap(_mutate_shard, ((k, chunks[k]) for k in pending)))


def load_decontaminator(sets: list[str], files: list[str], data_dir: str, n: int) -> Decontaminator | None:
  """The n-gram index, or None when no set or file is asked for."""
  if not sets and not files:
    return None
  d = Decontaminator.from_flags(sets, files, data_dir, n)
  logging.info("decontamination: %d %d-grams from %s", len(d.ngrams), n, d.sizes)
  return d


def output_dir(out: str, shard_index: int, num_shards: int) -> epath.Path:
  """Where this worker writes: `out` itself, or `out/part-XXXXX-of-YYYYY` when split."""
  root = epath.Path(out)
  return root if num_shards == 1 else root / f"part-{shard_index:05d}-of-{num_shards:05d}"
