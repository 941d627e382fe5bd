"""Stored prompt formats: every format's chat template renders exactly what the loaders train on."""
from __future__ import annotations

import json

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from codepmp_jax.data import loaders, templates
from codepmp_jax.data.records import BadRecords

EOS = "<|end|>"


def _apply(template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
  """What transformers' apply_chat_template renders (its sandboxed Jinja environment)."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(templates.chat_template(template)).render(
      messages=messages, eos_token=EOS, add_generation_prompt=add_generation_prompt)


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _user(content):
  return {"role": "user", "content": content}


def _assistant(content):
  return {"role": "assistant", "content": content}


def test_chat_templates_render_the_loaders_training_text(tmp_path):
  cases = [  # (loader format, row, the conversation a client would send)
      ("codepmp", {"query": "Sort a list.", "better": "sorted(xs)", "worse": "xs"},
       [_user("Sort a list."), _assistant("sorted(xs)")]),
      ("math_shepherd", {"question": "2+2?", "chosen": " 4", "rejected": " 5"},
       [_user("2+2?"), _assistant(" 4")]),
      ("logiqa2", {"text": "All A are B.", "question": "Is A B?", "options": ["Yes", "No"], "answer": 0},
       [_user("Passage: All A are B.\n\nQuestion: Is A B?"), _assistant("Yes")]),
      ("pairs", {"prompt": "Q: x\nA:", "chosen": " y", "rejected": " z"}, [_user("Q: x\nA:"), _assistant(" y")]),
      ("trl", {"chosen": [_user("Hi"), _assistant("Hey"), _user("Sky?"), _assistant("Blue.")],
               "rejected": [_user("Hi"), _assistant("Hey"), _user("Sky?"), _assistant("Red.")]},
       [_user("Hi"), _assistant("Hey"), _user("Sky?"), _assistant("Blue.")]),
  ]
  for format, row, conversation in cases:
    record = next(loaders.load_records([_write(tmp_path / f"{format}.jsonl", [row])], format, BadRecords()))
    template = loaders.FORMAT_TEMPLATES[format]
    assert _apply(template, conversation) == record.prompt + record.chosen + EOS, format
    assert _apply(template, conversation[:-1], add_generation_prompt=True) == record.prompt, format
    assert templates.render_conversation(template, conversation) == (record.prompt, record.chosen)
  with pytest.raises(jinja2.exceptions.TemplateError, match="one user message"):
    _apply("math", [_user("a"), _assistant("b"), _user("c"), _assistant("d")])
  with pytest.raises(ValueError, match="takes one user message"):
    templates.render_conversation("math", [{"role": "system", "content": "s"}, _user("a")])


def test_prompt_format_round_trip_and_errors(tmp_path):
  assert templates.load_prompt_format(tmp_path) is None
  (tmp_path / "config.json").write_text(json.dumps({"data": {"template": "logic"}}))
  assert templates.load_prompt_format(tmp_path) == "logic"  # older workdirs name it in config.json
  templates.save_prompt_format(tmp_path, "math")
  assert templates.load_prompt_format(tmp_path) == "math"
  stored = json.loads((tmp_path / templates.PROMPT_FORMAT_FILE).read_text())
  assert stored["prompt"] == templates.TEMPLATES["math"] and stored["chat_template"] == templates.chat_template("math")
  with pytest.raises(ValueError, match="unknown prompt format 'maths'"):
    templates.save_prompt_format(tmp_path, "maths")
  (tmp_path / templates.PROMPT_FORMAT_FILE).write_text('{"template": "maths"}')
  with pytest.raises(ValueError, match=r"prompt_format.json: unknown prompt format 'maths'"):
    templates.load_prompt_format(tmp_path)
