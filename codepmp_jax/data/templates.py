"""The published CodePMP prompt templates (arXiv 2410.02229), one `render` for all of them.

`code` wraps a code description for PMP pairs, `math` a math question (Math-Shepherd, GSM8K),
`logic` a passage and question (ReClor, LogiQA 2.0); `none` passes the prompt through. The
response follows the rendered prompt directly, then the end token.
"""
from __future__ import annotations

TEMPLATES: dict[str, str] = {
    "code": ("### Instruction: Please read the following code description carefully and generate "
             "the actual code implementation based on this description. Please make sure the code "
             "is logical and readable.\n\n### Code Description:\n{query}\n\n### Response:"),
    "math": "Instruction:{question}\n\nResponse:",
    "logic": ("Instruction: Please answer the following questions based on the passages.\n\n"
              "Passage: {context}\n\nQuestion: {question}\n\nResponse:"),
    "none": "{prompt}",
}


def render(template: str, **fields: str) -> str:
  """The prompt of `template` with its fields filled in (text inside fields is kept verbatim)."""
  if template not in TEMPLATES:
    raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
  try:
    return TEMPLATES[template].format_map(fields)
  except KeyError as e:
    raise ValueError(f"template {template!r} needs field {e.args[0]!r}; got {sorted(fields)}") from None


def render_chat(messages: list[dict[str, str]]) -> str:
  """A conversation prefix as plain text, ending where the assistant's next reply starts.

  Each message becomes `Role: content` separated by blank lines, then `Assistant:`, so TRL-style
  conversational pairs read like the single-turn `Instruction:/Response:` templates.
  """
  turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
  return "\n\n".join(turns + ["Assistant:"])
