"""Scoring throughput: `codepmp_jax.score.RewardScorer` against transformers scoring the same records.

  python -m benchmarks.score                                  # tiny, 256 GSM8K records
  python -m benchmarks.score --shape=smollm2_135m --num_records=512 --max_length=1024

Records: GSM8K test questions + reference solutions (`../shared/data/gsm8k/test.jsonl`, the math
template), tokenized by a sentencepiece model trained on them, cut to `--max_length`. One random
model is saved as our checkpoint and exported with `codepmp_jax.convert.save_hf`; transformers loads
that `*ForSequenceClassification` directory. Both sides get the same token ids and batch size;
the peer is given the same help ours has (sequences sorted by length, each batch padded to its
longest, `torch.inference_mode`), so the comparison is of the forward passes. Each side scores the
records once untimed (compiles every length bucket), then `--repeats` rounds score them once per
side in turn; each side's median time is reported, and the ratio as the median of the rounds'
ratios (a round's two sides see the same machine speed), with the largest reward difference
between the sides as a correctness check.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from codepmp_jax import checkpoint, cli, convert
from codepmp_jax.data import registry, templates
from codepmp_jax.data.encode import encode_sequence
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset
from codepmp_jax.score import RewardScorer

SETTLE_SECONDS = 0.5  # pause before each timed run (`_interleaved`)


def gsm8k_texts(num_records: int) -> list[tuple[str, str]]:
  path = registry.path("gsm8k/test")
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      out.append((templates.render("math", question=record["question"]), record["answer"]))
      if len(out) == num_records:
        break
  return out


class PeerScorer:
  """transformers `AutoModelForSequenceClassification`, sorted by length, batches padded to their longest."""

  def __init__(self, hf_dir: pathlib.Path, batch_size: int, pad_id: int):
    import torch
    import transformers
    self.torch = torch
    self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    self.batch_size, self.pad_id = batch_size, pad_id

  def score_ids(self, sequences: list[list[int]]) -> np.ndarray:
    torch = self.torch
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    rewards = np.zeros(len(sequences), np.float32)
    with torch.inference_mode():
      for start in range(0, len(order), self.batch_size):
        rows = order[start:start + self.batch_size]
        length = len(sequences[rows[0]])
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, i in enumerate(rows):
          ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
          mask[row, :len(sequences[i])] = 1
        rewards[rows] = self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().numpy()
    return rewards


def _interleaved(sides: dict[str, Callable[[], np.ndarray]], repeats: int
                 ) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
  """Each side's seconds in `repeats` rounds, and its rewards. A round runs every side once in
  turn, so a drift in the machine's speed (tens of percent over minutes on a shared VM) reaches
  both sides of a round alike; each side first runs once untimed (compiles ours, warms the peer).
  Each timed run starts `SETTLE_SECONDS` after the last, so that the other runtime's worker
  threads, which spin a while after their work, have gone idle (`benchmarks.train_step`)."""
  rewards = {name: fn() for name, fn in sides.items()}
  times: dict[str, list[float]] = {name: [] for name in sides}
  for _ in range(repeats):
    for name, fn in sides.items():
      time.sleep(SETTLE_SECONDS)
      start = time.perf_counter()
      rewards[name] = fn()
      times[name].append(time.perf_counter() - start)
  return times, rewards


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The benchmark's sizes (defined only when run as a program)."""
  flags.DEFINE_string("shape", "tiny", "Model preset (vocab_size is set to the tokenizer's).")
  flags.DEFINE_integer("num_records", 256, "GSM8K records scored.")
  flags.DEFINE_integer("batch_size", 16, "Sequences per batch (both sides).")
  flags.DEFINE_integer("max_length", 512, "Tokens per sequence.")
  flags.DEFINE_integer("vocab_size", 2000, "Sentencepiece pieces.")
  flags.DEFINE_integer("repeats", 7, "Timed rounds (each scores the records once per side).")
  flags.DEFINE_multi_string("model", [], "FIELD=VALUE: a ModelConfig override (repeatable).")


def main(argv: list[str]) -> None:
  """Scores the records with both sides and prints the table."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import torch
  torch.set_num_threads(os.cpu_count())

  texts = gsm8k_texts(FLAGS.num_records)
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    tokenizer = train_sentencepiece([p + r for p, r in texts], FLAGS.vocab_size, root / "spm")
    sequences = [list(encode_sequence(tokenizer, p, r, FLAGS.max_length).ids) for p, r in texts]
    config = get_preset(FLAGS.shape, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id, param_dtype="float32", dtype="float32",
                        **dict(common.parse_overrides(FLAGS.model)))
    params = nn.unbox(transformer.init_params(config, jax.random.key(0)))
    ckpt = checkpoint.save_model(root / "ckpt", params, config, tokenizer)
    hf_dir = convert.save_hf(root / "hf", jax.device_get(params), config, tokenizer)
    del params

    peer = PeerScorer(hf_dir, FLAGS.batch_size, tokenizer.pad_id)
    ours = RewardScorer(ckpt, batch_size=FLAGS.batch_size, max_length=FLAGS.max_length,
                        mesh_shape=(1, 1, 1) if len(jax.devices()) == 1 else (-1, 1, 1),
                        show_progress=False)
    times, rewards = _interleaved({"ours": lambda: ours.score_ids(sequences),
                                   "transformers": lambda: peer.score_ids(sequences)}, FLAGS.repeats)

  lengths = np.array([len(s) for s in sequences])
  tokens = int(lengths.sum())
  seconds = {name: statistics.median(t) for name, t in times.items()}
  rows = [(name, seconds[name], len(sequences) / seconds[name], tokens / seconds[name]) for name in times]
  ratios = np.array(times["transformers"]) / np.array(times["ours"])
  print("\n".join([
      f"score: {jax.default_backend()} ({jax.devices()[0].device_kind}), {FLAGS.shape}, "
      f"{len(sequences)} GSM8K records (length median {int(np.median(lengths))}, max {lengths.max()}), "
      f"batch {FLAGS.batch_size}, {FLAGS.repeats} interleaved rounds; jax {jax.__version__}, "
      f"torch {torch.__version__}",
      "", common.format_table(("side", "median s", "records/s", "tokens/s"), rows), "",
      f"ratio (ours / transformers): {np.median(ratios):.2f}x, the median of the rounds' ratios "
      f"(range {ratios.min():.2f}-{ratios.max():.2f}x); "
      f"max |reward difference| {float(np.abs(rewards['ours'] - rewards['transformers']).max()):.2e}"]))


if __name__ == "__main__":
  cli.run(main, define_flags)
