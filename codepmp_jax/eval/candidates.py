"""Real model-written Best-of-N candidates from CHAMP (`champ-dataset` on PyPI, MIT).

CHAMP (Mao et al. 2024) holds 270 competition problems (number theory, polynomials, sequences,
inequalities, combinatorics), each with a reference answer and 72 conversations: four models
(GPT-3.5, GPT-4, GPT-4 Turbo, PaLM 2 Medium) x 18 prompt settings (0-shot, 5-shot, concept and
hint variants, partial solutions). Every conversation ends with the model's solution and, asked
next, a one-sentence summary of its answer. The authors also marked the first wrong step of 540
solutions (settings `No C w/o H` and `Direct C w/ H`; no mark = no mistake).

`champ_questions` turns this into our candidates format (`eval/bon.py`): one line per problem
with the solutions as candidates (text = solution, then the summary) and `finals` = the summaries,
which our number checker (`AnswerChecker("champ")`: the number after the stating verb) grades. Only
problems whose reference is one number are kept (yes/no, expressions and sets are not something
our checkers read); what is left out is counted. `label_agreement` compares our grades with the
authors' no-mistake marks, a check of the checker on real model text.

`python -m codepmp_jax.eval.candidates --out=champ.jsonl` writes the file for `eval bon`.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import re
from typing import Sequence

from absl import app, flags
from etils import epath

from codepmp_jax import cli
from codepmp_jax.eval import answers

MODELS = ("GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium")
# Settings where the model writes a whole solution to the problem itself. Left out: `1/3 Soln` and
# `2/3 Soln` (the model continues a given partial solution) and `No C w/o H`, whose prompt is
# `0-Shot`'s word for word.
FULL_SOLUTION_SETTINGS = (
    "0-Shot", "5-Shot", "No C w/ H", "Direct C w/o H", "Direct C w/ H", "Root C w/o H",
    "Root C w/ H", "Name C w/o H", "Name C w/ H", "Example C w/o H", "Example C w/ H",
    "Problem C w/o H", "Problem C w/ H", "Misleading C w/o H", "Misleading C w/ H")
LABELLED_SETTINGS = ("No C w/o H", "Direct C w/ H")
# A reference that is one number, optionally followed by words without digits or formulas
# ("98 values", "900 (i.e., all values)").
_NUMERIC_REFERENCE = re.compile(r"\s*-?\d+(?:\.\d+)?(?:/\d+)?(?![\d^.,/])(?:\s+[^\d^=*+]*)?")


@dataclasses.dataclass
class ChampStats:
  """What `champ_questions` kept and left out (by reason), for the report."""
  problems: int = 0
  kept: int = 0
  candidates: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def default_path() -> epath.Path:
  """The data file inside the installed `champ-dataset` package (v0.json)."""
  spec = importlib.util.find_spec("champ_dataset")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("champ-dataset is not installed: pip install champ-dataset==1.0.0")
  return epath.Path(spec.submodule_search_locations[0]) / "dataset_files" / "v0.json"


def load_problems(path: str | os.PathLike | None = None) -> dict[str, dict]:
  """CHAMP's problems by identifier, from the JSON file (default: the installed package's)."""
  path = epath.Path(path) if path is not None else default_path()
  data = json.loads(path.read_text())
  if "problems" not in data or not isinstance(data["problems"], dict):
    raise ValueError(f"{path}: no 'problems' object")
  return data["problems"]


def reference_answer(problem: dict) -> str | None:
  """The reference as one number string ("239", "5/14"), or None when it is not one number.

  CHAMP marks the essential part of a prose answer with `@@`; the first marked part is used.
  """
  raw = problem["_raw_answer"]
  marked = re.findall(r"@@(.*?)@@", raw)
  text = marked[0] if marked else raw
  if len(marked) > 1 or not _NUMERIC_REFERENCE.fullmatch(text):
    return None
  return text.split()[0]


def solution_and_summary(conversation: dict) -> tuple[str, str] | None:
  """The model's last solution and its one-sentence summary, or None when either was cut off."""
  messages = conversation["messages"]
  if len(messages) < 5:
    raise ValueError(f"expected solution, summary request and summary, got {len(messages)} messages")
  solution, summary = messages[-3], messages[-1]
  if not (solution["role"].startswith("Model.") and summary["role"].startswith("Model.")):
    raise ValueError(f"last messages are {solution['role']!r}, {summary['role']!r}, not the model's")
  if solution.get("error") or summary.get("error") or summary["text"] is None:
    return None  # LENGTH_CURRENT / LENGTH_PREVIOUS: the model ran out of tokens.
  return solution["text"], summary["text"]


def candidate_text(solution: str, summary: str) -> str:
  """What the reward model scores: the solution, then the stated answer."""
  return f"{solution.rstrip()}\n\n{summary.strip()}"


def champ_questions(problems: dict[str, dict], models: Sequence[str] = MODELS,
                    settings: Sequence[str] = FULL_SOLUTION_SETTINGS,
                    min_candidates: int = 2) -> tuple[list[dict], ChampStats]:
  """Candidates-file records (`eval/bon.py` format) and the counts of what was kept.

  Each record: `{"id", "question", "reference", "candidates", "finals", "sources"}`, candidates in
  the order models x settings, `sources[i]` = "model|setting". A candidate whose solution or
  summary was cut off by the model's length limit is left out (counted as `truncated`); a problem
  with fewer than `min_candidates` left is skipped.
  """
  stats, records = ChampStats(), []
  for pid, problem in problems.items():
    stats.problems += 1
    reference = reference_answer(problem)
    if reference is None:
      stats.skipped["reference_not_a_number"] += 1
      continue
    candidates, finals, sources = [], [], []
    for model in models:
      for setting in settings:
        key = f"{model}|{setting}"
        if key not in problem["conversations"]:
          raise ValueError(f"{pid}: no conversation {key!r}")
        try:
          parts = solution_and_summary(problem["conversations"][key])
        except ValueError as e:
          raise ValueError(f"{pid} {key}: {e}") from None
        if parts is None:
          stats.skipped["truncated"] += 1
          continue
        candidates.append(candidate_text(*parts))
        finals.append(parts[1])
        sources.append(key)
    if len(candidates) < min_candidates:
      stats.skipped["too_few_candidates"] += 1
      continue
    stats.kept += 1
    stats.candidates += len(candidates)
    records.append({"id": pid, "question": problem["_text"], "reference": reference,
                    "candidates": candidates, "finals": finals, "sources": sources})
  return records, stats


def label_agreement(problems: dict[str, dict], checker: answers.AnswerChecker) -> dict:
  """Our grade of each labelled solution against the authors' no-mistake mark.

  Only problems with a one-number reference and solutions whose summary exists count. A solution
  with a wrong step can still end at the right number, so `checker_right_label_wrong` is not all
  checker error; `checker_wrong_label_right` mostly is.
  """
  counts = collections.Counter()
  for problem in problems.values():
    reference = reference_answer(problem)
    if reference is None:
      continue
    for key, mark in problem["fws_annotations"].items():
      parts = solution_and_summary(problem["conversations"][key])
      if parts is None:
        counts["truncated"] += 1
        continue
      right = checker.correct(parts[1], reference)
      label = mark["start_idx"] is None
      counts[f"checker_{'right' if right else 'wrong'}_label_{'right' if label else 'wrong'}"] += 1
  graded = sum(v for k, v in counts.items() if k.startswith("checker_"))
  agree = counts["checker_right_label_right"] + counts["checker_wrong_label_wrong"]
  return {"labelled": graded, "agreement": agree / graded if graded else float("nan"),
          **{k: counts[k] for k in sorted(counts)}}


def write_jsonl(records: Sequence[dict], path: str | os.PathLike) -> None:
  """Writes the records, one JSON object a line."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("out", None, "Candidates JSONL to write.", required=True)
  flags.DEFINE_string("data", None, "CHAMP JSON (default: the installed package's).")
  flags.DEFINE_list("models", list(MODELS), "Comma-separated models.")
  flags.DEFINE_list("settings", list(FULL_SOLUTION_SETTINGS), "Comma-separated prompt settings.")


def main(argv: Sequence[str]) -> None:
  """Writes the CHAMP candidates file and prints the counts and the label agreement."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
  values = flags.FLAGS
  problems = load_problems(values.data)
  records, stats = champ_questions(problems, values.models, values.settings)
  write_jsonl(records, values.out)
  agreement = label_agreement(problems, answers.AnswerChecker("champ"))
  report = {"problems": stats.problems, "kept": stats.kept, "candidates": stats.candidates,
            "skipped": dict(stats.skipped), "label_agreement": agreement}
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  cli.run(main, define_flags)
