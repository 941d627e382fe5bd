"""Bad input, seeded: for every loader format, files mixing good records with truncated lines, wrong
types, missing fields, invalid UTF-8, NaN margins, out-of-range answers (and empty or huge fields
that are fine) load without a crash; every good record is kept, every bad line is counted once with
its file and line. A corrupt gzip or Parquet file is counted, not raised. The CLIs given a malformed
file end in one `error:` line naming file and line, exit code 2."""
from __future__ import annotations

import copy
import gzip
import json
import random
import re
import subprocess
import sys
import pathlib

import pytest

from codepmp_jax.data import loaders, records
from codepmp_jax.data.records import BadRecords

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
HUGE = "x = 1\n" * 40_000  # a 240 kB field: big, but a good record


def _gsm8k_answer(i: int) -> str:
  return f"{i}+{i + 2}=<<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### {2 * i + 2}"


def _good(format: str, i: int, rng: random.Random) -> dict:
  """Record i of `format`, valid; some with an empty prompt or a huge field."""
  text = HUGE if i % 7 == 3 else f"text {i}"
  prompt = "" if i % 5 == 1 else f"Question {i}?"
  if format == "pairs":
    return {"id": f"r{i}", "prompt": prompt, "chosen": f"{text} yes", "rejected": f"{text} no",
            **({"margin": rng.uniform(-2, 2)} if i % 2 else {})}
  if format == "codepmp":
    return {"id": f"r{i}", "query": prompt or "q", "better": f"def f{i}(): return 1 # {text}",
            "worse": f"def f{i}(): return 0"}
  if format == "math_shepherd":
    return {"id": f"r{i}", "question": prompt, "chosen": f"Step 1: {text} ки\nThe answer is 2 ки",
            "rejected": "Step 1: guess ки\nThe answer is 3 ки"}
  if format == "gsm8k":
    return {"id": f"r{i}", "question": f"Tom has {i} apples and buys {i + 2}. {text}?", "answer": _gsm8k_answer(i)}
  if format == "logiqa2":
    return {"id": f"r{i}", "text": text, "question": prompt, "options": [f"o{i}-{k}" for k in range(4)],
            "answer": i % 4}
  if format == "reclor":
    return {"id_string": f"r{i}", "context": text, "question": prompt,
            "answers": [f"o{i}-{k}" for k in range(4)], "label": i % 4}
  assert format == "trl"
  if i % 2:
    return {"id": f"r{i}", "prompt": prompt, "chosen": f"{text} yes", "rejected": f"{text} no"}
  return {"id": f"r{i}", "chosen": [{"role": "user", "content": prompt or "hi"},
                                   {"role": "assistant", "content": f"{text} yes"}],
          "rejected": [{"role": "user", "content": prompt or "hi"}, {"role": "assistant", "content": "no"}]}


# The fields each format needs (deleting, nulling or retyping one makes a record bad).
REQUIRED = {"pairs": ("prompt", "chosen", "rejected"), "codepmp": ("query", "better", "worse"),
            "math_shepherd": ("question", "chosen", "rejected"), "gsm8k": ("question", "answer"),
            "logiqa2": ("text", "question", "options", "answer"),
            "reclor": ("context", "question", "answers", "label"), "trl": ("chosen", "rejected")}
WRONG_TYPES = (123, {"a": 1}, True, 4.5)


def _bad_line(format: str, good: dict, rng: random.Random) -> tuple[str, bytes]:
  """(kind, line): a line that no loader may turn into a pair (chosen at random from what fits)."""
  kind, line = _mutate(format, good, rng)
  return kind, line


def _mutate(format: str, good: dict, rng: random.Random) -> tuple[str, bytes]:
  fields = REQUIRED[format]
  kinds = ["truncated", "wrong_type", "missing", "null", "invalid_utf8", "not_object", "identical"]
  if format in ("pairs", "trl"):
    kinds += ["nan_margin", "string_margin"]
  if format in ("logiqa2", "reclor"):
    kinds += ["options_not_list", "answer_out_of_range", "answer_string", "one_option"]
  if format == "codepmp":
    kinds += ["empty_response"]
  kind = rng.choice(kinds)
  obj = copy.deepcopy(good)
  options, answer = (("options", "answer") if format == "logiqa2" else ("answers", "label"))
  if kind == "truncated":
    text = json.dumps(obj)
    return kind, text[:rng.randrange(1, len(text) - 1)].encode()
  if kind == "wrong_type":
    obj[rng.choice(fields)] = rng.choice(WRONG_TYPES)
  elif kind == "missing":
    del obj[rng.choice(fields)]
  elif kind == "null":
    obj[rng.choice(fields)] = None
  elif kind == "invalid_utf8":
    return kind, json.dumps(obj).encode().replace(b'"id', b'"\xff\xfeid', 1)
  elif kind == "not_object":
    return kind, rng.choice([b"[1, 2]", b"42", b'"a string"', b"null"])
  elif kind == "identical":
    if format in ("logiqa2", "reclor"):  # every option the gold one: no wrong option to pair with
      obj[options] = [obj[options][obj[answer]]] * 4
    elif format == "gsm8k":
      obj["answer"] = "no final answer line"
    elif format == "trl" and isinstance(obj["chosen"], list):
      obj["rejected"] = copy.deepcopy(obj["chosen"])
    else:
      a, b = {"codepmp": ("better", "worse")}.get(format, ("chosen", "rejected"))
      obj[b] = obj[a]
  elif kind == "nan_margin":
    obj["margin"] = rng.choice([float("nan"), float("inf")])
  elif kind == "string_margin":
    obj["margin"] = "high"
  elif kind == "options_not_list":
    obj[options] = "A or B"
  elif kind == "answer_out_of_range":
    obj[answer] = rng.choice([4, 7, -1])
  elif kind == "answer_string":
    obj[answer] = "1"
  elif kind == "one_option":
    obj[options], obj[answer] = obj[options][:1], 0
  elif kind == "empty_response":
    obj["better"] = rng.choice(["", "   ", "```python\n```"])
  return kind, json.dumps(obj).encode()


def _ids(format: str, record) -> str:
  return record.id.split("/")[0]


@pytest.fixture(autouse=True)
def every_example(monkeypatch):
  """Keep every bad record's location (not only the first few), to check each one."""
  monkeypatch.setattr(records, "EXAMPLES_KEPT", 10**6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("format", sorted(REQUIRED))
def test_fuzzed_file_keeps_every_good_record_and_counts_every_bad_line(format, seed, tmp_path):
  rng = random.Random(f"{format}/{seed}")
  lines, good_ids, bad_lines, same_options = [], [], [], []
  for i in range(60):
    good = _good(format, i, rng)
    if rng.random() < 0.4:
      kind, line = _bad_line(format, good, rng)
      lines.append(line)
      bad_lines.append(len(lines))
      if kind == "identical":  # a question whose options are all the gold one: no pair, yet a question
        same_options.append(f"r{i}")
    else:
      lines.append(json.dumps(good).encode())
      good_ids.append(f"r{i}")
    if rng.random() < 0.1:
      lines.append(b"   ")  # blank lines are skipped, not counted
  gz = seed % 2 == 1
  path = tmp_path / (f"{format}.jsonl.gz" if gz else f"{format}.jsonl")
  data = b"\n".join(lines) + b"\n"
  path.write_bytes(gzip.compress(data) if gz else data)

  bad = BadRecords()
  kept = list(loaders.load_records([str(path)], format, bad))
  assert sorted(set(_ids(format, r) for r in kept)) == sorted(good_ids)
  per_record = {"logiqa2": 3, "reclor": 3}.get(format, 1)
  assert len(kept) == per_record * len(good_ids)
  assert bad.total == len(bad_lines), bad.report()
  where = sorted(int(re.match(rf"{re.escape(str(path))}:(\d+): ", e).group(1))
                 for examples in bad.examples.values() for e in examples)
  assert where == bad_lines, bad.report()
  if format in ("logiqa2", "reclor"):  # evaluation's reader of the same files agrees
    mc_bad = BadRecords()
    questions = list(loaders.load_multiple_choice([str(path)], mc_bad))
    assert sorted(q.id for q in questions) == sorted(good_ids + same_options)
    assert mc_bad.total == len(bad_lines) - len(same_options)


def test_a_damaged_gzip_keeps_the_lines_before_the_damage(tmp_path):
  rows = [json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) for i in range(200)]
  blob = gzip.compress(("\n".join(rows) + "\n").encode())
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(blob[:len(blob) // 2])
  bad = BadRecords()
  kept = list(loaders.load_records([str(path)], "pairs", bad))
  assert 0 < len(kept) < 200 and [r.prompt for r in kept] == [f"p{i}" for i in range(len(kept))]
  assert bad.counts == {"corrupt_file": 1}
  assert bad.examples["corrupt_file"][0].startswith(f"{path}:{len(kept) + 1}: unreadable")


@pytest.mark.parametrize("damage", ["truncated", "not_parquet", "empty"])
def test_a_corrupt_parquet_file_is_counted_not_raised(damage, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  good = tmp_path / "good.parquet"
  pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(5)]), good)
  path = tmp_path / "bad.parquet"
  path.write_bytes({"truncated": good.read_bytes()[:-40], "not_parquet": b'{"prompt": "p"}\n',
                    "empty": b""}[damage])
  bad = BadRecords()
  kept = list(loaders.load_records([str(good), str(path)], "pairs", bad))
  assert len(kept) == 5
  assert bad.counts == {"corrupt_file": 1}
  assert bad.examples["corrupt_file"][0].startswith(f"{path}:0: not a readable Parquet file")


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"codepmp_jax.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
  """The run ended with exit 2 and, last on stderr, one `error:` line holding each fragment."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in last, last
  return last


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
  """A random tiny model with a sentencepiece tokenizer, saved as a checkpoint (as test_score's)."""
  import sysconfig

  import flax.linen as nn
  import jax

  from codepmp_jax import checkpoint
  from codepmp_jax.data.tokenizer import train_sentencepiece
  from codepmp_jax.model import transformer
  from codepmp_jax.model.config import get_preset
  root = tmp_path_factory.mktemp("fuzz_ckpt")
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
  tokenizer = train_sentencepiece(files, vocab_size=400, out_prefix=root / "sp")
  config = get_preset("tiny", vocab_size=400, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
  params = nn.unbox(transformer.init_params(config, jax.random.key(1)))
  return checkpoint.save_model(root / "ckpt", params, config, tokenizer)


@pytest.mark.slow
def test_score_of_a_file_with_no_usable_line_fails_naming_the_first(ckpt, tmp_path):
  src = tmp_path / "in.jsonl"
  src.write_bytes(b'{"prompt": "p"}\n{"text": \n\xff\xfe\n[1]\n')
  out = tmp_path / "out.jsonl"
  last = _error_line(_run("score", f"--checkpoint={ckpt}", f"--input={src}", f"--output={out}", "--template=none"),
                     f"{src}: no usable lines (4 bad, the first {src}:1: ")
  assert not out.exists()
  src.write_bytes(b'{"text": "import os"}\n\xff\xfe\n')  # a line that is not UTF-8 is one bad line
  result = _run("score", f"--checkpoint={ckpt}", f"--input={src}", f"--output={out}", "--template=none",
                "--max_length=32", "--batch_size=8")
  assert result.returncode == 0 and f"{src}:2: not UTF-8" in result.stderr, result.stderr[-3000:]
  assert "scored 1 records" in result.stdout and "1 bad lines" in result.stdout
  del last


@pytest.mark.slow
def test_eval_clis_name_file_and_line_of_malformed_input(ckpt, tmp_path):
  """eval pairwise / mc on files with no usable record, bon with bad candidates or scores."""
  bad_pairs = tmp_path / "pairs.jsonl"
  bad_pairs.write_bytes(b'{"prompt": "p", "chosen": 1, "rejected": "b"}\n{"prompt": \n')
  _error_line(_run("eval", "pairwise", f"--checkpoint={ckpt}", f"--data={bad_pairs}", "--format=pairs",
                   f"--out={tmp_path / 'r.json'}"), f"{bad_pairs}:1: ", "no pairs loaded")
  logic = tmp_path / "logic.jsonl"
  logic.write_text(json.dumps({"id": 1, "text": "t", "question": "q", "options": "A or B", "answer": 0}) + "\n"
                   + json.dumps({"id": 2, "text": "t", "question": "q", "options": ["a", "b"], "answer": 5}) + "\n")
  _error_line(_run("eval", "mc", f"--checkpoint={ckpt}", f"--data={logic}", "--format=logiqa2",
                   f"--out={tmp_path / 'r.json'}"), f"{logic}:1: ", "no pairs loaded")

  candidates = tmp_path / "c.jsonl"
  candidates.write_text(json.dumps({"id": 7, "question": "?", "answer": "#### 4", "candidates": ["4", "5"]}) + "\n")
  for line, fragment in ((json.dumps({"rewards": [0.0, 1.0]}), f"{tmp_path / 's.jsonl'}:1: "),
                         (json.dumps({"id": 7, "rewards": [0.0, "high"]}), f"{tmp_path / 's.jsonl'}:1: field 'rewards'"),
                         ('{"id": 7, "rewards": [0.0,', f"{tmp_path / 's.jsonl'}:1: invalid JSON")):
    (tmp_path / "s.jsonl").write_text(line + "\n")
    _error_line(_run("eval", "bon", f"--candidates={candidates}", f"--scores={tmp_path / 's.jsonl'}",
                     "--task=gsm8k", "--n=1", f"--out={tmp_path / 'r.json'}"), fragment)
  candidates.write_bytes(b'{"id": 7, "question": "\xff", "candidates": ["4"]}\n')
  _error_line(_run("eval", "bon", f"--candidates={candidates}", f"--scores={tmp_path / 's.jsonl'}",
                   "--task=gsm8k", "--n=1", f"--out={tmp_path / 'r.json'}"), f"{candidates}:1")


@pytest.mark.parametrize("content, fragment", [
    (b'{"id": 1, "prompt": "q"}\n{"prompt": \n', ":2: invalid JSON"),
    (b'{"id": 1, "prompt": "q"}\n[1, 2]\n', ":2: expected a JSON object"),
    (b'{"id": [1], "prompt": "q"}\n', ":1: field 'id' must be a string or integer"),
    (b'{"id": 1, "prompt": "\xff\xfe"}\n', ":1: unreadable"),
    (b'{"id": 1, "prompt": "q"}\n{"id": 1, "question": "q"}\n', ":2: duplicate id"),
])
def test_sample_candidates_names_file_and_line_of_malformed_input(content, fragment, tmp_path):
  prompts = tmp_path / "in.jsonl"
  prompts.write_bytes(content)
  _error_line(_run("sample_candidates", "--checkpoint=unused", "--template=none", f"--input={prompts}",
                   f"--output={tmp_path / 'out.jsonl'}"), f"{prompts}{fragment}")
