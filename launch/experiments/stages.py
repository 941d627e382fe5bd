"""The stages the experiments are made of: train, prepare, Best-of-N candidates, evaluate.

The demo (`launch/experiments/demo.py`), the sample-efficiency experiment and the others under
launch/experiments/ are built from these. Every stage skips itself when its output is complete
(a finished workdir: `codepmp_jax.workdir.is_finished`), so rerunning an experiment reuses
finished work. The training configs come from configs/ through `codepmp_jax.config.load_config`.
"""
from __future__ import annotations

import json
import logging
import random

import ml_collections
from etils import epath

from codepmp_jax import checkpoint, train
from codepmp_jax import workdir as workdir_lib
from codepmp_jax.data import gsm8k, prepare
from codepmp_jax.data.prepared import MANIFEST


def train_once(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  """Trains in `workdir` unless a finished run is there; returns its summary (final metrics)."""
  if workdir_lib.is_finished(workdir):
    logging.info("reusing the finished run in %s", workdir)
  else:
    train.train(config, workdir)
  return workdir_lib.read_summary(workdir)


def first_lines(source: epath.Path, out: epath.Path, limit: int) -> epath.Path:
  """The first `limit` lines of a JSONL file (a deterministic subset of a data set)."""
  if not out.is_file():
    out.parent.mkdir(parents=True, exist_ok=True)
    with source.open() as f:
      lines = [line for _, line in zip(range(limit), f)]
    out.write_text("".join(lines))
  return out


def prepare_once(inputs: list[epath.Path], fmt: str, tokenizer: str | epath.Path,
                 out: epath.Path, seq_len: int, split: str, num_rejected: int = 1) -> epath.Path:
  """Prepared shards of `inputs` in `out` (skipped when its manifest exists)."""
  if not (out / MANIFEST).is_file():
    prepare.prepare(prepare.PrepareSettings(
        inputs=tuple(str(p) for p in inputs), format=fmt, tokenizer=str(tokenizer), seq_len=seq_len,
        out=str(out), split=split, num_rejected=num_rejected))
  return out


def bon_candidates(source: epath.Path, out: epath.Path, limit: int, n: int, seed: int = 0
                   ) -> epath.Path:
  """A Best-of-N candidates file from GSM8K without a generator: per question, the reference
  solution and up to n-1 consistently wrong variants of it (`data.gsm8k`), in a seeded order.

  On a CPU this stands in for sampling N solutions from a generator model; the file has the
  format `python -m codepmp_jax.sample_candidates` writes, so the real thing drops in unchanged.
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


def evaluate_rm(ckpt: epath.Path, out: epath.Path, *, gsm8k_pairs: epath.Path | None = None,
                logiqa: epath.Path | None = None, candidates: epath.Path | None = None,
                ns: tuple[int, ...] = (1, 2, 4), limit: int | None = None, bon_task: str = "gsm8k",
                batch_size: int = 32, max_length: int = 512) -> dict:
  """Held-out pairwise accuracy, LogiQA 2.0 multiple choice and Best-of-N of one checkpoint.

  `bon_task` names the answer checker of the candidates (`gsm8k`, or `champ` for CHAMP's).
  """
  if out.is_file():
    return json.loads(out.read_text())
  from codepmp_jax.eval import reward_tasks
  from codepmp_jax.score import RewardScorer
  scorer = RewardScorer(ckpt, batch_size=batch_size, max_length=max_length, show_progress=False)
  report = {"checkpoint": str(ckpt), "step": checkpoint.latest_train_step(ckpt)}
  if gsm8k_pairs is not None:
    report["pairwise"] = reward_tasks.pairwise(scorer, str(gsm8k_pairs), "gsm8k", limit=limit)
  if logiqa is not None:
    report["mc"] = reward_tasks.multiple_choice(scorer, str(logiqa), "logiqa2", limit=limit)
  if candidates is not None:
    report["bon"] = reward_tasks.best_of_n(str(candidates), bon_task, ns, scorer=scorer)["bon"]
  out.write_text(json.dumps(report, indent=1))
  return report
