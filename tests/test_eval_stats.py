"""Accuracy, bootstrap interval, breakdown and the Best-of-N plot."""
from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest

from codepmp_jax.eval import plots, stats


def test_pairwise_scores_strict_counts_ties_wrong_and_tie_aware_half():
  strict, tie_aware = stats.pairwise_scores(np.array([1.0, 0.5, 2.0, -1.0]), np.array([0.0, 0.5, 3.0, -2.0]))
  np.testing.assert_array_equal(strict, [1, 0, 0, 1])
  np.testing.assert_array_equal(tie_aware, [1, 0.5, 0, 1])


def test_top_pick_scores_split_ties_among_the_tied_options():
  rewards = [np.array([3.0, 1.0, 3.0, 0.0]), np.array([1.0, 2.0, 0.0]), np.array([5.0, 5.0, 5.0])]
  strict, tie_aware = stats.top_pick_scores(rewards, [0, 1, 2])
  np.testing.assert_array_equal(strict, [0, 1, 0])
  np.testing.assert_allclose(tie_aware, [0.5, 1, 1 / 3])


def test_paired_bootstrap_by_hand():
  # Two items with differences 1 and 0: a resample of two items has mean 1 (probability 1/4),
  # 0.5 (1/2) or 0 (1/4), so the 95% interval is [0, 1] and P(mean <= 0) = 1/4.
  result = stats.paired_bootstrap(np.array([1.0, 1.0]), np.array([0.0, 1.0]), num_resamples=20000)
  assert result["difference"] == 0.5 and result["n"] == 2
  assert result["ci95"] == [0.0, 1.0]
  assert result["one_sided_p"] == pytest.approx(0.25, abs=0.01)
  # Pairing removes what the items share: B is A's per-item accuracy minus 0.1 everywhere, so
  # the difference is 0.1 in every resample, while each model's own interval is wide.
  rng = np.random.default_rng(0)
  a = rng.integers(0, 2, 300).astype(float)
  paired = stats.paired_bootstrap(a, a - 0.1)
  assert paired["ci95"] == pytest.approx([0.1, 0.1]) and paired["one_sided_p"] == 0.0
  low, high = stats.bootstrap_ci(a)
  assert high - low > 0.1
  with pytest.raises(ValueError, match="same items"):
    stats.paired_bootstrap(a, a[:-1])


def test_compare_aligns_reports_by_item_id():
  a = {"mode": "pairwise", "per_item": {"id": ["x", "y", "z"], "tie_aware": [1.0, 0.5, 0.0]}}
  b = {"mode": "pairwise", "per_item": {"id": ["z", "x", "y"], "tie_aware": [0.0, 0.0, 0.5]}}
  result = stats.compare(a, b, num_resamples=500)
  assert result["difference"] == pytest.approx(1 / 3) and result["n"] == 3
  c = {"mode": "pairwise", "per_item": {"id": ["x", "y", "w"], "tie_aware": [1.0, 0.5, 0.0]}}
  with pytest.raises(ValueError, match="different items"):
    stats.compare(a, c)


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
