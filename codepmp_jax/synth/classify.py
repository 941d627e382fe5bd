"""The released synthesis' type stage: label each file engineering / non-engineering, then sample.

The released CodePMP scripts (FAMOR-FY/CodePMP) first ask a small LLM (Qwen2-1.5B) whether each
file is engineering code (application, library or infrastructure code: modules, services, build
and tooling) or non-engineering code (exercises, snippets, algorithm practice, notebooks, data
dumps), with a confidence, and sample the corpus by type and confidence before description. This
module is that stage over our backends (`synth/backends.py`, any OpenAI-compatible server, or the
local JAX generator); the prompt is ours, as the released one is not published.

A file is kept when its label parses, its type is one of `types`, its confidence is at least
`min_confidence`, and a draw seeded by (seed, file hash) falls below its type's sampling ratio; so
the selection is the same on every run and for any split of the corpus into workers. Every
outcome is counted (`classify_counts`, written to the manifest); nothing is dropped silently.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import re
from typing import Sequence

from codepmp_jax.synth.backends import Backend
from codepmp_jax.synth.corpus import Document

TYPES = ("engineering", "non-engineering")
PROMPT = (
    "Classify the following code file as engineering code (part of an application, library, "
    "service or tool: modules, APIs, configuration, build and infrastructure code) or "
    "non-engineering code (exercises, short snippets, algorithm practice, tutorials, notebooks, "
    "data dumps). Answer with one JSON object only, like "
    '{{"type": "engineering", "confidence": 0.9}}, where type is "engineering" or '
    '"non-engineering" and confidence is a number between 0 and 1.\n\n'
    "#### Code file:\n```{code}```\n\n#### Answer:\n")
_OBJECT = re.compile(r"\{[^{}]*\}")
_TYPE = re.compile(r"\b(non[- ]?engineering|engineering)\b", re.IGNORECASE)
_CONFIDENCE = re.compile(r"confidence\W{0,4}(\d*\.?\d+)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ClassifySettings:
  """Which files the stage keeps, and how the classifier is asked.

  ratios: fraction of each type kept after the confidence cut (1.0 keeps all of it).
  max_chars: the file is cut to this many characters in the prompt (a small model's context).
  """
  types: tuple[str, ...] = TYPES
  min_confidence: float = 0.0
  ratios: tuple[tuple[str, float], ...] = (("engineering", 1.0), ("non-engineering", 1.0))
  seed: int = 0
  temperature: float = 0.0
  top_p: float = 1.0
  max_tokens: int = 32
  max_chars: int = 4000
  batch: int = 64

  def __post_init__(self):
    unknown = sorted((set(self.types) | {t for t, _ in self.ratios}) - set(TYPES))
    if unknown:
      raise ValueError(f"unknown code types {unknown}; expected some of {TYPES}")
    if not 0 <= self.min_confidence <= 1:
      raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
    if any(not 0 <= r <= 1 for _, r in self.ratios):
      raise ValueError(f"sampling ratios must be in [0, 1], got {dict(self.ratios)}")


def classify_prompt(code: str, max_chars: int) -> str:
  """The classifier's prompt for one file (cut to `max_chars`)."""
  return PROMPT.format(code=code[:max_chars])


def parse_label(text: str) -> tuple[str, float] | None:
  """(type, confidence) from the classifier's answer, or None when it names no type.

  Reads the first JSON object with `type` and `confidence`, else the first type word and a
  `confidence: x` in prose; a missing confidence is None -> the label is unusable, as is a
  confidence outside [0, 1] (a percentage like 90 is read as 0.9).
  """
  label, confidence = None, None
  for match in _OBJECT.finditer(text):
    try:
      obj = json.loads(match.group(0))
    except json.JSONDecodeError:
      continue
    if isinstance(obj, dict) and isinstance(obj.get("type"), str):
      label, confidence = obj["type"], obj.get("confidence")
      break
  if label is None:
    found = _TYPE.search(text)
    conf = _CONFIDENCE.search(text)
    if found is None:
      return None
    label, confidence = found.group(1), conf.group(1) if conf else None
  label = label.strip().lower().replace(" ", "-").replace("_", "-")
  if label == "nonengineering":
    label = "non-engineering"
  if label not in TYPES:
    return None
  try:
    confidence = float(confidence)
  except (TypeError, ValueError):
    return None
  if 1 < confidence <= 100:
    confidence /= 100
  if not 0 <= confidence <= 1:
    return None
  return label, confidence


def _draw(seed: int, doc: Document) -> float:
  """A uniform number in [0, 1) fixed by the seed and the file's content hash."""
  digest = hashlib.sha256(f"{seed}:{doc.sha256}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2 ** 64


def select(docs: Sequence[Document], backend: Backend, settings: ClassifySettings
           ) -> tuple[list[Document], dict[str, int]]:
  """The documents the stage keeps (in order, labelled in `extra`) and the counts of every outcome.

  Kept documents get `extra["code_type"]` and `extra["type_confidence"]`.
  """
  counts = collections.Counter(classified=0)
  ratios = dict(settings.ratios)
  kept = []
  for start in range(0, len(docs), settings.batch):
    batch = docs[start:start + settings.batch]
    answers = backend.generate([classify_prompt(d.content, settings.max_chars) for d in batch],
                               temperature=settings.temperature, top_p=settings.top_p,
                               max_tokens=settings.max_tokens)
    for doc, answer in zip(batch, answers):
      counts["classified"] += 1
      label = parse_label(answer)
      if label is None:
        counts["unparsable_label"] += 1
        continue
      code_type, confidence = label
      counts[f"type_{code_type}"] += 1
      if code_type not in settings.types:
        counts["type_not_selected"] += 1
      elif confidence < settings.min_confidence:
        counts["below_min_confidence"] += 1
      elif _draw(settings.seed, doc) >= ratios.get(code_type, 1.0):
        counts[f"sampled_out_{code_type}"] += 1
      else:
        counts["kept"] += 1
        kept.append(dataclasses.replace(
            doc, extra={**doc.extra, "code_type": code_type, "type_confidence": confidence}))
  counts.setdefault("kept", 0)
  return kept, dict(sorted(counts.items()))


def parse_ratios(text: str) -> tuple[tuple[str, float], ...]:
  """`engineering:1,non-engineering:0.3` -> (("engineering", 1.0), ("non-engineering", 0.3))."""
  try:
    pairs = [item.split(":") for item in text.split(",") if item.strip()]
    return tuple((name.strip(), float(value)) for name, value in pairs)
  except ValueError:
    raise ValueError(
        f"--classify_ratios must be type:ratio pairs like engineering:1,non-engineering:0.3, "
        f"got {text!r}") from None


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The stage's flags in the synth command line (off unless --classify_model is set)."""
  d = ClassifySettings()
  g = parser.add_argument_group("type classification (optional stage, before the strategy)")
  g.add_argument("--classify_model", default="",
                 help="classifier model (released: Qwen2-1.5B); '' skips the stage")
  g.add_argument("--classify_base_url", default="", help="its server ('': --base_url)")
  g.add_argument("--classify_types", default=",".join(d.types), help=f"types kept, from {TYPES}")
  g.add_argument("--classify_min_confidence", type=float, default=d.min_confidence,
                 help="drop files labelled with a lower confidence")
  g.add_argument("--classify_ratios",
                 default=",".join(f"{t}:{r:g}" for t, r in d.ratios),
                 help="fraction of each type kept, e.g. engineering:1,non-engineering:0.3")
