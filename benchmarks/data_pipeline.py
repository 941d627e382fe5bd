"""Data throughput: `prepare` and the input pipeline against Hugging Face `datasets` on the same pairs.

  python -m benchmarks.data_pipeline [--pairs=20000] [--batches=300] [--notrain_step]

Records: code-preference pairs built from this Python's standard library (a function with a
docstring: the docstring in the code template is the prompt, the function is chosen, the function
with its body lines in another order is rejected), tokenized by a sentencepiece model trained on
the same code. Both sides use every core.
- prepare: ours = `codepmp_jax.data.prepare` (load, split, spill, tokenize in worker processes,
  write memory-mapped token shards); peer = `datasets.Dataset.from_json` +
  `.map(num_proc=cores)` running the same tokenizer and the same truncation (`encode.fit_pair`),
  writing its Arrow cache.
- pipeline: batches/s of shuffled, padded `[B, 2, L]` host batches; ours = `pipeline.build_pipeline`
  over the prepared shards; peer = the mapped `datasets.Dataset`, `.shuffle(seed).iter(B)` and a
  numpy padding collator (what a PyTorch-style loader does). At the tiny config's shape
  (configs/tiny.py: 32 pairs x 256 tokens) and a 1024-token one (16 x 1024).
- the tiny config's train step (`benchmarks.train_step.Ours`), to show how many batches/s training
  consumes (target: the pipeline at least 20x faster).
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import sysconfig
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import common
from codepmp_jax import cli
from codepmp_jax.data import pipeline, prepare
from codepmp_jax.data.encode import EncodeStats, fit_pair
from codepmp_jax.data.templates import render
from codepmp_jax.data.tokenizer import load_tokenizer, train_sentencepiece

SHAPES = {"tiny (32 x 256)": (32, 256), "1024-token (16 x 1024)": (16, 1024)}


def stdlib_pairs(limit: int) -> list[dict]:
  """Code pairs from the standard library's documented functions (deterministic order)."""
  pairs = []
  for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
    try:
      source = path.read_text(encoding="utf-8")
      tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    source_lines = source.splitlines()
    for node in ast.walk(tree):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      doc = ast.get_docstring(node)
      lines = source_lines[node.lineno - 1:node.end_lineno]
      if not doc or len(lines) < 4:
        continue
      code = "\n".join(lines)
      rejected = "\n".join(lines[:1] + lines[:0:-1])
      if rejected == code:
        continue
      pairs.append({"prompt": render("code", query=doc), "chosen": code, "rejected": rejected})
      if len(pairs) == limit:
        return pairs
  return pairs


_PEER: dict = {}


def _peer_map(batch: dict, tokenizer_path: str, seq_len: int) -> dict:
  """The peer's `datasets.map` function: the same tokenizer calls and truncation as ours."""
  if "tokenizer" not in _PEER:
    _PEER["tokenizer"] = load_tokenizer(tokenizer_path)
  tokenizer = _PEER["tokenizer"]
  n = len(batch["prompt"])
  joined = tokenizer.encode_joined_batch(batch["prompt"] * 2, batch["chosen"] + batch["rejected"])
  out = {"chosen_ids": [], "rejected_ids": [], "response_start": []}
  for i in range(n):
    pair = fit_pair(joined[i], joined[n + i], None, tokenizer.eos_id, seq_len, "keep_end", EncodeStats())
    out["chosen_ids"].append(list(pair.chosen.ids))
    out["rejected_ids"].append(list(pair.rejected.ids))
    out["response_start"].append([pair.chosen.response_start, pair.rejected.response_start])
  return out


def peer_prepare(path: str, tokenizer_path: str, seq_len: int, cache: str, workers: int):
  import datasets
  datasets.disable_progress_bars()
  start = time.perf_counter()
  ds = datasets.Dataset.from_json(path, cache_dir=cache)
  ds = ds.map(_peer_map, batched=True, batch_size=512, num_proc=workers, remove_columns=ds.column_names,
              fn_kwargs={"tokenizer_path": tokenizer_path, "seq_len": seq_len})
  return ds, time.perf_counter() - start


def peer_batches(ds, batch: int, seq_len: int, pad_id: int, count: int) -> float:
  """Batches/s of the peer: shuffled `datasets` rows padded into the contract layout."""
  start = time.perf_counter()
  made = 0
  while made < count:
    for rows in ds.shuffle(seed=made).iter(batch_size=batch, drop_last_batch=True):
      ids = np.full((batch, 2, seq_len), pad_id, np.int32)
      attention = np.zeros((batch, 2, seq_len), np.int32)
      lm = np.zeros((batch, 2, seq_len), np.int32)
      for i in range(batch):
        for j, name in enumerate(("chosen_ids", "rejected_ids")):
          seq = rows[name][i]
          ids[i, j, :len(seq)] = seq
          attention[i, j, :len(seq)] = 1
        lm[i, 0, max(rows["response_start"][i][0], 1):len(rows["chosen_ids"][i])] = 1
      made += 1
      if made == count:
        break
  return count / (time.perf_counter() - start)


def our_batches(data_dir: str, batch: int, seq_len: int, count: int) -> tuple[float, float]:
  """(seconds to build the pipeline, batches/s after that)."""
  cfg = pipeline.default_data_config()
  cfg.update(path=data_dir, prefetch=4)
  start = time.perf_counter()
  it = pipeline.build_pipeline(cfg, split="train", global_batch=batch, seq_len=seq_len, sharding=None,
                               seed=0, repeat=True)
  built = time.perf_counter() - start
  next(it)
  start = time.perf_counter()
  for _ in range(count):
    next(it)
  rate = count / (time.perf_counter() - start)
  it.close()
  return built, rate


def tiny_step_seconds(vocab_size: int, batch: int, seq_len: int, steps: int = 3) -> float:
  """Median seconds of one train step of configs/tiny.py's model at its batch shape."""
  from benchmarks.train_step import Ours, synthetic_batch
  from codepmp_jax.model.config import get_preset
  from configs.tiny import get_config

  fields = {k: v for k, v in get_config().model.to_dict().items() if k != "vocab_size"}
  config = get_preset("tiny", **{**fields, "vocab_size": vocab_size})
  runner = Ours(config, synthetic_batch(config, batch, seq_len))
  runner.step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    runner.step()
    times.append(time.perf_counter() - start)
  runner.close()
  return float(np.median(times))


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The benchmark's sizes (defined only when run as a program)."""
  flags.DEFINE_integer("pairs", 20000, "Pairs to prepare.")
  flags.DEFINE_integer("batches", 300, "Batches timed per pipeline.")
  flags.DEFINE_integer("workers", 1, "Our tokenizer processes (1: in-process, the tokenizer's "
                       "threads use every core).")
  flags.DEFINE_integer("peer_workers", os.cpu_count(), "The peer's num_proc.")
  flags.DEFINE_bool("train_step", True, "Also time the tiny config's train step.")


def main(argv: list[str]) -> None:
  """Prepares the pairs both ways, times both pipelines (and the train step) and prints the table."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")

  tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_data_"))
  records = stdlib_pairs(FLAGS.pairs)
  path = tmp / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  tokenizer = train_sentencepiece([r["chosen"] for r in records], 8000, tmp / "spm")
  tokenizer_path = str(tmp / "spm.model")
  print(f"{len(records)} stdlib code pairs, {path.stat().st_size / 1e6:.1f} MB; "
        f"tokenizer vocab {tokenizer.vocab_size}; ours: {FLAGS.workers} process(es), "
        f"peer: num_proc={FLAGS.peer_workers}; {os.cpu_count()} cores")

  rows, notes = [], []
  prepared = {}
  for seq_len in (1024, 256):
    settings = prepare.PrepareSettings(inputs=(str(path),), format="pairs", tokenizer=tokenizer_path,
                                       seq_len=seq_len, out=str(tmp / f"ours_{seq_len}"),
                                       num_shards=4, split="train:1", num_workers=FLAGS.workers)
    start = time.perf_counter()
    manifest = prepare.prepare(settings)
    prepared[seq_len] = (settings.out, time.perf_counter() - start, manifest)
  ours_seconds = prepared[1024][1]
  pairs = prepared[1024][2]["splits"]["train"]["pairs"]
  peer_ds, peer_seconds = peer_prepare(str(path), tokenizer_path, 1024, str(tmp / "hf_cache"),
                                          FLAGS.peer_workers)
  assert len(peer_ds) == pairs, (len(peer_ds), pairs)
  rows.append(("prepare pairs/s (seq 1024)", pairs / ours_seconds, pairs / peer_seconds,
               peer_seconds / ours_seconds))
  peer_256, _ = peer_prepare(str(path), tokenizer_path, 256, str(tmp / "hf_cache_256"), FLAGS.peer_workers)

  rates = {}
  for name, (batch, seq_len) in SHAPES.items():
    built, ours = our_batches(prepared[seq_len][0], batch, seq_len, FLAGS.batches)
    peer = peer_batches(peer_ds if seq_len == 1024 else peer_256, batch, seq_len,
                        tokenizer.pad_id, FLAGS.batches)
    rates[name] = ours
    rows.append((f"pipeline batches/s, {name}", ours, peer, ours / peer))
    notes.append(f"pipeline {name}: loading the shards took {built:.2f} s")

  print(common.format_table(("measure", "ours", "peer (HF datasets)", "ours/peer"), rows))
  for note in notes:
    print(note)
  print(f"ratio: prepare ours/peer = {rows[0][3]:.2f}x (target >= 1)")
  for name, value in zip(SHAPES, rows[1:]):
    print(f"ratio: pipeline {name} ours/peer = {value[3]:.1f}x")
  if FLAGS.train_step:
    batch, seq_len = SHAPES["tiny (32 x 256)"]
    seconds = tiny_step_seconds(tokenizer.vocab_size, batch, seq_len)
    consumed = 1 / seconds
    print(f"tiny config train step: {seconds:.3f} s -> consumes {consumed:.2f} batches/s")
    print(f"ratio: pipeline tiny / train-step consumption = "
          f"{rates['tiny (32 x 256)'] / consumed:.0f}x (target >= 20x)")


if __name__ == "__main__":
  cli.run(main, define_flags)
