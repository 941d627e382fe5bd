"""Tokenize preference data into TFRecord shards: `python -m codepmp_jax.data.prepare`.

  python -m codepmp_jax.data.prepare --input='data/*.jsonl.gz' --format=codepmp \\
      --tokenizer=tok/tokenizer.model --seq_len=1024 --out=prepared/code \\
      [--num_shards=K] [--split=train:0.98,eval:0.02] [--seed=0] [--strict] [--overlong=truncate]

Records are split by a hash of (seed, prompt), so all pairs of one prompt land in one split and
the split does not depend on file order. Each split is cut into contiguous shards named
`<split>-<i>-of-<K>.tfrecord` (one `tf.train.Example` per pair: `chosen_ids`, `rejected_ids`,
`response_start` [2], `margin` [1]), each with a `.lengths.npy` (max length per pair, for
bucketing) and a `.stats.json`. A shard is written under a temporary name and renamed when
complete, so a rerun after a crash only redoes the shards that are missing. Tokenization uses
every core: the tokenizer's batch encoding is multithreaded, and `--num_workers` > 1 adds worker
processes (which also overlap tokenizing with writing). `manifest.json` records counts per split, bad
records by kind, truncated/dropped pairs, a length histogram, the tokenizer's fingerprint (the
tokenizer itself is saved in `<out>/tokenizer/`) and the source files with their sha256.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np
import tqdm
from absl import app, flags, logging

from codepmp_jax.data import loaders
from codepmp_jax.data.encode import OVERLONG, EncodeStats, PairArrays, encode_records
from codepmp_jax.data.records import BadRecordError, BadRecords, PairRecord
from codepmp_jax.data.tokenizer import load_tokenizer

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
HISTOGRAM_BIN = 64
CHUNK = 512


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
  """Everything that determines the shards' contents (a rerun must match it)."""
  inputs: tuple[str, ...]
  format: str
  tokenizer: str
  seq_len: int
  out: str
  num_shards: int | None = None
  split: str = "train:0.98,eval:0.02"
  seed: int = 0
  strict: bool = False
  overlong: str = "truncate"
  num_rejected: int = 1
  num_workers: int = 1  # 1: in this process (batch encoding is multithreaded); 0: one per core


def parse_split(spec: str) -> list[tuple[str, float]]:
  """`train:0.98,eval:0.02` -> [("train", 0.98), ("eval", 0.02)]; fractions must sum to 1."""
  parts = []
  for item in spec.split(","):
    name, sep, fraction = item.partition(":")
    try:
      value = float(fraction)
    except ValueError:
      value = -1.0
    if not sep or not name.strip() or not 0 <= value <= 1:
      raise ValueError(f"--split item {item!r} is not name:fraction with 0 <= fraction <= 1")
    parts.append((name.strip(), value))
  if abs(sum(f for _, f in parts) - 1) > 1e-6 or len({n for n, _ in parts}) != len(parts):
    raise ValueError(f"--split {spec!r}: fractions must sum to 1 and names be distinct")
  return parts


def assign_split(prompt: str, seed: int, splits: Sequence[tuple[str, float]]) -> str:
  """The split of a prompt: a uniform hash of (seed, prompt) against the cumulative fractions."""
  digest = hashlib.sha256(f"{seed}\0{prompt}".encode("utf-8", "surrogatepass")).digest()
  u = int.from_bytes(digest[:8], "little") / 2.0**64
  total = 0.0
  for name, fraction in splits:
    total += fraction
    if u < total:
      return name
  return splits[-1][0]


def expand_inputs(patterns: Sequence[str]) -> list[str]:
  """Sorted files matching each glob; an error names a pattern that matches nothing."""
  files = []
  for pattern in patterns:
    matched = sorted(glob.glob(pattern))
    if not matched:
      raise FileNotFoundError(f"--input pattern {pattern!r} matches no file")
    files.extend(m for m in matched if m not in files)
  return files


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


# Per-process tokenizer for the worker pool (set by `_init_worker`).
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, seq_len: int, overlong: str) -> None:
  _WORKER.update(tokenizer=load_tokenizer(tokenizer_path), seq_len=seq_len, overlong=overlong)


def _encode_chunk(rows: list[tuple]) -> tuple[PairArrays, EncodeStats]:
  stats = EncodeStats()
  records = [PairRecord(*row) for row in rows]
  pairs = encode_records(_WORKER["tokenizer"], records, _WORKER["seq_len"], _WORKER["overlong"], stats)
  return PairArrays.from_pairs(pairs), stats


def _write_tfrecord(path: pathlib.Path, arrays: PairArrays) -> None:
  import tensorflow as tf  # only writing shards needs it
  with tf.io.TFRecordWriter(str(path)) as writer:
    for i in range(len(arrays)):
      example = tf.train.Example()
      feature = example.features.feature
      feature["chosen_ids"].int64_list.value.extend(arrays.sequence(i, 0).tolist())
      feature["rejected_ids"].int64_list.value.extend(arrays.sequence(i, 1).tolist())
      feature["response_start"].int64_list.value.extend(arrays.response_start[i].tolist())
      feature["margin"].float_list.value.append(float(arrays.margin[i]))
      writer.write(example.SerializeToString())


def _histogram(lengths: np.ndarray, seq_len: int) -> list[int]:
  bins = -(-seq_len // HISTOGRAM_BIN)
  return np.bincount((np.asarray(lengths).reshape(-1) - 1) // HISTOGRAM_BIN, minlength=bins).tolist()


def _write_shard(out: pathlib.Path, name: str, arrays: PairArrays, stats: EncodeStats, records: int,
                 settings_hash: str, seq_len: int) -> dict:
  """Write shard files under temporary names, then rename them; the .tfrecord comes last."""
  final = out / name
  tmp = out / f".{name}.tmp"
  _write_tfrecord(tmp, arrays)
  info = {"file": name, "pairs": len(arrays), "records": records, "sha256": file_sha256(tmp),
          "settings_hash": settings_hash, "encode": dataclasses.asdict(stats),
          "histogram": _histogram(arrays.lengths, seq_len)}
  lengths_tmp = out / f".{name}.lengths.tmp.npy"
  np.save(lengths_tmp, arrays.lengths.max(axis=1).astype(np.int32))
  stats_tmp = out / f".{name}.stats.tmp"
  stats_tmp.write_text(json.dumps(info, indent=1) + "\n")
  os.replace(lengths_tmp, out / f"{name}.lengths.npy")
  os.replace(stats_tmp, out / f"{name}.stats.json")
  os.replace(tmp, final)
  return info


def _existing_shard(out: pathlib.Path, name: str, settings_hash: str) -> dict | None:
  """The stats of a complete shard from an earlier run with the same settings, else None."""
  if not (out / name).exists():
    return None
  info = json.loads((out / f"{name}.stats.json").read_text())
  if info.get("settings_hash") != settings_hash:
    raise ValueError(f"{out / name} was prepared with other settings or inputs; use a new --out")
  return info


def prepare(settings: PrepareSettings) -> dict:
  """Load, split, tokenize and shard the inputs; returns the manifest (also written to disk)."""
  if settings.overlong not in OVERLONG:
    raise ValueError(f"--overlong must be one of {OVERLONG}")
  splits = parse_split(settings.split)
  files = expand_inputs(settings.inputs)
  tokenizer = load_tokenizer(settings.tokenizer)
  out = pathlib.Path(settings.out)
  out.mkdir(parents=True, exist_ok=True)
  sources = [{"path": f, "sha256": file_sha256(f), "bytes": os.path.getsize(f)} for f in files]
  fixed = {k: v for k, v in dataclasses.asdict(settings).items()
           if k not in ("inputs", "out", "tokenizer", "strict", "num_workers")}
  settings_hash = hashlib.sha256(json.dumps(
      {**fixed, "sources": sources, "tokenizer": tokenizer.fingerprint}, sort_keys=True).encode()
  ).hexdigest()

  bad = BadRecords(strict=settings.strict)
  by_split: dict[str, list[tuple]] = {name: [] for name, _ in splits}
  options = loaders.LoaderOptions(seed=settings.seed, num_rejected=settings.num_rejected)
  loaded = 0
  for record in tqdm.tqdm(loaders.load_records(files, settings.format, bad, options),
                          desc="load", unit=" pairs", mininterval=1.0):
    by_split[assign_split(record.prompt, settings.seed, splits)].append(
        (record.prompt, record.chosen, record.rejected, record.margin))
    loaded += 1
  if bad.total:
    logging.warning("%s", bad.report())

  plan = []  # (split, shard name, rows); shards already complete are skipped
  done: dict[str, dict] = {}
  for split, rows in by_split.items():
    count = max(1, min(settings.num_shards or -(-len(rows) // 100_000), len(rows)))
    for index in range(count):
      name = shard_name(split, index, count)
      part = rows[index * len(rows) // count:(index + 1) * len(rows) // count]
      info = _existing_shard(out, name, settings_hash)
      if info is not None:
        done[name] = info
      else:
        plan.append((split, name, part))
  if done:
    logging.info("reusing %d complete shards from an earlier run", len(done))

  workers = settings.num_workers or os.cpu_count() or 1
  start = time.perf_counter()
  encoded = 0
  with tqdm.tqdm(total=sum(len(p) for *_, p in plan), desc="tokenize", unit=" pairs") as bar:
    # forkserver: workers must not inherit TensorFlow's threads from an earlier shard write.
    pool = multiprocessing.get_context("forkserver").Pool(
        workers, _init_worker, (settings.tokenizer, settings.seq_len, settings.overlong)
    ) if workers > 1 else None
    if pool is None:
      _init_worker(settings.tokenizer, settings.seq_len, settings.overlong)
    try:
      for split, name, part in plan:
        chunks = [part[i:i + CHUNK] for i in range(0, len(part), CHUNK)]
        results = pool.imap(_encode_chunk, chunks) if pool else map(_encode_chunk, chunks)
        arrays, stats = [], EncodeStats()
        for chunk, (chunk_arrays, chunk_stats) in zip(chunks, results):
          arrays.append(chunk_arrays)
          stats.add(chunk_stats)
          bar.update(len(chunk))
        done[name] = _write_shard(out, name, PairArrays.concatenate(arrays), stats, len(part),
                                  settings_hash, settings.seq_len)
        encoded += len(part)
    finally:
      if pool is not None:
        pool.close()
        pool.join()
  elapsed = time.perf_counter() - start

  tokenizer.save(out / "tokenizer")
  manifest = _manifest(settings, splits, done, bad, loaded, sources, tokenizer, settings_hash)
  manifest["throughput"] = {"pairs_encoded": encoded, "seconds": round(elapsed, 3), "workers": workers}
  tmp = out / f".{MANIFEST}.tmp"
  tmp.write_text(json.dumps(manifest, indent=1) + "\n")
  os.replace(tmp, out / MANIFEST)
  return manifest


def _manifest(settings: PrepareSettings, splits, done: dict[str, dict], bad: BadRecords, loaded: int,
              sources: list[dict], tokenizer, settings_hash: str) -> dict:
  totals = EncodeStats()
  histogram = np.zeros(-(-settings.seq_len // HISTOGRAM_BIN), np.int64)
  split_info = {}
  for split, _ in splits:
    shards = [done[name] for name in sorted(done) if name.startswith(f"{split}-")]
    split_info[split] = {"pairs": sum(s["pairs"] for s in shards),
                         "records": sum(s["records"] for s in shards),
                         "shards": [{k: s[k] for k in ("file", "pairs", "sha256")} for s in shards]}
    for shard in shards:
      totals.add(EncodeStats(**shard["encode"]))
      histogram += np.asarray(shard["histogram"], np.int64)
  edges = [i * HISTOGRAM_BIN for i in range(len(histogram))] + [settings.seq_len]
  return {
      "version": MANIFEST_VERSION,
      "format": settings.format,
      "seq_len": settings.seq_len,
      "overlong": settings.overlong,
      "seed": settings.seed,
      "split": settings.split,
      "num_rejected": settings.num_rejected,
      "records_loaded": loaded,
      "splits": split_info,
      "bad_records": bad.to_dict(),
      "bad_record_examples": bad.examples,
      "truncated": {"prompt": totals.truncated_prompt, "response": totals.truncated_response},
      "dropped": {"overlong": totals.dropped_overlong},
      "length_histogram": {"bin_edges": edges, "counts": histogram.tolist(),
                           "of": "every chosen and rejected sequence, in tokens"},
      "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                    "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                    "bos_id": tokenizer.bos_id, "path": "tokenizer"},
      "sources": sources,
      "settings_hash": settings_hash,
  }


def read_manifest(directory: str | os.PathLike) -> dict:
  """The manifest of a prepared directory (FileNotFoundError names the directory)."""
  path = pathlib.Path(directory) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{directory}: no {MANIFEST}; run python -m codepmp_jax.data.prepare")
  return json.loads(path.read_text())


def check_tokenizer(directory: str | os.PathLike, fingerprint: str) -> None:
  """Refuse data prepared with a different tokenizer than the one a run uses."""
  prepared = read_manifest(directory)["tokenizer"]["fingerprint"]
  if prepared != fingerprint:
    raise ValueError(f"{directory} was prepared with tokenizer {prepared[:12]}, but this run uses "
                     f"{fingerprint[:12]}; prepare the data again with the run's tokenizer")


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI flags (defined only when run as a program, so importing this module adds none)."""
  flags.DEFINE_list("input", None, "Glob(s) of input files (comma-separated).")
  flags.DEFINE_enum("format", None, sorted(loaders.FORMATS), "Input format.")
  flags.DEFINE_string("tokenizer", None, "Tokenizer file or directory, or a checkpoint holding one.")
  flags.DEFINE_integer("seq_len", None, "Maximum tokens per sequence (prompt + response + eos).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("num_shards", None, "Shards per split (default: one per 100k pairs).")
  flags.DEFINE_string("split", "train:0.98,eval:0.02", "Splits as name:fraction, comma-separated.")
  flags.DEFINE_integer("seed", 0, "Seed of the split and of generated rejected responses (gsm8k).")
  flags.DEFINE_bool("strict", False, "Fail on the first malformed record instead of counting it.")
  flags.DEFINE_enum("overlong", "truncate", list(OVERLONG), "Overlong sequences: truncate or drop.")
  flags.DEFINE_integer("num_rejected", 1, "gsm8k: wrong solutions per question.")
  flags.DEFINE_integer("num_workers", 1, "Tokenizer processes: 1 tokenizes in this process (the "
                       "tokenizer's batch encoding already uses every core), 0 starts one per core.")


def main(argv: Sequence[str]) -> None:
  del argv
  for name in ("input", "format", "tokenizer", "seq_len", "out"):
    if FLAGS[name].value is None:
      raise app.UsageError(f"--{name} is required")
  settings = PrepareSettings(
      inputs=tuple(FLAGS.input), format=FLAGS.format, tokenizer=FLAGS.tokenizer,
      seq_len=FLAGS.seq_len, out=FLAGS.out, num_shards=FLAGS.num_shards, split=FLAGS.split,
      seed=FLAGS.seed, strict=FLAGS.strict, overlong=FLAGS.overlong,
      num_rejected=FLAGS.num_rejected, num_workers=FLAGS.num_workers)
  try:
    manifest = prepare(settings)
  except (BadRecordError, FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  summary = {k: manifest[k] for k in ("splits", "bad_records", "truncated", "dropped")}
  for split in summary["splits"].values():
    split.pop("shards")
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
