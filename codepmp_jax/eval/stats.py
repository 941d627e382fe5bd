"""Accuracy with a bootstrap confidence interval, its breakdown by a record field, and the paired
bootstrap that compares two reward models over the same items.

Ties are reported, never hidden: pairwise accuracy is RewardBench's strict one (a tie is wrong)
beside the tie-aware one (a tie scores 1/t for t options sharing the top reward: 0.5 for a pair,
as Best-of-N ties score), and the tie count.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import numpy as np


def pairwise_scores(chosen: np.ndarray, rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(strict, tie_aware) per pair: 1 when chosen's reward is higher; a tie scores 0 / 0.5."""
  chosen, rejected = np.asarray(chosen), np.asarray(rejected)
  strict = (chosen > rejected).astype(np.float64)
  return strict, strict + 0.5 * (chosen == rejected)


def top_pick_scores(rewards: Sequence[np.ndarray], answers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(strict, tie_aware) per question of picking the highest-reward option: strict is 1 only when
  the right option alone has the top reward; tie_aware is its chance under a uniform pick among
  the options sharing the top reward."""
  strict, tie_aware = [], []
  for r, answer in zip(rewards, answers):
    r = np.asarray(r)
    top = np.flatnonzero(r == r.max())
    strict.append(float(len(top) == 1 and top[0] == answer))
    tie_aware.append(float(answer in top) / len(top))
  return np.asarray(strict), np.asarray(tie_aware)


def bootstrap_ci(values: np.ndarray, num_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` (e.g. 0/1 correctness)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  means = np.empty(num_resamples)
  for start in range(0, num_resamples, 100):  # Chunks keep memory at 100 x len(values).
    stop = min(start + 100, num_resamples)
    idx = rng.integers(0, values.size, (stop - start, values.size))
    means[start:stop] = values[idx].mean(axis=1)
  tail = (1.0 - confidence) / 2 * 100
  low, high = np.percentile(means, [tail, 100 - tail])
  return float(low), float(high)


def summarize(correct: np.ndarray, num_resamples: int = 1000, seed: int = 0) -> dict:
  """`{"accuracy", "ci95": [low, high], "n"}` for a vector of per-item correctness."""
  correct = np.asarray(correct, np.float64)
  low, high = bootstrap_ci(correct, num_resamples, 0.95, seed)
  return {"accuracy": float(correct.mean()) if correct.size else float("nan"),
          "ci95": [low, high], "n": int(correct.size)}


def breakdown(correct: np.ndarray, groups: Sequence[Hashable | Iterable[Hashable]],
              num_resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
  """`summarize` per group, groups sorted by name.

  `groups[i]` is item i's group, or a list/set of groups for multi-label items (a LogiQA 2.0
  question with several reasoning types counts in each of them).
  """
  correct = np.asarray(correct)
  members: dict[str, list[int]] = {}
  for i, g in enumerate(groups):
    labels = g if isinstance(g, (list, tuple, set, frozenset)) else [g]
    for label in labels:
      members.setdefault(str(label), []).append(i)
  return {name: summarize(correct[idx], num_resamples, seed)
          for name, idx in sorted(members.items())}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, num_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
  """`mean(a - b)` over the same items with a percentile bootstrap interval that resamples items
  (both models together, so what the items share cancels), and the share of resamples on the
  other side of zero from the estimate (`one_sided_p`)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired scores need the same items; got {a.shape} and {b.shape}")
  diff = a - b
  if diff.size == 0:
    raise ValueError("paired bootstrap of no items")
  rng = np.random.default_rng(seed)
  means = np.concatenate([diff[rng.integers(0, diff.size, (min(100, num_resamples - start), diff.size))]
                          .mean(axis=1) for start in range(0, num_resamples, 100)])
  tail = (1.0 - confidence) / 2 * 100
  low, high = np.percentile(means, [tail, 100 - tail])
  estimate = float(diff.mean())
  other_side = (means <= 0) if estimate > 0 else (means >= 0)
  return {"difference": estimate, "ci95": [float(low), float(high)], "n": int(diff.size),
          "one_sided_p": float(other_side.mean())}


def compare(report_a: dict, report_b: dict, score: str = "tie_aware", num_resamples: int = 2000,
            seed: int = 0) -> dict:
  """The paired bootstrap of two evaluation reports of the same mode and items (their `per_item`
  ids and scores, `score` = strict | tie_aware): A minus B."""
  items = []
  for report in (report_a, report_b):
    per_item = report.get("per_item")
    if not per_item or score not in per_item:
      raise ValueError(f"report of {report.get('checkpoint', report.get('mode'))!r} has no per_item "
                       f"{score!r} scores; rerun its evaluation")
    items.append(dict(zip(per_item["id"], per_item[score])))
  if set(items[0]) != set(items[1]):
    only_a, only_b = len(set(items[0]) - set(items[1])), len(set(items[1]) - set(items[0]))
    raise ValueError(f"the reports cover different items ({only_a} only in A, {only_b} only in B); "
                     "a paired comparison needs the same ones")
  ids = sorted(items[0])
  return paired_bootstrap([items[0][i] for i in ids], [items[1][i] for i in ids], num_resamples,
                          seed=seed)
