"""The published CodePMP prompt templates (arXiv 2410.02229), one `render` for all of them.

`code` wraps a code description for PMP pairs, `math` a math question (Math-Shepherd, GSM8K),
`logic` a passage and question (ReClor, LogiQA 2.0); `none` passes the prompt through. The
response follows the rendered prompt directly, then the end token.

A model records the format it was trained on (`save_prompt_format` / `load_prompt_format`, one of
`FORMATS`: the templates plus `chat`, the rendering of TRL-style conversations), and
`chat_template` turns that format into a transformers chat template giving the same text.
"""
from __future__ import annotations

import json

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


# ----------------------------------------------------------------------------- stored prompt format

PROMPT_FORMAT_FILE = "prompt_format.json"
# `chat` is the rendering of conversational (TRL-style) data: `render_chat(prompt) + reply`.
FORMATS = (*TEMPLATES, "chat")
# The part of each single-turn template that a user message fills (logic: "Passage: ...\n\nQuestion: ...").
_USER_SLOT = {"code": "{query}", "math": "{question}", "logic": "Passage: {context}\n\nQuestion: {question}",
              "none": "{prompt}"}


def save_prompt_format(directory, template: str) -> None:
  """Record in a checkpoint / workdir / export which prompt format its model was trained on.

  Writes `prompt_format.json` ({"template", "prompt", "chat_template"}); `load_prompt_format`
  reads it back and `score`, `eval`, `generate` and `convert --to_hf` use it by default.
  """
  from etils import epath
  if template not in FORMATS:
    raise ValueError(f"unknown prompt format {template!r}; known: {list(FORMATS)}")
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  stored = {"template": template, "prompt": TEMPLATES.get(template, "render_chat(messages)"),
            "chat_template": chat_template(template)}
  (directory / PROMPT_FORMAT_FILE).write_text(json.dumps(stored, indent=2) + "\n")


def load_prompt_format(directory) -> str | None:
  """The prompt format stored with a checkpoint, workdir or export, or None if it records none.

  Reads `prompt_format.json`, else a `template` in the run's `config.json` (older workdirs).
  A stored but unknown format is an error naming the file.
  """
  from etils import epath
  directory = epath.Path(directory)
  for name, key in ((PROMPT_FORMAT_FILE, None), ("config.json", "data")):
    file = directory / name
    if not file.is_file():
      continue
    try:
      stored = json.loads(file.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{file}: invalid JSON at line {e.lineno} ({e.msg})") from None
    holders = [stored] if key is None else [stored.get(key) or {}, stored]
    for holder in holders:
      template = holder.get("template") if isinstance(holder, dict) else None
      if template is None:
        continue
      if template not in FORMATS:
        raise ValueError(f"{file}: unknown prompt format {template!r}; known: {list(FORMATS)}")
      return template
  return None


def render_conversation(template: str, messages: list[dict[str, str]]) -> tuple[str, str]:
  """(prompt, reply) of a conversation as the model with `template` was trained on it.

  Single-turn templates take one user message (then an optional assistant reply); `chat` takes
  any conversation. The training text is `prompt + reply + eos`; `chat_template` renders the same.
  """
  reply = ""
  if messages and messages[-1]["role"] == "assistant":
    messages, reply = messages[:-1], messages[-1]["content"]
  if template == "chat":
    return render_chat(messages), reply
  if template not in TEMPLATES:
    raise ValueError(f"unknown prompt format {template!r}; known: {list(FORMATS)}")
  if len(messages) != 1 or messages[0]["role"] != "user":
    raise ValueError(f"prompt format {template!r} takes one user message (then the assistant's reply); "
                     f"got roles {[m['role'] for m in messages]}")
  before, _, after = TEMPLATES[template].partition(_USER_SLOT[template])
  return before + messages[0]["content"] + after, reply


def _jinja_string(text: str) -> str:
  return json.dumps(text)  # a JSON string literal is a valid Jinja string literal


def chat_template(template: str) -> str:
  """A Jinja chat template (transformers `apply_chat_template`) rendering exactly the training text.

  A user/assistant conversation becomes `prompt + reply + eos_token`, as `render_conversation`
  and the data loaders make it; `add_generation_prompt` without a reply gives the prompt alone.
  """
  end = "{%- if messages[-1]['role'] == 'assistant' %}{{ messages[-1]['content'] + eos_token }}{%- endif %}"
  if template == "chat":
    return ("{%- set turns = messages[:-1] if messages[-1]['role'] == 'assistant' else messages %}"
            "{%- for m in turns %}{{ m['role'] | capitalize + ': ' + m['content'] + '\\n\\n' }}{%- endfor %}"
            "{{- 'Assistant:' }}" + end)
  if template not in TEMPLATES:
    raise ValueError(f"unknown prompt format {template!r}; known: {list(FORMATS)}")
  before, _, after = TEMPLATES[template].partition(_USER_SLOT[template])
  check = ("{%- if messages | length not in (1, 2) or messages[0]['role'] != 'user' or "
           "(messages | length == 2 and messages[1]['role'] != 'assistant') %}"
           "{{ raise_exception('this reward model was trained on one user message and the assistant reply "
           "(prompt format " + template + ")') }}{%- endif %}")
  return (check + "{{- " + _jinja_string(before) + " + messages[0]['content'] + " + _jinja_string(after)
          + " }}" + end)
