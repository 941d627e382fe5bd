"""The reward-model evaluations (pairwise, multiple choice, Best-of-N) as functions returning
JSON-ready reports; `python -m codepmp_jax.eval MODE` is their command line.

Each takes a `scorer`: anything with `score_texts(prompts, responses) -> np.ndarray` (normally a
`codepmp_jax.score.RewardScorer` on a checkpoint), so one loaded model serves every mode.
"""
from __future__ import annotations

import itertools
import json
import pathlib
from typing import Any, Protocol, Sequence

import numpy as np
import tqdm

from codepmp_jax.data import loaders
from codepmp_jax.data.records import BadRecords
from codepmp_jax.eval import answers, bon, plots, stats

NO_GROUP = "(none)"


class Scorer(Protocol):
  def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    ...


def _labels(value: Any) -> list[str]:
  """Group labels of a field value: a string, a list, or a `{label: true}` dict (LogiQA types)."""
  if value is None:
    return [NO_GROUP]
  if isinstance(value, dict):
    return [str(k) for k, v in value.items() if v] or [NO_GROUP]
  if isinstance(value, (list, tuple)):
    return [str(v) for v in value] or [NO_GROUP]
  return [str(value)]


def pairwise(scorer: Scorer, data: str, format: str, by: str = "source",
             limit: int | None = None, strict: bool = False, seed: int = 0) -> dict:
  """Pairwise accuracy (strict `>`), mean margin and bootstrap CI, with a breakdown by `meta[by]`."""
  bad = BadRecords(strict=strict)
  records = list(itertools.islice(
      loaders.load_records([data], format, bad, loaders.LoaderOptions(seed=seed)), limit))
  if not records:
    raise ValueError(f"{data}: no usable pairs in format {format!r}\n{bad.report()}")
  # Both sides in one call, so the scorer's length buckets batch chosen and rejected together.
  rewards = np.asarray(scorer.score_texts([r.prompt for r in records] * 2,
                                          [r.chosen for r in records] + [r.rejected for r in records]))
  chosen, rejected = rewards[:len(records)], rewards[len(records):]
  correct = stats.pairwise_correct(chosen, rejected)
  groups = [_labels((r.meta or {}).get(by)) for r in records]
  return {
      "mode": "pairwise", "data": str(data), "format": format,
      **stats.summarize(correct, seed=seed),
      "mean_margin": float(np.mean(chosen - rejected)),
      "by": by, "breakdown": stats.breakdown(correct, groups, seed=seed),
      "bad_records": bad.to_dict(),
  }


def _question_rewards(scorer: Scorer, questions: Sequence[bon.Question]) -> list[np.ndarray]:
  """Rewards of every candidate under its question's prompt."""
  prompts = [q.prompt for q in questions for _ in q.candidates]
  flat = np.asarray(scorer.score_texts(prompts, [c for q in questions for c in q.candidates]))
  splits = np.cumsum([len(q.candidates) for q in questions])[:-1]
  return np.split(flat, splits)


def best_of_n(candidates: str, task: str, ns: Sequence[int], scorer: Scorer | None = None,
              scores: str | None = None, num_draws: int = 100, seed: int = 0,
              limit: int | None = None, sympy_timeout_s: float = 5.0,
              plot_path: str | pathlib.Path | None = None,
              save_scores: str | pathlib.Path | None = None) -> dict:
  """Best-of-N accuracy of rm / random / majority / oracle for each N (see `bon`).

  Rewards come from `scores` (lines `{"id", "rewards"}`) when given, else from `scorer`;
  `save_scores` writes them in that format so a rerun can skip scoring.
  """
  if (scorer is None) == (scores is None):
    raise ValueError("give exactly one of a scorer (--checkpoint) or --scores")
  questions = bon.load_candidates(candidates)[:limit]
  rewards = (bon.load_scores(scores, questions) if scores is not None
             else _question_rewards(scorer, questions))
  if save_scores is not None:
    with open(save_scores, "w") as f:
      for q, r in zip(questions, rewards):
        f.write(json.dumps({"id": q.id, "rewards": [float(x) for x in r]}) + "\n")
  with answers.AnswerChecker(task, sympy_timeout_s) as checker:
    unanswered = 0
    for q in tqdm.tqdm(questions, desc="grading", unit="question", leave=False):
      unanswered += bon.grade([q], checker)
    sympy_counts = checker.sympy_counts()
  results = bon.best_of_n(questions, rewards, ns, num_draws, seed)
  report = {
      "mode": "bon", "candidates": str(candidates), "task": task,
      "rewards_from": str(scores) if scores is not None else "checkpoint",
      "questions": len(questions), "draws": num_draws, "seed": seed,
      "candidates_without_answer": unanswered, **sympy_counts,
      "bon": results,
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
    out[str(key) if key is not None else f"{pathlib.Path(file).name}:{line}"] = obj.get(by)
  return out


def multiple_choice(scorer: Scorer, data: str, format: str, by: str = "type",
                    limit: int | None = None, strict: bool = False, seed: int = 0) -> dict:
  """Accuracy of picking the highest-reward option (logic template), overall and by `row[by]`.

  Ties between options go to the first. A LogiQA 2.0 question of several reasoning types counts
  in each of them.
  """
  if format not in ("logiqa2", "reclor"):
    raise ValueError(f"mc needs format logiqa2 or reclor, got {format!r}")
  bad = BadRecords(strict=strict)
  items = list(itertools.islice(loaders.load_multiple_choice([data], bad), limit))
  if not items:
    raise ValueError(f"{data}: no usable questions\n{bad.report()}")
  prompts = [item.prompt for item in items for _ in item.options]
  flat = np.asarray(scorer.score_texts(prompts, [o for item in items for o in item.options]))
  splits = np.cumsum([len(item.options) for item in items])[:-1]
  picks = np.array([int(np.argmax(r)) for r in np.split(flat, splits)])
  correct = picks == np.array([item.answer for item in items])
  field = _row_field(data, by)
  groups = [_labels(field.get(item.id)) for item in items]
  return {
      "mode": "mc", "data": str(data), "format": format,
      **stats.summarize(correct, seed=seed),
      "by": by, "breakdown": stats.breakdown(correct, groups, seed=seed),
      "bad_records": bad.to_dict(),
  }
