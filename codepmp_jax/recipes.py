"""Multi-stage runs made of the stage commands: PMP, RM fine-tuning, evaluation.

The demo (`python -m codepmp_jax.demo`) and the sample-efficiency experiment
(`launch/experiments/sample_efficiency.py`) are built from these. Every stage skips itself when its
output is complete, so rerunning a recipe reuses finished work.
"""
from __future__ import annotations

import json
import logging
import pathlib
import random

import ml_collections

from codepmp_jax import checkpoint, train
from codepmp_jax.data import gsm8k, prepare
from codepmp_jax.data.builtin import SHARED_DATA



def train_once(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Trains in `workdir` unless a finished run is there; returns its final metrics."""
  summary = workdir / "summary.json"
  if summary.is_file() and json.loads(summary.read_text()).get("finished"):
    logging.info("reusing the finished run in %s", workdir)
    return json.loads(summary.read_text())
  train.train(config, workdir)
  return json.loads(summary.read_text())


def first_lines(source: pathlib.Path, out: pathlib.Path, limit: int) -> pathlib.Path:
  """The first `limit` lines of a JSONL file (a deterministic subset of a data set)."""
  if not out.is_file():
    out.parent.mkdir(parents=True, exist_ok=True)
    with source.open() as f:
      lines = [line for _, line in zip(range(limit), f)]
    out.write_text("".join(lines))
  return out


def prepare_once(inputs: list[pathlib.Path], fmt: str, tokenizer: str | pathlib.Path,
                 out: pathlib.Path, seq_len: int, split: str, num_rejected: int = 1) -> pathlib.Path:
  """Prepared shards of `inputs` in `out` (skipped when its manifest exists)."""
  if not (out / prepare.MANIFEST).is_file():
    prepare.prepare(prepare.PrepareSettings(
        inputs=tuple(str(p) for p in inputs), format=fmt, tokenizer=str(tokenizer), seq_len=seq_len,
        out=str(out), split=split, num_rejected=num_rejected))
  return out


def rm_config(pmp_config: ml_collections.ConfigDict, data: pathlib.Path, init_from: str,
              tokenizer: str, steps: int, lr: float) -> ml_collections.ConfigDict:
  """RM fine-tuning (BT loss only) of the PMP run's model shape, from `init_from` or from scratch.

  Both arms of a comparison get the same data, seed, schedule and shape; only the initial params
  differ.
  """
  config = ml_collections.ConfigDict(pmp_config.to_dict())
  config.init_from = init_from
  config.tokenizer = tokenizer
  config.data.builtin.name = ""
  config.data.path = str(data)
  config.loss.update(rm_coef=1.0, lm_coef=0.0)
  config.optimizer.update(lr=lr, schedule="wsd", warmup_ratio=0.1, decay_ratio=0.2)
  config.train.update(total_steps=steps, log_every=max(1, steps // 10), eval_every=steps,
                      eval_batches=4)
  config.checkpoint.update(save_every=steps, keep=1)
  return config


def bon_candidates(source: pathlib.Path, out: pathlib.Path, limit: int, n: int, seed: int = 0
                   ) -> pathlib.Path:
  """A Best-of-N candidates file from GSM8K without a generator: per question, the reference
  solution and up to n-1 consistently wrong variants of it (`data.gsm8k`), in a seeded order.

  On a CPU this stands in for sampling N solutions from a generator model; the file has the
  format `python -m codepmp_jax.generate` writes, so the real thing drops in unchanged.
  """
  if out.is_file():
    return out
  rng = random.Random(seed)
  lines = []
  with source.open() as f:
    for index, line in zip(range(limit), f):
      row = json.loads(line)
      try:
        pairs = gsm8k.make_pairs(row["answer"], seed, str(index), num_rejected=n - 1)
      except ValueError:
        continue  # counted below, like questions with fewer than n - 1 wrong variants
      if len(pairs.rejected) < n - 1:
        continue
      candidates = [pairs.chosen, *pairs.rejected]
      rng.shuffle(candidates)
      lines.append(json.dumps({"id": str(index), "question": row["question"],
                               "reference": row["answer"], "candidates": candidates}))
  logging.info("Best-of-N candidates: %d of the first %d questions have %d - 1 distinct wrong "
               "variants; the others are left out", len(lines), limit, n)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("\n".join(lines) + "\n")
  return out


def evaluate_rm(ckpt: pathlib.Path, out: pathlib.Path, *, gsm8k_pairs: pathlib.Path | None = None,
                logiqa: pathlib.Path | None = None, candidates: pathlib.Path | None = None,
                ns: tuple[int, ...] = (1, 2, 4), limit: int | None = None) -> dict:
  """Held-out pairwise accuracy, LogiQA 2.0 multiple choice and Best-of-N of one checkpoint."""
  if out.is_file():
    return json.loads(out.read_text())
  from codepmp_jax.eval import modes
  from codepmp_jax.score import RewardScorer
  scorer = RewardScorer(ckpt, batch_size=32, max_length=512)
  report = {"checkpoint": str(ckpt), "step": checkpoint.latest_train_step(ckpt)}
  if gsm8k_pairs is not None:
    report["pairwise"] = modes.pairwise(scorer, str(gsm8k_pairs), "gsm8k", limit=limit)
  if logiqa is not None:
    report["mc"] = modes.multiple_choice(scorer, str(logiqa), "logiqa2", limit=limit)
  if candidates is not None:
    report["bon"] = modes.best_of_n(str(candidates), "gsm8k", ns, scorer=scorer)["bon"]
  out.write_text(json.dumps(report, indent=1))
  return report
