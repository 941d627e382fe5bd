"""Accuracy, bootstrap interval, breakdown and the Best-of-N plot."""
from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest

from codepmp_jax.eval import plots, stats


def test_pairwise_accuracy_counts_ties_wrong():
  correct = stats.pairwise_correct(np.array([1.0, 0.5, 2.0, -1.0]), np.array([0.0, 0.5, 3.0, -2.0]))
  np.testing.assert_array_equal(correct, [True, False, False, True])


def test_bootstrap_interval_matches_the_normal_approximation():
  # For a proportion, the bootstrap interval approaches p +- 1.96 sqrt(p (1 - p) / n).
  n, p = 2000, 0.7
  values = np.zeros(n)
  values[: int(n * p)] = 1
  low, high = stats.bootstrap_ci(values, num_resamples=2000, seed=0)
  half = 1.96 * math.sqrt(p * (1 - p) / n)
  assert low == pytest.approx(p - half, abs=0.004)
  assert high == pytest.approx(p + half, abs=0.004)
  assert stats.bootstrap_ci(values, 2000, seed=0) == (low, high)


def test_breakdown_counts_multi_label_items_in_each_group():
  correct = np.array([1, 0, 1, 1, 0], bool)
  groups = [["a", "b"], ["a"], ["b"], "c", ["a", "c"]]
  result = stats.breakdown(correct, groups, num_resamples=50)
  assert list(result) == ["a", "b", "c"]
  assert result["a"]["accuracy"] == pytest.approx(1 / 3) and result["a"]["n"] == 3
  assert result["b"]["accuracy"] == 1.0 and result["b"]["n"] == 2
  assert result["c"]["accuracy"] == 0.5 and result["c"]["n"] == 2
  summary = stats.summarize(correct, num_resamples=50)
  assert summary["accuracy"] == pytest.approx(0.6) and summary["n"] == 5
  assert summary["ci95"][0] <= 0.6 <= summary["ci95"][1]


def test_bon_plot_writes_a_png(tmp_path):
  results = {str(n): {"rm": 0.5 + 0.02 * i, "random": 0.5, "majority": 0.5 + 0.03 * i,
                      "oracle": min(1.0, 0.5 + 0.1 * i)} for i, n in enumerate((1, 2, 4, 8))}
  path = plots.plot_bon(results, tmp_path / "sub" / "bon.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = matplotlib.image.imread(path)
  assert image.shape[0] > 100 and image.shape[1] > 100
  assert image[..., :3].std() > 0.05  # lines were drawn, not a blank canvas
