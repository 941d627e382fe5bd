"""The paper's prompts for pair synthesis (arXiv 2410.02229), kept in one place.

`DESCRIBE_PROMPT` asks a code LLM for an instruction describing a snippet; `code_prompt` wraps a
description in the PMP code template, which is both what the response models answer and the
`prompt` of every code pair we write.
"""
from __future__ import annotations

from codepmp_jax.data import templates

DESCRIBE_PROMPT = (
    "Please generate a corresponding instruction based on this code snippet. In the instruction you "
    "need to analyze the intent and function of this code snippet (describe the operation the code "
    "performs and how it achieves its function).\n\n#### Code snippet:\n```{code}```\n\n"
    "#### Instructions:\n")

# The paper's sampling settings for descriptions.
DESCRIBE_SAMPLING = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 1024}


def describe_prompt(code: str) -> str:
  """The prompt that asks the description model what `code` does."""
  return DESCRIBE_PROMPT.replace("{code}", code)


def code_prompt(description: str) -> str:
  """The PMP code template around `description` (the pair's prompt and the responders' input)."""
  return templates.render("code", query=description)


def prompt_texts() -> dict[str, str]:
  """Both templates verbatim, for the manifest."""
  return {"describe": DESCRIBE_PROMPT, "code": templates.TEMPLATES["code"]}
