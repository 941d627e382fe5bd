"""Accuracy with a bootstrap confidence interval, and its breakdown by a record field."""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import numpy as np


def pairwise_correct(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
  """Per pair, whether the chosen reward is strictly higher (ties count wrong, as RewardBench)."""
  return np.asarray(chosen) > np.asarray(rejected)


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
