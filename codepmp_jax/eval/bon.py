"""Best-of-N selection: reward-model pick against random pick, majority vote and oracle.

For each N, every question gets the same draws of N candidates for all four methods: all
C(n, N) subsets when there are at most `num_draws` of them (exact), else `num_draws` random
draws without replacement from fixed seeds. The reward model picks the highest reward; random
is the expected accuracy of a uniform pick among the drawn (pass@1); majority votes over
extracted answers (candidates without an answer don't vote; a draw where none answered scores
0); oracle is right when any drawn candidate is. Ties score their expected accuracy under a
uniform pick: among the candidates sharing the top reward, and among the answers sharing the top
vote count. Breaking them by draw order instead would tie the score to the candidates' order in
the file (GSM8K-style files list one model's sample first), which put majority@2 below random.

Beside them, style baselines pick by something other than correctness, on the same draws: the
longest and the shortest candidate, and "always pick source model X" (a drawn candidate of X
when there is one, else a uniform pick) for every model the file's `sources` name. A reward model
that learned only a style (one model's phrasing, or length) scores no better than these.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Sequence

import numpy as np

from codepmp_jax.data import templates
from codepmp_jax.data.records import read_json_objects
from codepmp_jax.eval import answers, stats

METHODS = ("rm", "random", "majority", "oracle")
# Step-level scores (`--aggregate`): a solution's steps are the text between delimiters; each step's
# reward is read at its last token in one forward pass (`score.RewardScorer.score_steps`) and the
# steps' rewards are aggregated into the solution's reward, as the released CodePMP Best-of-N
# evaluation does (its `min`, `max`, `sum`, `only_last` = `last`; `mean`; `product`: of
# sigmoid(reward), each step's probability of being right, as a process reward model's).
AGGREGATES = ("min", "max", "sum", "mean", "last", "product")
DEFAULT_STEP_DELIMITER = "\n\n"


@dataclasses.dataclass
class Question:
  """One Best-of-N question: the prompt its candidates are scored with, and their grades.

  `finals[i]`, when given, is the part of candidate i its answer is read from (CHAMP: the
  model's one-sentence summary); otherwise the whole candidate. `answer_ids[i]` numbers
  candidate i's extracted answer (equal answers share a number; -1 when none could be read),
  and `correct[i]` says whether candidate i is right.
  """

  id: str
  prompt: str
  reference: str
  candidates: list[str]
  correct: np.ndarray | None = None
  answer_ids: np.ndarray | None = None
  finals: list[str] | None = None
  sources: list[str] | None = None


def _field(record: dict, name: str, kind: type | tuple[type, ...], where: str):
  """`record[name]`, checked to be of type `kind`, with an error naming the file, line and field."""
  if name not in record:
    raise ValueError(f"{where}: missing field {name!r}")
  value = record[name]
  if not isinstance(value, kind) or isinstance(value, bool):
    expected = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise ValueError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__}")
  return value


def load_candidates(path: str | os.PathLike) -> list[Question]:
  """Questions from a candidates file: lines `{"id", "question", "reference", "candidates"}`.

  Lines as `codepmp_jax.sample_candidates` writes them also work: `answer` (GSM8K's and MATH-500's field)
  stands in for `reference`, and a `prompt` without `question` is scored verbatim. An optional
  `finals` list (one string per candidate) holds the text each answer is read from, and an optional
  `sources` list (one per candidate, `model` or `model|setting`) names who wrote each.
  """
  questions, seen = [], set()
  for line_no, record in read_json_objects(path):
    where = f"{path}:{line_no}"
    qid = str(_field(record, "id", (str, int), where))
    candidates = _field(record, "candidates", list, where)
    if not candidates or not all(isinstance(c, str) for c in candidates):
      raise ValueError(f"{where}: field 'candidates' must be a non-empty list of strings")
    if qid in seen:
      raise ValueError(f"{where}: duplicate id {qid!r}")
    seen.add(qid)
    name = next((n for n in ("reference", "answer") if n in record), None)
    if name is None:
      raise ValueError(f"{where}: missing field 'reference' (or 'answer')")
    reference = _field(record, name, (str, int, float), where)
    if "question" in record:
      prompt = templates.render("math", question=_field(record, "question", str, where))
    elif "prompt" in record:
      prompt = _field(record, "prompt", str, where)
    else:
      raise ValueError(f"{where}: missing field 'question' (or 'prompt')")
    finals = record.get("finals")
    if finals is not None and (not isinstance(finals, list) or len(finals) != len(candidates)
                               or not all(isinstance(f, str) for f in finals)):
      raise ValueError(f"{where}: field 'finals' must be a list of {len(candidates)} strings "
                       "(one per candidate)")
    sources = record.get("sources")
    if sources is not None and (not isinstance(sources, list) or len(sources) != len(candidates)
                                or not all(isinstance(s, str) for s in sources)):
      raise ValueError(f"{where}: field 'sources' must be a list of {len(candidates)} strings "
                       "(one per candidate)")
    questions.append(Question(qid, prompt, str(reference), candidates, finals=finals, sources=sources))
  if not questions:
    raise ValueError(f"{path}: no records")
  return questions


def load_scores(path: str | os.PathLike, questions: Sequence[Question]) -> list[np.ndarray]:
  """Per-question rewards from lines `{"id", "rewards": [...]}`, in the order of `questions`."""
  by_id = {}
  for line_no, record in read_json_objects(path):
    where = f"{path}:{line_no}"
    qid = str(_field(record, "id", (str, int), where))
    rewards = _field(record, "rewards", list, where)
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards):
      raise ValueError(f"{where}: field 'rewards' must be a list of numbers")
    if qid in by_id:
      raise ValueError(f"{where}: duplicate id {qid!r} (first at {by_id[qid][0]})")
    by_id[qid] = (where, np.asarray(rewards, np.float64))
  out = []
  for q in questions:
    if q.id not in by_id:
      raise ValueError(f"{path}: no rewards for id {q.id!r}")
    where, rewards = by_id[q.id]
    if len(rewards) != len(q.candidates):
      raise ValueError(f"{where}: {len(rewards)} rewards for {len(q.candidates)} candidates "
                       f"of id {q.id!r}")
    out.append(rewards)
  return out


def grade(questions: Sequence[Question], checker: answers.AnswerChecker) -> int:
  """Fills `correct` and `answer_ids` of every question; returns how many candidates had no answer.

  Each distinct answer is graded once per question.
  """
  unanswered = 0
  for q in questions:
    reference = checker.reference_key(q.reference)
    ids, verdicts, correct, answer_ids = {}, {}, [], []
    for text in (q.finals if q.finals is not None else q.candidates):
      key = checker.key(text)
      if key is None:
        unanswered += 1
        answer_ids.append(-1)
        correct.append(False)
        continue
      if key not in ids:
        ids[key] = len(ids)
        verdicts[key] = checker.equal_keys(key, reference)
      answer_ids.append(ids[key])
      correct.append(verdicts[key])
    q.correct = np.asarray(correct, bool)
    q.answer_ids = np.asarray(answer_ids, np.int64)
  return unanswered


def draws(num_candidates: int, n: int, num_draws: int, seed: Sequence[int]) -> np.ndarray:
  """[D, n] candidate indices: all subsets if there are at most `num_draws`, else random draws."""
  if n > num_candidates:
    raise ValueError(f"N={n} exceeds the {num_candidates} candidates")
  if math.comb(num_candidates, n) <= num_draws:
    return np.asarray(list(itertools.combinations(range(num_candidates), n)), np.int64)
  rng = np.random.default_rng(list(seed))
  return np.argsort(rng.random((num_draws, num_candidates)), axis=1)[:, :n]


def majority_accuracy(answer_ids: np.ndarray, answer_correct: np.ndarray) -> np.ndarray:
  """[D] expected accuracy of majority vote in each draw, ties split uniformly among answers.

  `answer_ids` is [D, N] (-1: no answer, no vote); `answer_correct[a]` says whether answer id
  `a` is right. The most frequent answers win; with t of them tied, each is picked with
  probability 1/t. A draw without any answer scores 0.
  """
  d, n = answer_ids.shape
  k = len(answer_correct)
  if k == 0:
    return np.zeros(d)
  valid = answer_ids >= 0
  rows = np.repeat(np.arange(d), n)
  counts = np.zeros((d, k), np.int64)
  np.add.at(counts, (rows[valid.ravel()], answer_ids[valid]), 1)
  best = counts.max(axis=1, keepdims=True)
  tied = (counts == best) & (best > 0)
  num_tied = tied.sum(axis=1)
  hits = (tied & np.asarray(answer_correct, bool)[None, :]).sum(axis=1)
  return np.where(num_tied > 0, hits / np.maximum(num_tied, 1), 0.0)


def answer_correctness(correct: np.ndarray, answer_ids: np.ndarray) -> np.ndarray:
  """[K] whether each answer id is right (all candidates with one answer share its grade)."""
  out = np.zeros(int(answer_ids.max()) + 1 if answer_ids.size else 0, bool)
  valid = answer_ids >= 0
  out[answer_ids[valid]] = correct[valid]
  return out


def top_pick_accuracy(keys: np.ndarray, correct: np.ndarray, picks: np.ndarray) -> float:
  """Mean accuracy over the draws `picks` [D, N] of picking the highest `keys`, ties split uniformly."""
  drawn_keys = keys[picks]
  top = drawn_keys == drawn_keys.max(axis=1, keepdims=True)
  return float(((top & correct[picks]).sum(axis=1) / top.sum(axis=1)).mean())


def source_model(source: str) -> str:
  """The model of a `sources` entry (`model|setting` or `model`)."""
  return source.partition("|")[0]


def style_keys(question: Question, models: Sequence[str]) -> dict[str, np.ndarray]:
  """Per baseline, the key it picks the highest of: length in characters (longest; shortest by its
  negation) and, per model, 1 for that model's candidates (none drawn: all tie, a uniform pick)."""
  lengths = np.array([len(c) for c in question.candidates], np.float64)
  keys = {"longest": lengths, "shortest": -lengths}
  for model in models:
    keys[f"source:{model}"] = np.array([float(source_model(s) == model)
                                        for s in (question.sources or [""] * len(lengths))])
  return keys


def question_accuracy(rewards: np.ndarray, correct: np.ndarray, answer_ids: np.ndarray,
                      picks: np.ndarray) -> dict[str, float]:
  """Mean accuracy of each method over the draws `picks` [D, N] of one question."""
  drawn_correct = correct[picks]
  majority = majority_accuracy(answer_ids[picks], answer_correctness(correct, answer_ids))
  return {"rm": top_pick_accuracy(rewards, correct, picks), "random": float(drawn_correct.mean()),
          "majority": float(majority.mean()), "oracle": float(drawn_correct.any(axis=1).mean())}


def best_of_n(questions: Sequence[Question], rewards: Sequence[np.ndarray], ns: Sequence[int],
              num_draws: int = 100, seed: int = 0) -> tuple[dict[str, dict], dict[str, list]]:
  """(`{"<N>": {"rm", "random", "majority", "oracle", "rm_ci95", "baselines": {name: acc}}}`,
  per-question scores `{"id": [...], "rm@<N>": [...]}`): accuracies (fractions) averaged over
  questions, a 95% bootstrap interval over questions of the reward model's pick, the style
  baselines (`style_keys`) on the same draws, and each question's reward-model accuracy (for a
  paired comparison of two reward models, `stats.compare`).

  Questions must be graded (`grade`); every question needs at least max(ns) candidates.
  """
  models = sorted({source_model(s) for q in questions for s in (q.sources or [])})
  keys = [style_keys(q, models) for q in questions]
  out, per_item = {}, {"id": [q.id for q in questions]}
  for n in ns:
    per_question = {method: [] for method in METHODS}
    baselines = {name: [] for name in keys[0]} if keys else {}
    for index, (q, r) in enumerate(zip(questions, rewards)):
      if n > len(q.candidates):
        raise ValueError(f"N={n} but question {q.id!r} has only {len(q.candidates)} candidates")
      if not np.isfinite(r).all():
        raise ValueError(f"question {q.id!r} has non-finite rewards: {r.tolist()}")
      picks = draws(len(q.candidates), n, num_draws, (seed, n, index))
      acc = question_accuracy(r, q.correct, q.answer_ids, picks)
      for method in METHODS:
        per_question[method].append(acc[method])
      for name, key in keys[index].items():
        baselines[name].append(top_pick_accuracy(key, q.correct, picks))
    out[str(n)] = {m: sum(per_question[m]) / len(questions) for m in METHODS}
    out[str(n)]["rm_ci95"] = list(stats.bootstrap_ci(np.asarray(per_question["rm"]), seed=seed))
    out[str(n)]["baselines"] = {name: sum(v) / len(questions) for name, v in baselines.items()}
    per_item[f"rm@{n}"] = per_question["rm"]
  return out, per_item


def split_steps(response: str, delimiter: str = DEFAULT_STEP_DELIMITER) -> list[int]:
  """Where each step of `response` ends (character offsets, exclusive): steps are the pieces
  between `delimiter`s that hold more than whitespace, each ending at its last non-space
  character; the last step ends at the end of the response (its reward is read at the end token).
  A response without a delimiter (or without text) is one step."""
  if not delimiter:
    raise ValueError("the step delimiter must be a non-empty string")
  ends, start = [], 0
  for piece in response.split(delimiter):
    if piece.strip():
      ends.append(start + len(piece.rstrip()))
    start += len(piece) + len(delimiter)
  return ends[:-1] + [len(response)]


def aggregate_steps(rewards: Sequence[float] | np.ndarray, how: str) -> float:
  """One reward from a solution's step rewards (`AGGREGATES`)."""
  r = np.asarray(rewards, np.float64)
  if r.size == 0:
    raise ValueError("no step rewards to aggregate")
  if how == "min":
    return float(r.min())
  if how == "max":
    return float(r.max())
  if how == "sum":
    return float(r.sum())
  if how == "mean":
    return float(r.mean())
  if how == "last":
    return float(r[-1])
  if how == "product":
    return float(np.exp(-np.logaddexp(0.0, -r).sum()))  # prod(sigmoid(r)), without overflow
  raise ValueError(f"unknown step aggregate {how!r}; one of {AGGREGATES}")


class _StepIds(tuple):
  """Token ids that carry the positions of their steps' last tokens (`StepAggregateScorer`)."""
  positions: tuple[int, ...]


class StepAggregateScorer:
  """A scorer (`reward_tasks.Scorer`) whose reward of a (prompt, response) is `aggregate` of its
  step rewards: `encode_texts` splits responses into steps (`split_steps` by `delimiter`) and
  `score_ids` reads every step's reward in one forward pass per response
  (`RewardScorer.score_positions`). The last call's step rewards stay in `step_rewards`."""

  def __init__(self, scorer, aggregate: str, delimiter: str = DEFAULT_STEP_DELIMITER):
    if aggregate not in AGGREGATES:
      raise ValueError(f"unknown step aggregate {aggregate!r}; one of {AGGREGATES}")
    self.scorer, self.aggregate, self.delimiter = scorer, aggregate, delimiter
    self.step_rewards: list[np.ndarray] = []

  def __getattr__(self, name):  # everything else (prompt_format, max_length, ...) is the scorer's
    return getattr(self.scorer, name)

  def encode_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list:
    out = []
    for steps in self.scorer.encode_steps(prompts, responses, self.delimiter):
      ids = _StepIds(steps.sequence.ids)
      ids.positions = steps.positions
      out.append(dataclasses.replace(steps.sequence, ids=ids))
    return out

  def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    positions = [getattr(s, "positions", None) or (len(s) - 1,) for s in sequences]
    self.step_rewards = self.scorer.score_positions(sequences, positions)
    return np.asarray([aggregate_steps(r, self.aggregate) for r in self.step_rewards], np.float64)
