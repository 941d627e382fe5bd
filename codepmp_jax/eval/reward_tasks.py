"""The reward-model evaluations (pairwise, multiple choice, Best-of-N) as functions returning
JSON-ready reports; `python -m codepmp_jax.eval MODE` is their command line.

Each takes a `scorer`: anything with `encode_texts(prompts, responses) -> [EncodedSequence]` and
`score_ids(token sequences) -> np.ndarray` (normally a `codepmp_jax.score.RewardScorer` on a
checkpoint, which cuts overlong texts by the checkpoint's truncation policy), so one loaded model
serves every mode. Every report says how many scored sequences lost prompt or response tokens
(`truncation`), reports ties beside the strict accuracy, and lists per-item scores (`per_item`)
so two reward models are compared by a paired bootstrap over the same items (`stats.compare`).
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Any, Protocol, Sequence

import numpy as np
import tqdm
from etils import epath

from codepmp_jax.data import loaders
from codepmp_jax.data.encode import EncodedSequence, truncation_report
from codepmp_jax.data.records import BadRecords
from codepmp_jax.eval import answers, bon, plots, stats

NO_GROUP = "(none)"


class Scorer(Protocol):
  def encode_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[EncodedSequence]:
    ...

  def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    ...


def _score(scorer: Scorer, prompts: Sequence[str], responses: Sequence[str]) -> tuple[np.ndarray, dict]:
  """Rewards of each (prompt, response) and the truncation report of what was scored."""
  encoded = scorer.encode_texts(prompts, responses)
  return np.asarray(scorer.score_ids([s.ids for s in encoded])), truncation_report(encoded)


def _accuracies(strict: np.ndarray, tie_aware: np.ndarray, seed: int) -> dict:
  """Strict accuracy (ties wrong) with its interval, and the tie-aware one with its interval."""
  tie_aware_summary = stats.summarize(tie_aware, seed=seed)
  return {**stats.summarize(strict, seed=seed), "accuracy_tie_aware": tie_aware_summary["accuracy"],
          "ci95_tie_aware": tie_aware_summary["ci95"]}


def _labels(value: Any) -> list[str]:
  """Group labels of a field value: a string, a list, or a `{label: true}` dict (LogiQA types)."""
  if value is None:
    return [NO_GROUP]
  if isinstance(value, dict):
    return [str(k) for k, v in value.items() if v] or [NO_GROUP]
  if isinstance(value, (list, tuple)):
    return [str(v) for v in value] or [NO_GROUP]
  return [str(value)]


def _no_records(data: str, format: str, bad: BadRecords) -> ValueError:
  """One line: the commonest bad kind with its first file:line, the format the records fit."""
  return ValueError(f"{loaders.nothing_loaded([data], format, bad)}; check --data and --format")


def _item_ids(records: Sequence[Any], kept: Sequence[int]) -> list[str]:
  """The records' ids where every record has a distinct one, else their positions in the data."""
  ids = [r.id for r in records]
  if None in ids or len(set(ids)) < len(ids):
    return [str(i) for i in kept]
  return [str(ids[i]) for i in kept]


def pairwise(scorer: Scorer, data: str, format: str, by: str = "source",
             limit: int | None = None, strict: bool = False, seed: int = 0) -> dict:
  """Pairwise accuracy, strict (ties wrong, as RewardBench) and tie-aware (a tie scores 0.5), with
  bootstrap intervals, the tie count, mean margin and a breakdown by `meta[by]`.

  Pairs whose two sequences are token-identical once cut to the scorer's length carry no
  preference: they are skipped and counted (`identical_after_truncation`), not scored.
  """
  bad = BadRecords(strict=strict)
  records = list(itertools.islice(
      loaders.load_records([data], format, bad, loaders.LoaderOptions(seed=seed)), limit))
  if not records:
    raise _no_records(data, format, bad)
  encoded = scorer.encode_texts([r.prompt for r in records] * 2,
                                [r.chosen for r in records] + [r.rejected for r in records])
  sides = list(zip(encoded[:len(records)], encoded[len(records):]))
  kept = [i for i, (c, r) in enumerate(sides) if c.ids != r.ids]
  if not kept:
    raise ValueError(f"{data}: all {len(records)} pairs are token-identical at the scored length; "
                     "score at a longer --max_length")
  # Both sides in one call, so the scorer's length buckets batch chosen and rejected together.
  rewards = np.asarray(scorer.score_ids([sides[i][0].ids for i in kept] + [sides[i][1].ids for i in kept]))
  chosen, rejected = rewards[:len(kept)], rewards[len(kept):]
  strict_scores, tie_aware = stats.pairwise_scores(chosen, rejected)
  groups = [_labels((records[i].meta or {}).get(by)) for i in kept]
  return {
      "mode": "pairwise", "data": str(data), "format": format,
      **_accuracies(strict_scores, tie_aware, seed),
      "ties": int((chosen == rejected).sum()),
      "identical_after_truncation": len(records) - len(kept),
      "mean_margin": float(np.mean(chosen - rejected)),
      "truncation": truncation_report([s for i in kept for s in sides[i]]),
      "by": by, "breakdown": stats.breakdown(strict_scores, groups, seed=seed),
      "bad_records": bad.to_dict(),
      "per_item": {"id": _item_ids(records, kept), "strict": strict_scores.tolist(),
                   "tie_aware": tie_aware.tolist()},
  }


def _grouped_rewards(scorer: Scorer, prompts: Sequence[str],
                     groups: Sequence[Sequence[str]]) -> tuple[list[np.ndarray], dict]:
  """Rewards of every response of each group under its prompt, and the truncation report."""
  flat, truncation = _score(scorer, [p for p, g in zip(prompts, groups) for _ in g],
                            [text for g in groups for text in g])
  return np.split(flat, np.cumsum([len(g) for g in groups])[:-1]), truncation


def best_of_n(candidates: str, task: str, ns: Sequence[int], scorer: Scorer | None = None,
              scores: str | None = None, num_draws: int = 100, seed: int = 0,
              limit: int | None = None, sympy_timeout_s: float = 5.0,
              plot_path: str | os.PathLike | None = None,
              save_scores: str | os.PathLike | None = None) -> dict:
  """Best-of-N accuracy of rm / random / majority / oracle for each N (see `bon`).

  Rewards come from `scores` (lines `{"id", "rewards"}`) when given, else from `scorer`;
  `save_scores` writes them in that format so a rerun can skip scoring.
  """
  if (scorer is None) == (scores is None):
    raise ValueError("give exactly one of a scorer (--checkpoint) or --scores")
  questions = bon.load_candidates(candidates)[:limit]
  truncation = None  # unknown when the rewards come from a file
  if scores is not None:
    rewards = bon.load_scores(scores, questions)
  else:
    rewards, truncation = _grouped_rewards(scorer, [q.prompt for q in questions],
                                           [q.candidates for q in questions])
  if save_scores is not None:
    epath.Path(save_scores).write_text("".join(
        json.dumps({"id": q.id, "rewards": [float(x) for x in r]}) + "\n" for q, r in zip(questions, rewards)))
  with answers.AnswerChecker(task, sympy_timeout_s) as checker:
    unanswered = 0
    for q in tqdm.tqdm(questions, desc="grading", unit="question", leave=False):
      unanswered += bon.grade([q], checker)
    sympy_counts = checker.sympy_counts()
  results, per_item = bon.best_of_n(questions, rewards, ns, num_draws, seed)
  report = {
      "mode": "bon", "candidates": str(candidates), "task": task,
      "rewards_from": str(scores) if scores is not None else "checkpoint",
      "questions": len(questions), "draws": num_draws, "seed": seed,
      "candidates_without_answer": unanswered, **sympy_counts,
      "truncation": truncation, "bon": results, "per_item": per_item,
  }
  if plot_path is not None:
    report["plot"] = str(plots.plot_bon(results, plot_path, title=f"Best-of-N on {task}"))
  return report


def _row_field(path: str, by: str) -> dict[str, Any]:
  """`row[by]` of every row of a logic file, keyed like `MultipleChoice.id`."""
  out = {}
  for where, obj in loaders.rows(path, BadRecords()):
    key = obj.get("id", obj.get("id_string"))
    file, _, line = where.rpartition(":")
    out[str(key) if key is not None else f"{epath.Path(file).name}:{line}"] = obj.get(by)
  return out


def multiple_choice(scorer: Scorer, data: str, format: str, by: str = "type",
                    limit: int | None = None, strict: bool = False, seed: int = 0) -> dict:
  """Accuracy of picking the highest-reward option (logic template), overall and by `row[by]`:
  strict (a tie at the top is wrong) and tie-aware (a uniform pick among the tied), with the tie
  count. A LogiQA 2.0 question of several reasoning types counts in each of them.
  """
  if format not in ("logiqa2", "reclor"):
    raise ValueError(f"mc needs format logiqa2 or reclor, got {format!r}")
  bad = BadRecords(strict=strict)
  items = list(itertools.islice(loaders.load_multiple_choice([data], bad), limit))
  if not items:
    raise _no_records(data, format, bad)
  rewards, truncation = _grouped_rewards(scorer, [item.prompt for item in items],
                                         [item.options for item in items])
  strict_scores, tie_aware = stats.top_pick_scores(rewards, [item.answer for item in items])
  field = _row_field(data, by)
  groups = [_labels(field.get(item.id)) for item in items]
  return {
      "mode": "mc", "data": str(data), "format": format,
      **_accuracies(strict_scores, tie_aware, seed),
      "ties": int(sum((r == r.max()).sum() > 1 for r in rewards)),
      "truncation": truncation,
      "by": by, "breakdown": stats.breakdown(strict_scores, groups, seed=seed),
      "bad_records": bad.to_dict(),
      "per_item": {"id": [item.id for item in items], "strict": strict_scores.tolist(),
                   "tie_aware": tie_aware.tolist()},
  }
