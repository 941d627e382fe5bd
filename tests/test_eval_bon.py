"""Best-of-N against a brute-force enumeration of every subset, on a hand-made candidates file."""
from __future__ import annotations

import collections
import itertools
import json
import math

import numpy as np
import pytest

from codepmp_jax.eval import answers, bon, stats

# Per question: (reference, [(candidate text, the answer a human reads in it, reward)]).
HAND_MADE = {
    "q1": ("#### 18", [
        ("She makes 9 * 2 = $18. The answer is 18", 18, 0.3),
        ("She makes 16 - 3 = 13. The answer is 13", 13, 0.9),
        ("The answer is $18.00", 18, 0.1),
        ("Nothing to say.", None, 0.9),
        ("The answer is 13.", 13, -0.5),
        ("#### 20", 20, 0.2),
    ]),
    "q2": ("#### 1,600", [
        ("The answer is 1,600", 1600, -1.0),
        ("The answer is 1600.", 1600, -1.0),
        ("So 4 * 400 = 1,500. The answer is 1500", 1500, 2.0),
        ("The answer is 1500", 1500, 0.0),
        ("#### 16", 16, 0.5),
    ]),
    "q3": ("#### -3", [
        ("It falls to -3 degrees.", -3, 0.0),
        ("The answer is 3", 3, 1.0),
        ("The answer is 5", 5, 1.0),
        ("The answer is -3", -3, 1.0),  # ties with two wrong answers
    ]),
}
NS = (1, 2, 3, 4)


@pytest.fixture()
def files(tmp_path):
  cand, scores = tmp_path / "candidates.jsonl", tmp_path / "scores.jsonl"
  with open(cand, "w") as fc, open(scores, "w") as fs:
    for qid, (reference, rows) in HAND_MADE.items():
      fc.write(json.dumps({"id": qid, "question": "?", "reference": reference,
                           "candidates": [r[0] for r in rows]}) + "\n")
      fs.write(json.dumps({"id": qid, "rewards": [r[2] for r in rows]}) + "\n")
  return cand, scores


def brute_force(n: int) -> dict[str, float]:
  """Every subset of size n, each method written out from the human-read answers."""
  totals = collections.Counter()
  for reference, rows in HAND_MADE.values():
    truth = int(reference.replace("#", "").replace(",", ""))
    per_q = collections.Counter()
    subsets = list(itertools.combinations(range(len(rows)), n))
    for subset in subsets:
      picked = [rows[i] for i in subset]
      best = max(r[2] for r in picked)
      rm_tied = [r for r in picked if r[2] == best]
      votes = collections.Counter(r[1] for r in picked if r[1] is not None)
      top = max(votes.values()) if votes else 0
      tied_answers = [a for a, c in votes.items() if c == top]
      per_q["rm"] += sum(r[1] == truth for r in rm_tied) / len(rm_tied)
      per_q["random"] += sum(r[1] == truth for r in picked) / n
      per_q["majority"] += (sum(a == truth for a in tied_answers) / len(tied_answers)
                            if tied_answers else 0)
      per_q["oracle"] += any(r[1] == truth for r in picked)
    for method in bon.METHODS:
      totals[method] += per_q[method] / len(subsets)
  return {m: totals[m] / len(HAND_MADE) for m in bon.METHODS}


def run_bon(files, num_draws: int, seed: int = 0) -> dict:
  cand, scores = files
  questions = bon.load_candidates(cand)
  unanswered = bon.grade(questions, answers.AnswerChecker("gsm8k"))
  assert unanswered == 1
  return bon.best_of_n(questions, bon.load_scores(scores, questions), NS, num_draws, seed)[0]


def test_exact_enumeration_matches_brute_force(files):
  results = run_bon(files, num_draws=1000)
  for n in NS:
    expected = brute_force(n)
    for method in bon.METHODS:
      assert results[str(n)][method] == pytest.approx(expected[method], abs=1e-12), (n, method)
  # Sanity of the hand-made file: the methods are not all alike.
  assert results["1"]["rm"] == pytest.approx(results["1"]["random"])
  assert results["4"]["oracle"] > results["4"]["rm"]


def test_sampled_draws_match_closed_forms():
  # 30 candidates, N=5: C(30, 5) = 142,506 subsets, so 20,000 seeded random draws are used.
  rng = np.random.default_rng(0)
  rewards, correct = rng.permutation(30).astype(float), rng.random(30) < 0.3
  question = bon.Question("q", "?", "#### 1", ["x"] * 30, correct, np.arange(30))
  result = bon.best_of_n([question], [rewards], ns=(5,), num_draws=20000, seed=0)[0]["5"]
  assert result == bon.best_of_n([question], [rewards], ns=(5,), num_draws=20000, seed=0)[0]["5"]
  total = math.comb(30, 5)
  # The reward-ranked i-th candidate wins when the other 4 drawn all rank below it.
  rm_exact = sum(math.comb(int(r), 4) for r, c in zip(rewards, correct) if c) / total
  oracle_exact = 1 - math.comb(int((~correct).sum()), 5) / total
  assert result["rm"] == pytest.approx(rm_exact, abs=0.015)
  assert result["oracle"] == pytest.approx(oracle_exact, abs=0.015)
  assert result["random"] == pytest.approx(correct.mean(), abs=0.015)
  # Every answer distinct: majority falls back to the first drawn, i.e. a random pick.
  assert result["majority"] == pytest.approx(correct.mean(), abs=0.015)


def test_rm_pick_interval_is_a_bootstrap_over_questions():
  """Two questions, N=1 of 2 candidates: the RM picks right in one (accuracy 1) and, on a reward
  tie, half the time in the other; the interval is the percentile bootstrap of [1, 0.5]."""
  right_first = bon.Question("a", "?", "#### 1", ["x", "y"], np.array([True, False]), np.arange(2))
  tie = bon.Question("b", "?", "#### 1", ["x", "y"], np.array([False, True]), np.arange(2))
  result = bon.best_of_n([right_first, tie], [np.array([2.0, 1.0]), np.array([0.0, 0.0])],
                         ns=(2,), num_draws=10)[0]["2"]
  assert result["rm"] == pytest.approx(0.75)
  low, high = result["rm_ci95"]
  assert (low, high) == stats.bootstrap_ci(np.array([1.0, 0.5]), seed=0)
  assert low == pytest.approx(0.5) and high == pytest.approx(1.0)


def test_draws_are_without_replacement_and_seeded():
  d = bon.draws(10, 4, 50, (0, 4, 7))
  assert d.shape == (50, 4)
  assert all(len(set(row)) == 4 for row in d.tolist())
  np.testing.assert_array_equal(d, bon.draws(10, 4, 50, (0, 4, 7)))
  assert not np.array_equal(d, bon.draws(10, 4, 50, (0, 4, 8)))
  np.testing.assert_array_equal(bon.draws(5, 2, 10, (0,)),
                                list(itertools.combinations(range(5), 2)))


def test_ties_score_a_uniform_pick_hand_computed():
  # Answer ids 0..3, of which 1 and 3 are right.
  answer_correct = np.array([False, True, False, True])
  draws = np.array([
      [2, 1, 1, 2, 0],    # 1 and 2 tie at two votes: one of two right -> 1/2
      [-1, -1, -1, -1, -1],  # nobody answered -> 0
      [-1, 3, 3, -1, 0],  # 3 wins outright -> 1
      [0, 1, 2, 3, -1],   # four-way tie, 1 and 3 right -> 2/4
      [0, 2, 0, 2, 1],    # 0 and 2 tie, both wrong -> 0
  ])
  np.testing.assert_allclose(bon.majority_accuracy(draws, answer_correct),
                             [0.5, 0.0, 1.0, 0.5, 0.0])
  # The RM pick: three candidates share the top reward, one of them right -> 1/3 for N=4;
  # the same question read in the other order gives the same value (no draw-order effect).
  rewards = np.array([1.0, 1.0, 0.2, 1.0])
  correct = np.array([False, True, True, False])
  ids = np.array([0, 1, 1, 2])
  picks = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
  acc = bon.question_accuracy(rewards, correct, ids, picks)
  assert acc["rm"] == pytest.approx(1 / 3)
  # Majority over all four: answer 1 has two votes and wins outright -> 1.
  assert acc["majority"] == 1.0
  # Two candidates: first-drawn tie-breaking would give 0 or 1 depending on the order.
  acc = bon.question_accuracy(rewards, correct, ids, np.array([[0, 1], [1, 0]]))
  assert (acc["rm"], acc["majority"]) == (0.5, 0.5)


def test_bad_input_names_file_line_and_field(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text('{"id": 1, "question": "?", "reference": "3", "candidates": ["a"]}\n'
                  '{"id": 2, "question": "?", "reference": "3", "candidates": "a"}\n')
  with pytest.raises(ValueError, match=r"c.jsonl:2: field 'candidates'"):
    bon.load_candidates(path)
  path.write_text('{"id": 1, "question": "?", "reference": "3", "candidates": ["a", "b"]}\n'
                  '{"id": 2, "question": "?", "candidates": ["a", "b"]}\n')
  with pytest.raises(ValueError, match=r"c.jsonl:2: missing field 'reference' \(or 'answer'\)"):
    bon.load_candidates(path)
  path.write_text('{"id": 1, "prompt": "P", "answer": 3, "candidates": ["a", "b"]}\n')
  questions = bon.load_candidates(path)
  assert (questions[0].prompt, questions[0].reference) == ("P", "3")  # `generate` output lines
  scores = tmp_path / "s.jsonl"
  scores.write_text('{"id": 1, "rewards": [0.5]}\n')
  with pytest.raises(ValueError, match=r"s.jsonl:1: 1 rewards for 2 candidates"):
    bon.load_scores(scores, questions)
  bon.grade(questions, answers.AnswerChecker("gsm8k"))
  with pytest.raises(ValueError, match="N=4 but question '1' has only 2 candidates"):
    bon.best_of_n(questions, [np.zeros(2)], ns=(4,))
  with pytest.raises(ValueError, match="question '1' has non-finite rewards"):
    bon.best_of_n(questions, [np.array([0.0, np.nan])], ns=(1,))
  scores.write_text('{"id": 1, "rewards": [0.5, 1]}\n{"id": 1, "rewards": [0.5, 1]}\n')
  with pytest.raises(ValueError, match=r"s.jsonl:2: duplicate id '1' \(first at .*s.jsonl:1\)"):
    bon.load_scores(scores, questions)


def test_style_baselines_by_hand():
  """Four candidates from models A and B; in question q1 A's are right, in q2 B's. With N=2 all six
  pairs are drawn: "always pick A" is right in q1 unless the pair is B's two (5/6), and in q2 only
  when A is absent (then a uniform pick between B's two: 1/6); longest/shortest likewise."""
  sources = ["A|0-Shot", "B|0-Shot", "A|5-Shot", "B|5-Shot"]
  q1 = bon.Question("q1", "?", "1", ["a" * 3, "b" * 9, "c" * 4, "d" * 1],
                    np.array([True, False, True, False]), np.array([0, 1, 0, 1]), sources=sources)
  q2 = bon.Question("q2", "?", "1", ["a" * 3, "b" * 9, "c" * 4, "d" * 1],
                    np.array([False, True, False, True]), np.array([0, 1, 0, 1]), sources=sources)
  results, per_item = bon.best_of_n([q1, q2], [np.zeros(4), np.arange(4.0)], ns=(2,), num_draws=10)
  baselines = results["2"]["baselines"]
  assert baselines["source:A"] == pytest.approx((5 / 6 + 1 / 6) / 2)
  assert baselines["source:B"] == pytest.approx((1 / 6 + 5 / 6) / 2)
  # Longest of each pair (lengths 3, 9, 4, 1): q1 right for {0,2},{0,3},{2,3} -> 3/6; q2 the rest.
  assert baselines["longest"] == pytest.approx((3 / 6 + 3 / 6) / 2)
  # Shortest: q1 right for {0,1},{0,2},{1,2} -> 3/6; q2 right for {0,3},{1,3},{2,3} -> 3/6.
  assert baselines["shortest"] == pytest.approx(0.5)
  # Per-question rm scores: q1 all rewards tie (a uniform pick: 1/2); q2 picks the higher index,
  # right when it is 1 or 3: pairs {0,1},{0,3},{1,3},{2,3} -> 4/6.
  assert per_item == {"id": ["q1", "q2"], "rm@2": [pytest.approx(0.5), pytest.approx(4 / 6)]}
