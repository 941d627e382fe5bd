"""Real (non-pad) tokens per second of the PMP step on the lengths of real data: padded to `seq_len`,
bucketed, and packed batches of ours, beside the padded PyTorch peer fed the same pairs.

  python -m benchmarks.real_lengths                                   # tiny, seq_len 256
  python -m benchmarks.real_lengths --shape=smollm2_135m --seq_len=1024 --pairs=8 --num_pairs=64

Data, both real: stdlib code pairs (the built-in default's `synth --strategy=mutate`, synthesized
into `--cache` on first use and reused) and GSM8K pairs (`../shared/data/gsm8k/train.jsonl`, the
reference solution against a consistently wrong one), tokenized by one sentencepiece model trained
on both (also cached). Each data set's first `--num_pairs` pairs are trained on, in the same order,
by every mode:
  padded    ours, `--pairs` pairs per step one a row (`data.packing.pair_rows`), every sequence
            padded to `seq_len`;
  bucketed  ours, one pair a row, each step padded to the bucket (next multiple of 128) of its
            longest sequence;
  packed    ours, each step's pairs packed by `data.packing.pack_batch` into rows of `--row_len`
            tokens (default `2 * seq_len`, room for any pair), the row count in quarter-octave
            buckets, attention sequence by sequence and the LM head only at LM targets;
  shared    packed, with each pair's shared prompt laid out once (`share_prompt=True`);
  peer      transformers + torch (`benchmarks.train_step.Peer`), `--pairs` pairs per step padded
            to the longest sequence of the step, as TRL's collator does.
Every mode trains on the same pairs in the same `--pairs`-pair steps. Every shape is compiled (ours)
or run once (peer) before timing. Reported: real tokens / second
over all steps of the mode (the pairs' chosen and rejected tokens, the same count for every mode)
and the efficiency (tokens in the rows that are not padding / all row tokens). One side runs at
a time (see benchmarks/train_step.py).
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from benchmarks.train_step import LOSS, Peer, _optimizer_config
from codepmp_jax import cli, optim, sharding, step
from codepmp_jax.data import loaders, packing, registry
from codepmp_jax.data.encode import PairArrays, encode_records
from codepmp_jax.data.records import BadRecords, PairRecord
from codepmp_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from codepmp_jax.model import transformer
from codepmp_jax.model.config import ModelConfig, get_preset, resolve_attention

MODES = ("padded", "bucketed", "packed", "shared", "peer")
BUCKET = 128


def _stdlib_records(cache: pathlib.Path, num_pairs: int) -> list[PairRecord]:
  pairs_dir = cache / f"stdlib_{num_pairs}"
  if not (pairs_dir / "manifest.json").is_file():
    subprocess.run([sys.executable, "-m", "codepmp_jax.synth", "--source=stdlib", "--strategy=mutate",
                    f"--out={pairs_dir}", f"--max_pairs={num_pairs}", "--seed=0"],
                   check=True, stdout=subprocess.DEVNULL)
  records = []
  for shard in sorted(pairs_dir.glob("*.jsonl.gz")):
    with gzip.open(shard, "rt", encoding="utf-8") as f:
      records += [PairRecord(**{k: v for k, v in json.loads(line).items()
                                if k in ("prompt", "chosen", "rejected")}) for line in f]
  return records[:num_pairs]


def _gsm8k_records(num_pairs: int) -> list[PairRecord]:
  path = registry.path("gsm8k/train")
  records = []
  for record in loaders.load_gsm8k(str(path), BadRecords(), loaders.LoaderOptions()):
    records.append(record)
    if len(records) == num_pairs:
      break
  return records


def load_data(cache: pathlib.Path, num_pairs: int, seq_len: int, vocab_size: int) -> dict[str, PairArrays]:
  """data set name -> its first `num_pairs` pairs, tokenized and cut to `seq_len`."""
  cache.mkdir(parents=True, exist_ok=True)
  records = {"stdlib": _stdlib_records(cache, num_pairs), "gsm8k": _gsm8k_records(num_pairs)}
  spm = cache / f"spm_{vocab_size}_{num_pairs}"
  if not spm.with_suffix(".model").is_file():
    texts = [r.prompt + r.chosen for rs in records.values() for r in rs]
    train_sentencepiece(texts, vocab_size, spm)
  tokenizer = load_tokenizer(spm.with_suffix(".model"))
  return {name: PairArrays.from_pairs(encode_records(tokenizer, rs, seq_len)) for name, rs in records.items()}


def _take(arrays: PairArrays, indices) -> PairArrays:
  indices = np.asarray(indices, np.int64)
  tokens = [arrays.sequence(i, w) for i in indices for w in (0, 1)]
  return PairArrays.from_lengths(np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
                                 arrays.lengths[indices], arrays.response_start[indices],
                                 arrays.margin[indices])


def steps_of(arrays: PairArrays, pairs: int) -> list[PairArrays]:
  """Consecutive `pairs`-pair steps."""
  return [_take(arrays, range(start, start + pairs)) for start in range(0, len(arrays) - pairs + 1, pairs)]


def pair_row_batches(steps: list[PairArrays], seq_len: int, pad_id: int, mode: str) -> list[dict]:
  """Each step's pairs one a row, padded to seq_len, to their bucket, or to their longest sequence."""
  batches = []
  for part in steps:
    longest = int(part.lengths.max())
    length = {"padded": seq_len, "bucketed": min(-(-longest // BUCKET) * BUCKET, seq_len),
              "peer": longest}[mode]
    batches.append(packing.pair_rows(part, length, pad_id))
  return batches


def packed_batches(steps: list[PairArrays], row_len: int, max_pairs_per_row: int, pad_id: int,
                   share_prompt: bool) -> list[dict]:
  """Each step's pairs packed whole (`packing.pack_batch`)."""
  return [packing.pack_batch(part, row_len=row_len, max_pairs_per_row=max_pairs_per_row,
                             pad_id=pad_id, share_prompt=share_prompt).batch for part in steps]


def row_tokens_used(batch: dict) -> int:
  """Tokens of a batch's rows that are not padding."""
  return int((batch["segment_ids"] > 0).sum())


class OursRunner:
  """Our jitted step on one device, compiled for every batch shape before timing."""

  def __init__(self, config: ModelConfig):
    self.mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    optimizer = optim.make_optimizer(_optimizer_config(), total_steps=1000)
    _, state_sharding = step.state_shardings(config, optimizer, self.mesh, rules)
    shardings = step.batch_shardings(self.mesh, rules)
    self.shardings = shardings
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
      params = jax.jit(lambda: nn.unbox(transformer.init_params(config, jax.random.key(0))),
                       out_shardings=state_sharding.params)()
      opt_state = jax.jit(optimizer.init, out_shardings=state_sharding.opt_state)(params)
      self.state = step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
      self.fn = step.jit_train_step(step.make_train_step(transformer.RewardModel(config), optimizer, LOSS),
                                    state_sharding, shardings, self.mesh)

  def run(self, batch: dict) -> None:
    with jax.set_mesh(self.mesh):
      self.state, out = self.fn(self.state, jax.device_put(batch, self.shardings))
      jax.block_until_ready((self.state, out))


def measure(runner_step, batches: list[dict]) -> float:
  """Seconds for all batches, after one untimed run of each distinct shape."""
  seen = set()
  for batch in batches:
    shape = tuple(sorted((key, value.shape) for key, value in batch.items()))
    if shape not in seen:
      seen.add(shape)
      runner_step(batch)
  start = time.perf_counter()
  for batch in batches:
    runner_step(batch)
  return time.perf_counter() - start


def run_mode(mode: str, config: ModelConfig, batches: list[dict], steps: list[PairArrays],
             dtype: str) -> float:
  """Seconds of the mode over all steps (the peer trains on `steps`, ours on `batches`)."""
  if mode == "peer":
    peer = Peer(config, steps[0], dtype, remat=False)
    by_shape = {id(batch): part for batch, part in zip(batches, steps)}

    def peer_step(batch):
      peer.set_batch(by_shape[id(batch)], config.pad_token_id or 0)
      peer.step()
    seconds = measure(peer_step, batches)
    peer.close()
    return seconds
  return measure(OursRunner(config).run, batches)


FLAGS = flags.FLAGS
DATA_SETS = ("stdlib", "gsm8k")


def define_flags() -> None:
  """The benchmark's sizes (defined only when run as a program)."""
  flags.DEFINE_string("shape", "tiny", "Model preset (vocab_size is set to the tokenizer's).")
  flags.DEFINE_integer("seq_len", 256, "Sequence length of the padded and bucketed modes.")
  flags.DEFINE_integer("pairs", 8, "Pairs per step (every mode).")
  flags.DEFINE_integer("num_pairs", 32, "Pairs per data set (all modes train on them).")
  flags.DEFINE_integer("max_pairs_per_row", 8, "Packed mode: most pairs in one row.")
  flags.DEFINE_integer("row_len", 0, "Packed row length (0: 2 * seq_len).")
  flags.DEFINE_list("data", list(DATA_SETS), f"Data sets, of {','.join(DATA_SETS)}.")
  flags.DEFINE_list("modes", list(MODES), f"Modes, of {','.join(MODES)}.")
  flags.DEFINE_integer("vocab_size", 4000, "Sentencepiece pieces.")
  flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "Compute dtype.")
  flags.DEFINE_string("cache", "benchmarks_out/real_lengths",
                      "Where synthesized pairs and the tokenizer are kept between runs.")
  flags.DEFINE_multi_string("model", [], "FIELD=VALUE: a ModelConfig override (repeatable).")


def main(argv: list[str]) -> None:
  """Trains every mode on every data set's pairs and prints real tokens per second."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  data_sets = [d for d in FLAGS.data if d]
  modes = [m for m in FLAGS.modes if m]
  unknown = sorted(set(modes) - set(MODES)) + sorted(set(data_sets) - set(DATA_SETS))
  if unknown:
    raise app.UsageError(f"unknown modes or data sets: {unknown}")
  if FLAGS.num_pairs < FLAGS.pairs:
    raise app.UsageError("--num_pairs must be at least --pairs")
  import torch
  torch.set_num_threads(os.cpu_count())
  data = load_data(pathlib.Path(FLAGS.cache), FLAGS.num_pairs, FLAGS.seq_len, FLAGS.vocab_size)
  config = resolve_attention(get_preset(
      FLAGS.shape, vocab_size=FLAGS.vocab_size, dtype=FLAGS.dtype, param_dtype="float32",
      pad_token_id=0, **dict(common.parse_overrides(FLAGS.model))), jax.default_backend())
  lines = [f"real_lengths: {jax.default_backend()} ({jax.devices()[0].device_kind}), {FLAGS.shape}, "
           f"{FLAGS.dtype}, seq_len {FLAGS.seq_len}, {FLAGS.pairs} pairs (rows) per step, "
           f"{FLAGS.num_pairs} pairs per data set; jax {jax.__version__}, torch {torch.__version__}"]
  rows = []
  for name in data_sets:
    arrays = data[name]
    lengths = arrays.lengths.reshape(-1)
    lines.append(f"{name}: {len(arrays)} pairs, sequence length median {int(np.median(lengths))}, "
                 f"p90 {int(np.percentile(lengths, 90))}, max {int(lengths.max())}")
    usable = _take(arrays, range(len(arrays) // FLAGS.pairs * FLAGS.pairs))
    steps = steps_of(usable, FLAGS.pairs)
    for mode in modes:
      if mode in ("packed", "shared"):
        batches = packed_batches(steps, FLAGS.row_len or 2 * FLAGS.seq_len, FLAGS.max_pairs_per_row,
                                 0, share_prompt=mode == "shared")
      else:
        batches = pair_row_batches(steps, FLAGS.seq_len, 0, mode)
      tokens = int(usable.lengths.sum())
      efficiency = sum(row_tokens_used(b) for b in batches) / sum(b["input_ids"].size for b in batches)
      seconds = run_mode(mode, config, batches, steps, FLAGS.dtype)
      rows.append((name, mode, len(batches), tokens, f"{efficiency:.1%}", seconds, tokens / seconds))
  table = common.format_table(("data", "mode", "steps", "real tokens", "efficiency", "seconds",
                               "real tokens/s"), rows)
  speed = {(r[0], r[1]): r[-1] for r in rows}
  ratios = [f"{name}: {a} / {b} = {speed[name, a] / speed[name, b]:.2f}x"
            for name in data_sets for a, b in (("packed", "bucketed"), ("packed", "padded"),
                                               ("packed", "peer"), ("bucketed", "peer"),
                                               ("shared", "packed"), ("shared", "bucketed"),
                                               ("shared", "peer"))
            if (name, a) in speed and (name, b) in speed]
  print("\n".join(lines + ["", table, ""] + ratios))


if __name__ == "__main__":
  cli.run(main, define_flags)
