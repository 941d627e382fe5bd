"""Tokenize preference data into a TFDS dataset of ArrayRecord shards: `python -m codepmp_jax.data.prepare`.

  python -m codepmp_jax.data.prepare --input='data/*.jsonl.gz' --format=codepmp \\
      --tokenizer=tok/tokenizer.model --seq_len=1024 --out=prepared/code \\
      [--num_shards=K] [--split=train:0.98,eval:0.02] [--seed=0] [--strict] [--truncation=keep_end]

Records are split by a hash of (seed, prompt), so all pairs of one prompt land in one split and
the split does not depend on file order. Memory stays bounded whatever the corpus size:
  pass 1  streams the records through the loaders and spills their texts, per split, to a local
          spill file in chunks (below `--spill_dir`; default `<out>`);
  route   sends record j of a split to shard `perm[j] * K // n` (perm: a permutation seeded by
          (seed, split)), so every shard is a uniform sample of its split (and shards have the
          sizes of an even cut), appending it to that shard's spill file;
  pass 2  tokenizes each unfinished shard's spill in chunks (in `--num_workers` forkserver processes
          when > 1), appending tokens to a staging file, then writes the pairs in an order seeded by
          (seed, shard), so every contiguous range of a shard is a uniform sample too.
The output is a TFDS dataset directory (format: `prepared.py`): per shard an ArrayRecord file
named as TFDS names them, a sizes sidecar and `stats/<split>-<i>-of-<K>.json`, each staged under
a temporary name and published when complete (the stats last), so a rerun after a crash
tokenizes only the shards that are missing; TFDS's `dataset_info.json` and `features.json` are
written with the manifest, at the end. `manifest.json` records counts per split, bad
records by kind (file:line), truncated pairs, dropped ones (too long under --truncation=drop, or
token-identical once cut), a length histogram, the tokenizer's fingerprint
(the tokenizer itself is saved in `<out>/tokenizer/`) and the source files with their sha256.
Inputs (globs too) and `--out` may be `gs://...` (through etils.epath); the spill directory
must be local. ArrayRecord writes local files, so a remote `--out` gets each file built in a local
temporary directory and copied up once complete, in the same order (a shard's stats after its
records and sizes, the manifest last of all): a crash leaves no manifest, and the rerun reuses
the shards copied up complete.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import pathlib
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import tqdm
from absl import app, flags, logging
from etils import epath

from codepmp_jax import cli, storage
from codepmp_jax.data import loaders, prepared, registry
from codepmp_jax.data.encode import (DEFAULT_TRUNCATION, TRUNCATION, EncodeStats, PairArrays,
                                     check_truncation, encode_records)
from codepmp_jax.data.records import BadRecords, PairRecord
from codepmp_jax.data.tokenizer import load_tokenizer

STATS_DIR = "stats"
HISTOGRAM_BIN = 64
CHUNK = 512
SHARD_PAIRS = 100_000  # default shard size
GATHER = 1024  # pairs per gather when writing a shard in its shuffled order (bounds its memory)


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
  """Everything that determines the shards' contents (a rerun must match it), plus `strict`,
  `num_workers` and `spill_dir`, which do not change them."""
  inputs: tuple[str, ...]
  format: str
  tokenizer: str
  seq_len: int
  out: str
  num_shards: int | None = None
  split: str = "train:0.98,eval:0.02"
  seed: int = 0
  strict: bool = False
  truncation: str = DEFAULT_TRUNCATION  # encode.TRUNCATION
  num_rejected: int = 1
  num_workers: int = 1  # 1: in this process (batch encoding is multithreaded); 0: one per core
  spill_dir: str = ""  # local scratch for the record texts ('': <out>, or the temp dir if remote)


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
  """Sorted files matching each glob (local or `gs://...`); an error names a pattern matching none."""
  files = []
  for pattern in patterns:
    if not storage.is_remote(pattern):
      matched = sorted(glob.glob(pattern))
    else:  # split at the first component with a wildcard: epath globs below a fixed root
      parts = pattern.split("/")
      first = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
      root = epath.Path("/".join(parts[:first]))
      matched = (sorted(str(p) for p in root.glob("/".join(parts[first:])))
                 if first < len(parts) else ([pattern] if root.exists() else []))
    if not matched:
      raise FileNotFoundError(f"--input pattern {pattern!r} matches no file")
    files.extend(m for m in matched if m not in files)
  return files


# Per-process tokenizer for the worker pool (set by `_init_worker`).
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, seq_len: int, truncation: str) -> None:
  _WORKER.update(tokenizer=load_tokenizer(tokenizer_path), seq_len=seq_len, truncation=truncation)


def _encode_chunk(rows: list[tuple]) -> tuple[PairArrays, EncodeStats]:
  stats = EncodeStats()
  records = [PairRecord(*row) for row in rows]
  pairs = encode_records(_WORKER["tokenizer"], records, _WORKER["seq_len"], _WORKER["truncation"], stats)
  return PairArrays.from_pairs(pairs), stats


def _bounded_map(pool, fn: Callable, items: Iterable, depth: int) -> Iterator:
  """`map(fn, items)` in order through `pool`, with at most `depth` items in flight (so a long
  input is never read ahead into memory, as `Pool.imap` would)."""
  if pool is None:
    yield from map(fn, items)
    return
  pending = collections.deque()
  for item in items:
    pending.append(pool.apply_async(fn, (item,)))
    if len(pending) >= depth:
      yield pending.popleft().get()
  while pending:
    yield pending.popleft().get()


def _histogram(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  bins = -(-seq_len // HISTOGRAM_BIN)
  return np.bincount((np.asarray(lengths).reshape(-1) - 1) // HISTOGRAM_BIN, minlength=bins)


def _dump_chunks(path: str, rows: Iterable[tuple]) -> None:
  with open(path, "ab") as f:
    for row in rows:
      pickle.dump(row, f, pickle.HIGHEST_PROTOCOL)


def _load_chunks(path: str, size: int = CHUNK) -> Iterator[list[tuple]]:
  """The rows of a spill file in chunks of `size`."""
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    chunk = []
    while True:
      try:
        chunk.append(pickle.load(f))
      except EOFError:
        break
      if len(chunk) == size:
        yield chunk
        chunk = []
    if chunk:
      yield chunk


class _Staging:
  """Where shard files are built before they are published into `out` under their final names:
  beside them when `out` is local (publishing is a rename), else in a local temp dir (a copy)."""

  def __init__(self, out: epath.Path):
    self.out = out
    self.local = not storage.is_remote(out)
    self.dir = str(out / ".staging") if self.local else tempfile.mkdtemp(prefix="prepare-")
    os.makedirs(self.dir, exist_ok=True)

  def path(self, name: str) -> str:
    return os.path.join(self.dir, name)

  def publish(self, name: str) -> None:
    (self.out / name).parent.mkdir(parents=True, exist_ok=True)
    if self.local:
      os.replace(self.path(name), self.out / name)
    else:
      epath.Path(self.path(name)).copy(self.out / name, overwrite=True)
      os.remove(self.path(name))

  def cleanup(self) -> None:
    shutil.rmtree(self.dir, ignore_errors=True)


def _existing_shard(out: epath.Path, split: str, index: int, count: int,
                    settings_hash: str) -> dict | None:
  """The stats of a complete shard from an earlier run with the same settings, else None (also
  for a shard of an older format version, which is then written again)."""
  stats = out / _stats_file(split, index, count)
  files = (prepared.shard_file(split, index, count), prepared.sizes_file(split, index, count))
  if not (stats.exists() and all((out / f).exists() for f in files)):
    return None
  info = json.loads(stats.read_text())
  if info.get("settings_hash") != settings_hash:
    raise ValueError(f"{out / files[0]} was prepared with other settings or inputs; use a new --out")
  return info if info.get("version") == prepared.MANIFEST_VERSION else None


def _stats_file(split: str, index: int, count: int) -> str:
  return f"{STATS_DIR}/{prepared.shard_stem(split, index, count)}.json"


def _write_shard(staging: _Staging, split: str, index: int, count: int, spill: str, records: int,
                 seed: int, pool, depth: int, settings_hash: str, seq_len: int,
                 bar: tqdm.tqdm) -> dict:
  """Tokenize one shard's spill file into its records and sizes (its stats published last).

  The records are first written in the order they were encoded, then copied in an order seeded
  by (seed, shard) in bounded slices, so every contiguous range of a shard is a uniform sample.
  """
  import grain
  stem = prepared.shard_stem(split, index, count)
  stream = staging.path(f"{stem}.stream")
  spec = prepared.features()
  sizes, stats = [], EncodeStats()
  from array_record.python import array_record_module
  writer = array_record_module.ArrayRecordWriter(stream, prepared.WRITER_OPTIONS)
  try:
    for arrays, chunk_stats in _bounded_map(pool, _encode_chunk, _load_chunks(spill), depth):
      for record in prepared.serialize(arrays, spec):
        writer.write(record)
      sizes.append(prepared.sizes_of(arrays))
      stats.add(chunk_stats)
      bar.update(chunk_stats.pairs + chunk_stats.dropped_overlong + chunk_stats.dropped_identical)
  finally:
    writer.close()
  stream_sizes = np.concatenate(sizes) if sizes else np.zeros(0, prepared.SIZES_DTYPE)
  order = np.random.default_rng([seed, _name_key(stem)]).permutation(len(stream_sizes))
  digest, tokens = hashlib.sha256(), int(stream_sizes["lengths"].sum())
  source = grain.sources.ArrayRecordDataSource([stream]) if len(order) else None

  def shuffled():
    for i in range(0, len(order), GATHER):
      for record in source.__getitems__(order[i:i + GATHER].tolist()):
        digest.update(record)
        yield record
  records_file = prepared.shard_file(split, index, count)
  prepared.write_records(staging.path(records_file), shuffled())
  del source
  os.remove(stream)
  os.makedirs(staging.path(prepared.SIZES_DIR), exist_ok=True)
  os.makedirs(staging.path(STATS_DIR), exist_ok=True)
  sizes_file = prepared.sizes_file(split, index, count)
  np.save(staging.path(sizes_file), stream_sizes[order])
  info = {"file": records_file, "sizes": sizes_file, "version": prepared.MANIFEST_VERSION,
          "pairs": len(order), "records": records, "tokens": tokens,
          "sha256": digest.hexdigest(), "settings_hash": settings_hash,
          "encode": dataclasses.asdict(stats),
          "histogram": _histogram(stream_sizes["lengths"], seq_len).tolist()}
  stats_file = _stats_file(split, index, count)
  with open(staging.path(stats_file), "w") as f:
    f.write(json.dumps(info, indent=1) + "\n")
  for name in (records_file, sizes_file, stats_file):  # the stats last: they mark it complete
    staging.publish(name)
  return info


def _name_key(name: str) -> int:
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _spill_records(settings: PrepareSettings, files: list[str], splits, spill: str,
                   bad: BadRecords) -> dict[str, int]:
  """Pass 1: every record's texts appended to `<spill>/<split>.pkl`; returns the count per split."""
  counts = {name: 0 for name, _ in splits}
  buffers: dict[str, list[tuple]] = {name: [] for name, _ in splits}
  options = loaders.LoaderOptions(seed=settings.seed, num_rejected=settings.num_rejected)
  for record in tqdm.tqdm(loaders.load_records(files, settings.format, bad, options),
                          desc="load", unit=" pairs", mininterval=1.0):
    split = assign_split(record.prompt, settings.seed, splits)
    buffers[split].append((record.prompt, record.chosen, record.rejected, record.margin))
    counts[split] += 1
    if len(buffers[split]) == CHUNK:
      _dump_chunks(os.path.join(spill, f"{split}.pkl"), buffers[split])
      buffers[split] = []
  for split, rows in buffers.items():
    _dump_chunks(os.path.join(spill, f"{split}.pkl"), rows)
  return counts


def _route(spill: str, split: str, split_index: int, n: int, count: int, seed: int,
           wanted: set[int]) -> None:
  """Record j of `split` -> shard `perm[j] * count // n`, for the shards in `wanted`."""
  perm = np.random.default_rng([seed, 1 << 30, split_index]).permutation(n)
  files = {k: open(os.path.join(spill, f"{split}.{k}.pkl"), "wb") for k in wanted}
  try:
    j = 0
    for chunk in _load_chunks(os.path.join(spill, f"{split}.pkl")):
      targets = (perm[j:j + len(chunk)] * count // n).tolist()
      j += len(chunk)
      for k, row in zip(targets, chunk):
        if k in files:
          pickle.dump(row, files[k], pickle.HIGHEST_PROTOCOL)
  finally:
    for f in files.values():
      f.close()
  os.remove(os.path.join(spill, f"{split}.pkl"))


def prepare(settings: PrepareSettings) -> dict:
  """Load, split, tokenize and shard the inputs; returns the manifest (also written to disk)."""
  check_truncation(settings.truncation)
  splits = parse_split(settings.split)
  files = expand_inputs(settings.inputs)
  tokenizer = load_tokenizer(settings.tokenizer)
  out = epath.Path(settings.out)
  out.mkdir(parents=True, exist_ok=True)
  sources = [{"path": f, "sha256": registry.sha256_of(f), "bytes": epath.Path(f).stat().length} for f in files]
  fixed = {k: v for k, v in dataclasses.asdict(settings).items()
           if k not in ("inputs", "out", "tokenizer", "strict", "num_workers", "spill_dir")}
  settings_hash = hashlib.sha256(json.dumps(
      {**fixed, "sources": sources, "tokenizer": tokenizer.fingerprint}, sort_keys=True).encode()
  ).hexdigest()

  # A directory of its own below --spill_dir (which it deletes when done), redone on a rerun.
  scratch = settings.spill_dir or (tempfile.gettempdir() if storage.is_remote(out) else str(out))
  spill = os.path.join(scratch, f".spill-{settings_hash[:16]}")
  shutil.rmtree(spill, ignore_errors=True)
  os.makedirs(spill)
  staging = _Staging(out)
  try:  # the staged files go, complete or not (a rerun stages again)
    bad = BadRecords(strict=settings.strict)
    workers = settings.num_workers or os.cpu_count() or 1
    done: dict[str, dict] = {}
    try:
      counts = _spill_records(settings, files, splits, spill, bad)
      if not sum(counts.values()):  # nothing usable: say why and which format the records fit
        raise ValueError(loaders.nothing_loaded(files, settings.format, bad))
      if bad.total:
        logging.warning("%s", bad.report())
      plan = []  # (split, index, count, records, spill file) of each shard still to write
      for split_index, (split, _) in enumerate(splits):
        n = counts[split]
        count = max(1, min(settings.num_shards or -(-n // SHARD_PAIRS), n))
        wanted = set()
        for index in range(count):
          info = _existing_shard(out, split, index, count, settings_hash)
          if info is not None:
            done[prepared.shard_stem(split, index, count)] = info
          else:
            wanted.add(index)
            plan.append((split, index, count, (index + 1) * n // count - index * n // count,
                         os.path.join(spill, f"{split}.{index}.pkl")))
        _route(spill, split, split_index, max(n, 1), count, settings.seed, wanted)
      if done:
        logging.info("reusing %d complete shards from an earlier run", len(done))

      start = time.perf_counter()
      with tqdm.tqdm(total=sum(p[3] for p in plan), desc="tokenize", unit=" pairs") as bar:
        # forkserver: workers never inherit the threads of this process (JAX, tokenizers, tqdm).
        pool = multiprocessing.get_context("forkserver").Pool(
            workers, _init_worker, (settings.tokenizer, settings.seq_len, settings.truncation)
        ) if workers > 1 else None
        if pool is None:
          _init_worker(settings.tokenizer, settings.seq_len, settings.truncation)
        try:
          for split, index, count, records, shard_spill in plan:
            done[prepared.shard_stem(split, index, count)] = _write_shard(
                staging, split, index, count, shard_spill, records, settings.seed, pool,
                2 * workers, settings_hash, settings.seq_len, bar)
            pathlib.Path(shard_spill).unlink(missing_ok=True)
        finally:
          if pool is not None:
            pool.close()
            pool.join()
      elapsed = time.perf_counter() - start
    finally:
      shutil.rmtree(spill, ignore_errors=True)

    tokenizer.save(out / "tokenizer")
    manifest = _manifest(settings, splits, done, bad, sum(counts.values()), sources, tokenizer,
                         settings_hash)
    if not sum(info["pairs"] for info in manifest["splits"].values()):
      dropped = manifest["dropped"]
      raise ValueError(f"no pairs kept: all {sum(counts.values())} loaded pairs were dropped at "
                       f"--seq_len={settings.seq_len} (overlong: {dropped['overlong']}, identical once "
                       f"cut: {dropped['identical_after_truncation']}); raise --seq_len or use "
                       f"--truncation=keep_end")
    manifest["throughput"] = {"pairs_encoded": sum(p[3] for p in plan), "seconds": round(elapsed, 3),
                              "workers": workers}
    prepared.write_tfds_metadata(
        out, {split: [s["pairs"] for s in info["shards"]] for split, info in manifest["splits"].items()},
        description=f"CodePMP preference pairs prepared from {settings.format} data "
                    f"(codepmp_jax.data.prepare; manifest.json has the counts)")
    with open(staging.path(prepared.MANIFEST), "w") as f:
      f.write(json.dumps(manifest, indent=1) + "\n")
    staging.publish(prepared.MANIFEST)  # last: its presence marks the directory complete
    return manifest
  finally:
    staging.cleanup()


def _manifest(settings: PrepareSettings, splits, done: dict[str, dict], bad: BadRecords, loaded: int,
              sources: list[dict], tokenizer, settings_hash: str) -> dict:
  totals = EncodeStats()
  histogram = np.zeros(-(-settings.seq_len // HISTOGRAM_BIN), np.int64)
  split_info = {}
  for split, _ in splits:
    infos = [done[name] for name in sorted(done) if name.rpartition("-of-")[0].rpartition("-")[0] == split]
    split_info[split] = {"pairs": sum(s["pairs"] for s in infos),
                         "records": sum(s["records"] for s in infos),
                         "shards": [{k: s[k] for k in ("file", "sizes", "pairs", "tokens", "sha256")}
                                    for s in infos]}
    for shard in infos:
      totals.add(EncodeStats(**shard["encode"]))
      histogram += np.asarray(shard["histogram"], np.int64)
  edges = [i * HISTOGRAM_BIN for i in range(len(histogram))] + [settings.seq_len]
  return {
      "version": prepared.MANIFEST_VERSION,
      "storage": {"layout": "TFDS dataset of ArrayRecord shards (codepmp_jax/data/prepared.py)",
                  "tfds_name": prepared.DATASET_NAME},
      "format": settings.format,
      "seq_len": settings.seq_len,
      "truncation": settings.truncation,
      "seed": settings.seed,
      "split": settings.split,
      "num_rejected": settings.num_rejected,
      "records_loaded": loaded,
      "splits": split_info,
      "bad_records": bad.to_dict(),
      "bad_record_examples": bad.examples,
      "truncated": {"prompt": totals.truncated_prompt, "response": totals.truncated_response},
      "dropped": {"overlong": totals.dropped_overlong,
                  "identical_after_truncation": totals.dropped_identical},
      "length_histogram": {"bin_edges": edges, "counts": histogram.tolist(),
                           "of": "every chosen and rejected sequence, in tokens"},
      "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                    "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                    "bos_id": tokenizer.bos_id, "path": "tokenizer"},
      "sources": sources,
      "settings_hash": settings_hash,
  }


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The CLI flags (defined only when run as a program, so importing this module adds none)."""
  def define(kind: str, name: str, default: object, help: str, *args: object) -> None:
    getattr(flags, f"DEFINE_{kind}")(name, default, *args, help, flag_values=values)

  define("list", "input", None, "Glob(s) of input files (comma-separated).")
  define("enum", "format", None, "Input format.", sorted(loaders.FORMATS))
  define("string", "tokenizer", None, "Tokenizer file or directory, or a checkpoint holding one.")
  define("integer", "seq_len", None, "Maximum tokens per sequence (prompt + response + eos).")
  define("string", "out", None, "Output directory.")
  define("integer", "num_shards", None, "Shards per split (default: one per 100k pairs).")
  define("string", "split", "train:0.98,eval:0.02", "Splits as name:fraction, comma-separated.")
  define("integer", "seed", 0, "Seed of the split and of generated rejected responses (gsm8k).")
  define("bool", "strict", False, "Fail on the first malformed record instead of counting it.")
  define("enum", "truncation", DEFAULT_TRUNCATION, "Sequences longer than --seq_len: keep_end cuts the "
         "prompt from the left, then the start of the response (its answer stays); keep_head cuts "
         "the response's end instead; drop drops the pair.", list(TRUNCATION))
  define("integer", "num_rejected", 1, "gsm8k: wrong solutions per question.")
  define("integer", "num_workers", 1, "Tokenizer processes: 1 tokenizes in this process (the "
         "tokenizer's batch encoding already uses every core), 0 starts one per core.")
  define("string", "spill_dir", "", "Local scratch directory for the record texts between the "
         "passes (about the size of the inputs, uncompressed; default: --out, or the temp dir "
         "when --out is remote); a subdirectory is made and removed in it.")

def main(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """Prepares the data the flags describe and prints the manifest's counts."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])} (flags are --name=value)")
  for name in ("input", "format", "tokenizer", "seq_len", "out"):
    if values[name].value is None:
      raise app.UsageError(f"--{name} is required")
  manifest = prepare(PrepareSettings(
      inputs=tuple(values.input), format=values.format, tokenizer=values.tokenizer,
      seq_len=values.seq_len, out=values.out, num_shards=values.num_shards, split=values.split,
      seed=values.seed, strict=values.strict, truncation=values.truncation,
      num_rejected=values.num_rejected, num_workers=values.num_workers, spill_dir=values.spill_dir))
  summary = {k: manifest[k] for k in ("splits", "bad_records", "truncated", "dropped")}
  for split in summary["splits"].values():
    split.pop("shards")
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  cli.run(main, define_flags)
