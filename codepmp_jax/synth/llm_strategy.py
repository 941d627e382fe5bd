"""The paper's LLM strategy (`llm`) and its `human_vs_weak` variant: documents -> pair records.

llm: describe each snippet with the paper's prompt (temperature 0.7, top_p 1, 1024 tokens), then
the strong model answers the description in the code template -> chosen, the weak model -> rejected.
human_vs_weak: chosen is the real code; the weak model's answer (its code block, when it wrote one)
is rejected. Empty answers, answers that are only an empty code fence, identical pairs and outputs
overlapping an evaluation set are dropped and counted.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import re

from codepmp_jax.synth import prompts
from codepmp_jax.synth.backends import Backend
from codepmp_jax.synth.corpus import Document
from codepmp_jax.synth.decontaminate import Decontaminator

STRATEGIES = ("llm", "human_vs_weak")
_FENCE = re.compile(r"```[^\n`]*\n?(.*?)```", re.S)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Sampling settings of one generation step (the paper's: 0.7, 1.0, 1024)."""
  temperature: float = 0.7
  top_p: float = 1.0
  max_tokens: int = 1024

  def kwargs(self) -> dict:
    """As keyword arguments of `Backend.generate`."""
    return dataclasses.asdict(self)


def is_empty_answer(text: str) -> bool:
  """Whether an answer has no content once code fences are removed."""
  return not re.sub(r"```[^\n`]*", "", text).strip()


def _encodable(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def code_block(text: str) -> str:
  """The first fenced code block of an answer, or the whole answer when it has none."""
  m = _FENCE.search(text)
  return m.group(1).strip("\n") if m else text.strip("\n")


def shard_pairs(docs: list[Document], strategy: str, describer: Backend, strong: Backend | None,
                weak: Backend, describe: Sampling, respond: Sampling,
                decontaminator: Decontaminator | None) -> tuple[list[dict], collections.Counter]:
  """The pair records of a batch of documents, in document order, and the drop counts."""
  counts = collections.Counter(documents=len(docs))
  descriptions = describer.generate([prompts.describe_prompt(d.content) for d in docs],
                                    **describe.kwargs())
  kept = []
  for doc, description in zip(docs, descriptions):
    if is_empty_answer(description):
      counts["empty_description"] += 1
    else:
      kept.append((doc, description.strip()))
  code_prompts = [prompts.code_prompt(desc) for _, desc in kept]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    weak_answers = pool.submit(weak.generate, code_prompts, **respond.kwargs())
    if strategy == "llm":
      chosen_answers = strong.generate(code_prompts, **respond.kwargs())
    else:
      chosen_answers = [doc.content for doc, _ in kept]
    rejected_answers = weak_answers.result()
  records = []
  for (doc, _), prompt, chosen, rejected in zip(kept, code_prompts, chosen_answers, rejected_answers):
    if strategy == "human_vs_weak":
      rejected = code_block(rejected)
    if is_empty_answer(chosen):
      counts["empty_chosen"] += 1
    elif is_empty_answer(rejected):
      counts["empty_rejected"] += 1
    elif not _encodable(chosen) or not _encodable(rejected):
      counts["invalid_unicode"] += 1
    elif chosen.strip() == rejected.strip():
      counts["identical"] += 1
    elif decontaminator is not None and decontaminator.contaminated(f"{prompt}\n{chosen}\n{rejected}"):
      counts["contaminated_output"] += 1
    else:
      key = f"{strategy}::{doc.source_id}::{doc.sha256}"
      records.append({
          "prompt": prompt, "chosen": chosen, "rejected": rejected,
          "id": hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:20],
          "meta": {"strategy": strategy, "source": doc.source_id, "lang": doc.lang,
                   "describer": describer.name, "strong": strong.name if strong else "human",
                   "weak": weak.name}})
  return records, counts
