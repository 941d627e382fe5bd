"""CHAMP candidates: a hand-made file with known grades, then the real installed data set."""
from __future__ import annotations

import json

import numpy as np
import pytest

from codepmp_jax.eval import answers, bon, candidates


def _conversation(solution, summary, error=None):
  return {"messages": [
      {"role": "System", "text": "You are an expert on mathematics.", "error": None},
      {"role": "User", "text": "Solve ...", "error": None},
      {"role": "Model.X", "text": solution, "error": error},
      {"role": "User", "text": "Now, summarize the answer above in one sentence", "error": None},
      {"role": "Model.X", "text": None if error else summary,
       "error": "LENGTH_PREVIOUS" if error else None}]}


def _problems():
  conv = {
      "A|s1": _conversation("2 + 3 = 5", "The sum is 5."),
      "A|s2": _conversation("2 + 3 = 6", "The sum is 6."),
      "B|s1": _conversation("it goes on and on", None, error="LENGTH_CURRENT"),
      "B|s2": _conversation("2 + 3 = 5, as 2 + 2 = 4 wait", "There are 5 of them."),
  }
  fws = {"A|s1": {"text": "", "start_idx": None, "end_idx": None, "author": "a"},
         "A|s2": {"text": "", "start_idx": 0, "end_idx": 3, "author": "a"},
         "B|s2": {"text": "", "start_idx": 0, "end_idx": 3, "author": "a"}}
  return {
      "P_1": {"_raw_answer": "@@5@@ apples", "_text": "What is 2 + 3?", "conversations": conv,
              "fws_annotations": fws},
      "P_2": {"_raw_answer": "Yes", "_text": "Is 5 odd?", "conversations": conv,
              "fws_annotations": fws},
      "P_3": {"_raw_answer": "@@2^n@@", "_text": "?", "conversations": conv, "fws_annotations": {}},
  }


def test_reference_answer_keeps_only_one_number():
  assert candidates.reference_answer({"_raw_answer": "239"}) == "239"
  assert candidates.reference_answer({"_raw_answer": "98 values"}) == "98"
  assert candidates.reference_answer({"_raw_answer": "900 (i.e., all values)"}) == "900"
  assert candidates.reference_answer({"_raw_answer": "The limit is @@2/3@@"}) == "2/3"
  for raw in ("Yes", "@@2^n@@", "@@2^(n-1)@@", "1, 4 and 9", "@@x=2, y=1@@", "@@1@@ or @@2@@"):
    assert candidates.reference_answer({"_raw_answer": raw}) is None, raw


def test_hand_made_problems_to_bon_file(tmp_path):
  records, stats = candidates.champ_questions(_problems(), models=("A", "B"), settings=("s1", "s2"))
  assert (stats.problems, stats.kept, stats.candidates) == (3, 1, 3)
  assert stats.skipped == {"reference_not_a_number": 2, "truncated": 1}
  (record,) = records
  assert record["sources"] == ["A|s1", "A|s2", "B|s2"]
  assert record["candidates"][0] == "2 + 3 = 5\n\nThe sum is 5."
  path = tmp_path / "champ.jsonl"
  candidates.write_jsonl(records, path)
  questions = bon.load_candidates(path)
  assert questions[0].finals == ["The sum is 5.", "The sum is 6.", "There are 5 of them."]
  assert bon.grade(questions, answers.AnswerChecker("champ")) == 0
  # Graded from the summaries: the solution of candidate 2 says "4" last, the summary says 5.
  np.testing.assert_array_equal(questions[0].correct, [True, False, True])
  agreement = candidates.label_agreement(_problems(), answers.AnswerChecker("champ"))
  assert agreement == {"labelled": 3, "agreement": pytest.approx(2 / 3),
                       "checker_right_label_right": 1, "checker_right_label_wrong": 1,
                       "checker_wrong_label_wrong": 1}


def test_bad_finals_name_the_line(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text(json.dumps({"id": 1, "question": "?", "reference": "3",
                              "candidates": ["a", "b"], "finals": ["a"]}) + "\n")
  with pytest.raises(ValueError, match=r"c.jsonl:1: field 'finals' must be a list of 2 strings"):
    bon.load_candidates(path)


def test_real_champ_counts_and_label_agreement():
  import champ_dataset  # noqa: F401  (a pinned runtime requirement: missing, the test fails)
  problems = candidates.load_problems()
  records, stats = candidates.champ_questions(problems)
  assert (stats.problems, stats.kept) == (270, 128)
  assert stats.skipped["reference_not_a_number"] == 142
  assert stats.candidates == sum(len(r["candidates"]) for r in records) == 7552
  agreement = candidates.label_agreement(problems, answers.AnswerChecker("champ"))
  # The authors found no mistake in 47 graded solutions; our checker reads the right number in
  # all but 2. Solutions with a wrong step often still end at the right number (52 of 203).
  assert agreement["labelled"] == 250
  assert agreement["checker_right_label_right"] == 45
  assert agreement["checker_wrong_label_right"] == 2
