"""Data throughput: `prepare` against Hugging Face `datasets`, and the Grain and tf.data readers
against the reader they replaced and against what an accelerator consumes.

  python -m benchmarks.data_pipeline [--pairs=20000] [--steps=200] [--noprepare_peer]

Records: code-preference pairs built from this Python's standard library (a function with a
docstring: the docstring in the code template is the prompt, the function is chosen, the function
with its body lines in another order is rejected), tokenized by a sentencepiece model trained on
the same code.
- prepare: ours = `codepmp_jax.data.prepare` (load, split, spill, tokenize, write the TFDS
  ArrayRecord shards); peer = `datasets.Dataset.from_json` + `.map(num_proc=cores)` running the
  same tokenizer and truncation (`encode.fit_pair`), writing its Arrow cache.
- readers: pairs/s of host batches (`pipeline.PairBatches`, prefetch 4) with `data.reader=grain`
  and `tfdata`, unpacked at the tiny config's shape (32 pairs x 256, bucketed) and packed at the
  paper's (256 pairs x 1024, rows of 2048). Against the reader they replaced (our own token shards,
  1354 batches/s of 32 x 256 = 43,328 pairs/s on this 2-core machine, loaded, Nov 2026:
  docs/performance.md's history) and against what one TPU v4 host (4 chips x 275 TFLOP/s bf16) consumes
  training qwen2_1_5b at 50% MFU on the packed batches measured here (`flops.packed_step_flops`).
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import sysconfig
import tempfile
import time

from absl import app, flags

from benchmarks import common
from codepmp_jax import cli, metrics
from codepmp_jax.data import pipeline, prepare
from codepmp_jax.data.encode import EncodeStats, fit_pair
from codepmp_jax.data.templates import render
from codepmp_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from codepmp_jax.model import flops
from codepmp_jax.model.config import get_preset

# The replaced reader (own token shards): 1354 batches/s of 32 pairs x 256 tokens (2-core machine,
# loaded, Nov 2026; docs/performance.md's history).
OLD_READER_PAIRS_PER_S = 1354 * 32


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


def reader_pairs_per_second(data_dir: str, reader: str, pack: bool, global_batch: int,
                            seq_len: int, steps: int) -> tuple[float, dict]:
  """(pairs/s over `steps` host batches after the first, the last batch) of one reader."""
  cfg = pipeline.default_data_config()
  cfg.update(path=data_dir, prefetch=4, reader=reader, pack=pack)
  it = pipeline.PairBatches(cfg, split="train", global_batch=global_batch, seq_len=seq_len,
                            sharding=None, seed=0, repeat=True, process_index=0, process_count=1)
  batch = next(it)
  pairs, start = 0, time.perf_counter()
  for _ in range(steps):
    batch = next(it)
    pairs += int(batch["pair_valid"].sum()) if pack else len(batch["margin"])
  rate = pairs / (time.perf_counter() - start)
  it.close()
  return rate, batch


def v4_host_pairs_per_second(batch: dict, pairs_per_row: int) -> float:
  """Pairs/s one TPU v4 host (4 chips) trains qwen2_1_5b on at 50% MFU, on packed batches like
  `batch` (its shape and pairs)."""
  config = get_preset("qwen2_1_5b")
  rows, row_len = batch["input_ids"].shape
  step_flops = flops.packed_step_flops(config, rows, row_len, batch["lm_index"].shape[1],
                                       2 * pairs_per_row, batch["sequence_index"].shape[2], True)
  return 4 * metrics.device_peak_flops("TPU v4") * 0.5 / (step_flops / batch["pair_valid"].sum())


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The benchmark's sizes (defined only when run as a program)."""
  flags.DEFINE_integer("pairs", 20000, "Pairs to prepare.")
  flags.DEFINE_integer("steps", 200, "Host batches timed per reader and shape.")
  flags.DEFINE_integer("workers", 1, "Our tokenizer processes (1: in-process, the tokenizer's "
                       "threads use every core).")
  flags.DEFINE_integer("peer_workers", os.cpu_count(), "The peer's num_proc.")
  flags.DEFINE_bool("prepare_peer", True, "Also time the Hugging Face `datasets` prepare.")


def main(argv: list[str]) -> None:
  """Prepares the pairs, times the readers and prints the tables."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")

  tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_data_"))
  records = stdlib_pairs(FLAGS.pairs)
  path = tmp / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  tokenizer = train_sentencepiece([r["chosen"] for r in records], 8000, tmp / "spm")
  tokenizer_path = str(tmp / "spm.model")
  print(f"data_pipeline: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} "
        f"cores; {len(records)} stdlib code pairs, {path.stat().st_size / 1e6:.1f} MB; tokenizer "
        f"vocab {tokenizer.vocab_size}")

  prepared = {}
  for seq_len in (1024, 256):
    settings = prepare.PrepareSettings(inputs=(str(path),), format="pairs", tokenizer=tokenizer_path,
                                       seq_len=seq_len, out=str(tmp / f"ours_{seq_len}"),
                                       num_shards=4, split="train:1", num_workers=FLAGS.workers)
    start = time.perf_counter()
    manifest = prepare.prepare(settings)
    prepared[seq_len] = (settings.out, time.perf_counter() - start, manifest)
  pairs = prepared[1024][2]["splits"]["train"]["pairs"]
  if FLAGS.prepare_peer:
    peer_ds, peer_seconds = peer_prepare(str(path), tokenizer_path, 1024, str(tmp / "hf_cache"),
                                         FLAGS.peer_workers)
    assert len(peer_ds) == pairs, (len(peer_ds), pairs)
    ours = pairs / prepared[1024][1]
    print(common.format_table(("prepare, seq_len 1024", "ours pairs/s", "HF datasets pairs/s", "ours/peer"),
                              [("tokenize + write", ours, pairs / peer_seconds, ours * peer_seconds / pairs)]))

  rows = []
  for name, pack, batch, seq_len in (("unpacked 32 x 256", False, 32, 256),
                                     ("packed 256 x 1024", True, 256, 1024)):
    rates = {}
    for reader in pipeline.READERS:
      rates[reader], last = reader_pairs_per_second(prepared[seq_len][0], reader, pack, batch,
                                                    seq_len, FLAGS.steps)
    need = v4_host_pairs_per_second(last, pipeline.default_data_config().pack_pairs_per_row) if pack else None
    rows.append((name, rates["grain"], rates["tfdata"], rates["grain"] / OLD_READER_PAIRS_PER_S,
                 rates["tfdata"] / OLD_READER_PAIRS_PER_S,
                 f"{rates['grain'] / need:.1f}x of {need:.0f}" if need else "-"))
  print(common.format_table(
      ("reader pairs/s (one process)", "grain", "tfdata", "grain / old reader", "tfdata / old reader",
       "grain / v4 host need (qwen2_1_5b, 50% MFU)"), rows))
  print(f"old reader: {OLD_READER_PAIRS_PER_S} pairs/s (32 x 256, Nov 2026, docs/performance.md's history)")


if __name__ == "__main__":
  cli.run(main, define_flags)
