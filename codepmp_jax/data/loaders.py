"""Loaders that turn public preference formats into `PairRecord`s, selected by name (`--format`).

| format        | fields read                                              | prompt template |
| ------------- | -------------------------------------------------------- | --------------- |
| pairs         | prompt, chosen, rejected (+ margin, id, meta)            | none (as given) |
| codepmp       | query, better, worse                                     | code            |
| math_shepherd | question, chosen, rejected (` ки` step tags removed)     | math            |
| gsm8k         | question, answer (rejected: `gsm8k.make_pairs`)          | math            |
| logiqa2       | text, question, options, answer (0-based)                | logic           |
| reclor        | context, question, answers (or options), label           | logic           |
| trl           | TRL preference data: conversational (message lists) or   | `render_chat`   |
|               | standard (strings), implicit or explicit prompt, margin  | (strings: none) |

Files are JSON lines (optionally gzipped) or Parquet (`.parquet`). Every line that yields no pair
is counted in the `BadRecords` passed in; logic data give one pair per wrong option (gold vs wrong)
and also load as multiple-choice questions for evaluation (`load_multiple_choice`).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator

from codepmp_jax.data import gsm8k
from codepmp_jax.data.records import (BadRecords, PairRecord, get_strs, make_pair, read_json_lines,
                                      read_parquet_rows)
from codepmp_jax.data.templates import render, render_chat

_EMPTY_FENCE = re.compile(r"^\s*```[^\n`]*\s*```\s*$")
_STEP_TAG = re.compile(r" ?ки")


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
  """Settings some formats use: `seed` and `num_rejected` drive the GSM8K rejected solutions."""
  seed: int = 0
  num_rejected: int = 1


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """A logic question with all its options, for scoring every option and picking the best."""
  prompt: str
  options: tuple[str, ...]
  answer: int
  id: str


Loader = Callable[[str, BadRecords, LoaderOptions], Iterator[PairRecord]]


def rows(path: str | os.PathLike, bad: BadRecords) -> Iterator[tuple[str, dict]]:
  """(`file:line`, object) of a JSON-lines or Parquet file."""
  if str(path).endswith(".parquet"):
    return read_parquet_rows(path, bad)
  return read_json_lines(path, bad)


def _row_id(obj: dict, where: str, *names: str) -> str:
  for name in names:
    if obj.get(name) is not None:
      return str(obj[name])
  path, _, line = where.rpartition(":")
  return f"{pathlib.Path(path).name}:{line}"


def load_pairs(path: str, bad: BadRecords, options: LoaderOptions) -> Iterator[PairRecord]:
  """The interchange format itself."""
  del options
  for where, obj in rows(path, bad):
    fields = get_strs(obj, ("prompt", "chosen", "rejected"), where, bad)
    if fields is None:
      continue
    record = make_pair(*fields, where, bad, margin=obj.get("margin"), id=obj.get("id"),
                       meta=obj.get("meta"))
    if record is not None:
      yield record


def is_empty_response(text: str) -> bool:
  """True for an empty answer or one that is only an empty code fence (CodePMP drops these)."""
  return not text.strip() or bool(_EMPTY_FENCE.match(text))


def load_codepmp(path: str, bad: BadRecords, options: LoaderOptions) -> Iterator[PairRecord]:
  """CodePMP's synthesized pairs: a code description and a strong / weak model's code."""
  del options
  for where, obj in rows(path, bad):
    fields = get_strs(obj, ("query", "better", "worse"), where, bad)
    if fields is None:
      continue
    query, better, worse = fields
    empty = [name for name, text in (("better", better), ("worse", worse)) if is_empty_response(text)]
    if empty:
      bad.add("empty_response", where, f"field {empty[0]!r} is empty or an empty code fence")
      continue
    record = make_pair(render("code", query=query), better, worse, where, bad,
                       id=_row_id(obj, where, "id"))
    if record is not None:
      yield record


def load_math_shepherd(path: str, bad: BadRecords, options: LoaderOptions) -> Iterator[PairRecord]:
  """Math-Shepherd pairs with the step tags removed."""
  del options
  for where, obj in rows(path, bad):
    fields = get_strs(obj, ("question", "chosen", "rejected"), where, bad)
    if fields is None:
      continue
    question, chosen, rejected = (_STEP_TAG.sub("", text) for text in fields)
    record = make_pair(render("math", question=question), chosen, rejected, where, bad,
                       id=_row_id(obj, where, "id"))
    if record is not None:
      yield record


def load_gsm8k(path: str, bad: BadRecords, options: LoaderOptions) -> Iterator[PairRecord]:
  """GSM8K: the reference solution vs `options.num_rejected` consistently wrong ones."""
  for where, obj in rows(path, bad):
    fields = get_strs(obj, ("question", "answer"), where, bad)
    if fields is None:
      continue
    question, answer = fields
    try:
      pairs = gsm8k.make_pairs(answer, options.seed, question, options.num_rejected)
    except gsm8k.NoPerturbation as e:
      bad.add("no_valid_perturbation", where, str(e))
      continue
    except ValueError as e:
      bad.add("bad_value", where, f"field 'answer': {e}")
      continue
    if len(pairs.rejected) < options.num_rejected:
      bad.add("fewer_rejected_than_asked", where,
              f"{len(pairs.rejected)} of {options.num_rejected} rejected solutions found")
    prompt = render("math", question=question)
    base = _row_id(obj, where, "id")
    for k, (rejected, wrong) in enumerate(zip(pairs.rejected, pairs.rejected_answers)):
      record = make_pair(prompt, pairs.chosen, rejected, where, bad, id=f"{base}/{k}",
                         meta={"answer": pairs.final_answer, "rejected_answer": wrong})
      if record is not None:
        yield record


def _logic_question(obj: dict, where: str, bad: BadRecords) -> MultipleChoice | None:
  """A LogiQA 2.0 / ReClor row as a multiple-choice question (field names of either)."""
  context_field = "text" if "text" in obj else "context"
  options_field = "options" if "options" in obj else "answers"
  answer_field = "answer" if "answer" in obj else "label"
  fields = get_strs(obj, (context_field, "question"), where, bad)
  if fields is None:
    return None
  context, question = fields
  options = obj.get(options_field)
  if options is None:
    bad.add("missing_field", where, f"field {options_field!r} is missing")
    return None
  if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
    bad.add("bad_value", where, f"field {options_field!r} is not a list of at least 2 strings")
    return None
  answer = obj.get(answer_field)
  if answer is None:
    bad.add("missing_field", where, f"field {answer_field!r} is missing")
    return None
  if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
    bad.add("bad_value", where, f"field {answer_field!r} = {answer!r} is not an option index")
    return None
  prompt = render("logic", context=context, question=question)
  return MultipleChoice(prompt, tuple(options), answer, _row_id(obj, where, "id", "id_string"))


def load_multiple_choice(paths: Iterable[str], bad: BadRecords) -> Iterator[MultipleChoice]:
  """LogiQA 2.0 / ReClor questions with every option, for multiple-choice evaluation."""
  for path in paths:
    for where, obj in rows(path, bad):
      item = _logic_question(obj, where, bad)
      if item is not None:
        yield item


def load_logic(path: str, bad: BadRecords, options: LoaderOptions) -> Iterator[PairRecord]:
  """LogiQA 2.0 / ReClor: the gold option against each distinct wrong option."""
  del options
  for where, obj in rows(path, bad):
    item = _logic_question(obj, where, bad)
    if item is None:
      continue
    gold = item.options[item.answer]
    wrong = list(dict.fromkeys(o for i, o in enumerate(item.options) if i != item.answer))
    for k, option in enumerate(wrong):
      record = make_pair(item.prompt, gold, option, where, bad, id=f"{item.id}/{k}")
      if record is not None:
        yield record


def _messages(value, field: str, where: str, bad: BadRecords) -> list[dict] | None:
  ok = isinstance(value, list) and value and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in value)
  if not ok:
    bad.add("bad_value" if value is not None else "missing_field", where,
            f"field {field!r} is not a non-empty list of {{role, content}} string messages")
    return None
  return value


def implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
  """(prompt, chosen, rejected) of TRL's implicit-prompt standard pairs (TRL's `extract_prompt` rule).

  The prompt is the longest common prefix, less a final space, which stays with the responses.
  """
  end = 0
  while end < min(len(chosen), len(rejected)) and chosen[end] == rejected[end]:
    end += 1
  if end and chosen[end - 1] == " ":
    end -= 1
  return chosen[:end], chosen[end:], rejected[end:]


def _load_trl_standard(obj: dict, where: str, bad: BadRecords) -> PairRecord | None:
  """TRL standard pairs: `prompt` + `chosen` / `rejected` strings, or the two whole texts."""
  if "prompt" in obj:
    fields = get_strs(obj, ("prompt", "chosen", "rejected"), where, bad)
    if fields is None:
      return None
  else:
    texts = get_strs(obj, ("chosen", "rejected"), where, bad)
    if texts is None:
      return None
    fields = implicit_prompt(*texts)
  return make_pair(*fields, where, bad, margin=obj.get("margin"), id=_row_id(obj, where, "id"))


def load_trl(path: str, bad: BadRecords, options: LoaderOptions) -> Iterator[PairRecord]:
  """The preference data sets TRL documents: conversational or standard, implicit or explicit prompt.

  Conversational: the shared conversation is the prompt (`render_chat`, prompt format `chat`),
  the last assistant replies differ; an explicit `prompt` is a message list or a string, read as a
  user turn. Standard (`chosen` / `rejected` strings): with `prompt` the texts are used as given
  (prompt format `none`); without, the prompt is their common prefix (`implicit_prompt`).
  An optional `margin` is kept.
  """
  del options
  for where, obj in rows(path, bad):
    if isinstance(obj.get("chosen"), str):
      record = _load_trl_standard(obj, where, bad)
      if record is not None:
        yield record
      continue
    if obj.get("chosen") is None or obj.get("rejected") is None:
      bad.field_sets[tuple(sorted(obj))] += 1
    chosen = _messages(obj.get("chosen"), "chosen", where, bad)
    if chosen is None:
      continue
    rejected = _messages(obj.get("rejected"), "rejected", where, bad)
    if rejected is None:
      continue
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
      prompt = [{"role": "user", "content": prompt}]
    elif prompt is not None:
      prompt = _messages(prompt, "prompt", where, bad)
      if prompt is None:
        continue
    else:
      shared = 0
      while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
      prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if any(len(reply) != 1 or reply[0]["role"] != "assistant" for reply in (chosen, rejected)):
      bad.add("bad_value", where, "chosen/rejected must each end in one assistant reply after the prompt")
      continue
    record = make_pair(render_chat(prompt), chosen[0]["content"], rejected[0]["content"], where, bad,
                       margin=obj.get("margin"), id=_row_id(obj, where, "id"))
    if record is not None:
      yield record


FORMATS: dict[str, Loader] = {
    "pairs": load_pairs,
    "codepmp": load_codepmp,
    "math_shepherd": load_math_shepherd,
    "gsm8k": load_gsm8k,
    "logiqa2": load_logic,
    "reclor": load_logic,
    "trl": load_trl,
}


# The prompt format (`templates.FORMATS`) each loader renders its prompts in: what a model trained on
# that data should record (`templates.save_prompt_format`). TRL standard (string) data is `none`.
FORMAT_TEMPLATES: dict[str, str] = {
    "pairs": "none", "codepmp": "code", "math_shepherd": "math", "gsm8k": "math", "logiqa2": "logic",
    "reclor": "logic", "trl": "chat",
}


# The fields each format needs in a record (one of the alternatives), to suggest the format that
# records lacking a field look like (`nothing_loaded`).
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "pairs": (("prompt", "chosen", "rejected"),),
    "codepmp": (("query", "better", "worse"),),
    "math_shepherd": (("question", "chosen", "rejected"),),
    "gsm8k": (("question", "answer"),),
    "logiqa2": (("text", "question", "options", "answer"),),
    "reclor": (("context", "question", "answers", "label"), ("context", "question", "options", "label")),
    "trl": (("chosen", "rejected"),),
}


def formats_for(fields: Iterable[str]) -> list[str]:
  """The formats whose needed fields a record with `fields` has, most specific first."""
  have = set(fields)
  fits = [(max(len(f) for f in alts if set(f) <= have), name) for name, alts in FORMAT_FIELDS.items()
          if any(set(f) <= have for f in alts)]
  return [name for _, name in sorted(fits, key=lambda t: -t[0])]


def nothing_loaded(paths: Iterable[str], format: str, bad: BadRecords) -> str:
  """The one-line error for input that gave no pair at all: what went wrong (the commonest kind of
  bad record and where) and what to do (for records lacking fields, the format they look like)."""
  paths = [str(p) for p in paths]
  where = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
  if not bad.total:
    return f"no pairs loaded from {where} with --format={format}"
  kind, count = bad.counts.most_common(1)[0]
  first = bad.examples.get(kind, [""])[0]
  message = (f"no pairs loaded from {where} with --format={format}: {bad.total} bad records, "
             f"{count} {kind} (first: {first})")
  if bad.field_sets:
    fields = bad.field_sets.most_common(1)[0][0]
    suggested = [f for f in formats_for(fields) if f != format]
    needs = " or ".join(", ".join(alt) for alt in FORMAT_FIELDS[format])
    message += f"; --format={format} reads {needs}"
    if suggested:
      message += f"; the records' fields ({', '.join(fields)}) fit --format={suggested[0]}"
  return message


def load_records(paths: Iterable[str], format: str, bad: BadRecords,
                 options: LoaderOptions = LoaderOptions()) -> Iterator[PairRecord]:
  """Every pair of `paths` in `format`; what cannot be used is counted in `bad`."""
  if format not in FORMATS:
    raise ValueError(f"unknown format {format!r}; known: {sorted(FORMATS)}")
  for path in paths:
    yield from FORMATS[format](str(path), bad, options)
