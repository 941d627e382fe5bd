r"""Sample N candidates per prompt from a checkpoint: the input of Best-of-N evaluation.

  python -m codepmp_jax.sample_candidates --checkpoint=CKPT --input=IN.jsonl --output=OUT.jsonl \
      --n=8 --temperature=0.7 --top_p=1.0 --max_new_tokens=512 [--template=gsm8k|math|code|logic|chat|none] \
      [--batch_size=8] [--top_k=0] [--stop=STR ...] [--seed=0] [--add_bos] [--mesh=-1,1,1] \
      [--scan_layers]

Input lines hold `prompt` (used verbatim) or `question` (rendered with --template, by default the
prompt format stored with the checkpoint); `--input` may also name a registered data set
(`gsm8k/test`, found by `data.registry`). Candidates are decoded without special tokens. Every line
is written back with `"candidates": [...]` and `"finish_reasons": [...]` added, in input order.
A line without `id` gets its line number as id. Rerunning with the same output skips the ids
already written there, so an interrupted run resumes; each prompt's samples depend only on the
seed and its id, so resumed and uninterrupted runs write the same candidates. Every path may be
`gs://...` (through etils.epath; an output there is rewritten whole after each batch, since object
stores cannot append).
"""
from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator

from absl import app, flags
from etils import epath
from tqdm import tqdm

from codepmp_jax import checkpoint, cli, sharding, storage
from codepmp_jax.data import registry, templates
from codepmp_jax.data.records import read_json_objects
from codepmp_jax.data.tokenizer import load_tokenizer
from codepmp_jax.model.config import resolve_attention
from codepmp_jax.model.generate import Generator, SamplingConfig

# GSM8K questions use the math template (`Instruction:{question}\n\nResponse:`).
TEMPLATE_ALIASES = {"gsm8k": "math"}

def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags (defined only when run as a program, so importing this module adds none)."""
  def define(kind: str, name: str, default: object, help: str, *args: object) -> None:
    getattr(flags, f"DEFINE_{kind}")(name, default, *args, help, flag_values=values)

  define("string", "checkpoint", None, "Model checkpoint or training workdir (with its tokenizer).")
  define("string", "input", None, "JSONL of prompts: `prompt`, or `question` with --template; or a "
         "registered data set (gsm8k/test).")
  define("string", "data_dir", None, "Where registered data sets live (default: $CODEPMP_DATA, "
         "../shared/data, the cache, else downloaded).")
  define("string", "output", None, "JSONL to write (appended to when resuming).")
  define("integer", "n", 8, "Candidates per prompt.")
  define("float", "temperature", 0.7, "Sampling temperature; 0 is greedy.")
  define("float", "top_p", 1.0, "Nucleus sampling mass; 1 keeps every token.")
  define("integer", "top_k", 0, "Keep only the k most likely tokens; 0 keeps all.")
  define("integer", "max_new_tokens", 512, "Most tokens generated per candidate.")
  define("enum", "template", None, "Prompt template for records with `question` (none: `prompt` "
         "verbatim; default: the checkpoint's stored prompt format, else none).",
         list(templates.FORMATS) + sorted(TEMPLATE_ALIASES))
  define("integer", "batch_size", 8, "Prompts decoded together (each with its n samples).")
  define("multi_string", "stop", [], "Stop string (repeatable); the text is cut before it.")
  define("integer", "seed", 0, "Sampling seed.")
  define("bool", "add_bos", False, "Put the tokenizer's BOS token before every prompt.")
  define("list", "mesh", ["-1", "1", "1"], "Mesh shape (data, fsdp, tensor); -1 = the rest.")
  define("bool", "scan_layers", False, "Decode with nn.scan over layers (compiles faster, runs slower "
         "on CPU).")


def prompt_text(record: dict, template: str, where: str) -> str:
  """The prompt of one input record: `prompt` verbatim, or its fields rendered with `template`."""
  template = TEMPLATE_ALIASES.get(template, template)
  if template == "chat" and isinstance(record.get("question"), str):  # a conversational model
    return templates.render_chat([{"role": "user", "content": record["question"]}])
  if template in ("none", "chat"):
    if not isinstance(record.get("prompt"), str):
      raise ValueError(f"{where}: field 'prompt' must be a string (or pass --template for 'question')")
    return record["prompt"]
  fields = {k: v for k, v in record.items() if isinstance(v, str)}
  if "question" in fields:
    fields.setdefault("query", fields["question"])  # the code template calls it `query`
  try:
    return templates.render(template, **fields)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def read_records(path: epath.Path) -> Iterator[tuple[str, dict]]:
  """(where, record) for every non-blank line, the line number standing in for a missing id."""
  for line_no, record in read_json_objects(path):
    where = f"{path}:{line_no}"
    if "id" not in record:
      record["id"] = line_no
    elif not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
      raise ValueError(f"{where}: field 'id' must be a string or integer")
    yield where, record


def stream_id(record_id: str | int) -> int:
  """The random stream of a record (a stable hash of its id)."""
  return zlib.crc32(str(record_id).encode())


def main(argv: list[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """Samples the candidates of every prompt of --input not yet in --output, appending them there."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])} (flags are --name=value)")
  for name in ("checkpoint", "input", "output"):
    if not values[name].value:
      raise app.UsageError(f"--{name} is required")
  source = epath.Path(values.checkpoint)
  template = values.template or templates.load_prompt_format(source) or "none"
  out_path = epath.Path(values.output)
  done_ids = {str(r["id"]) for _, r in read_records(out_path)} if out_path.exists() else set()
  todo, seen = [], set()
  for where, record in read_records(registry.resolve(values.input, values.data_dir)):
    key = str(record["id"])
    if key in seen:
      raise ValueError(f"{where}: duplicate id {key!r}")
    seen.add(key)
    if key not in done_ids:
      todo.append((record, prompt_text(record, template, where)))
  print(f"{len(seen)} prompts, {len(done_ids & seen)} already in {out_path}, {len(todo)} to generate "
        f"(prompt format {template})")

  params, config = checkpoint.load_model(source)
  tokenizer = load_tokenizer(source / checkpoint.TOKENIZER)
  mesh = sharding.make_mesh([int(s) for s in values.mesh])
  # The attention of this device (a checkpoint records the one it was trained with).
  config = resolve_attention(config.replace(scan_layers=values.scan_layers, attention="auto"),
                             mesh.devices.flat[0].platform)
  generator = Generator(params, config, tokenizer=tokenizer, mesh=mesh)
  sampling = SamplingConfig(max_new_tokens=values.max_new_tokens, temperature=values.temperature,
                            top_k=values.top_k, top_p=values.top_p, n=values.n, seed=values.seed,
                            stop=tuple(values.stop))
  tokens, start = 0, time.perf_counter()
  # Appended to (rewritten whole at each batch where remote), so an interrupted run resumes.
  with storage.LineWriter(out_path) as out, tqdm(total=len(todo), unit="prompt", desc="generate") as bar:
    for i in range(0, len(todo), values.batch_size):
      batch = todo[i:i + values.batch_size]
      results = generator.generate_text(
          [p for _, p in batch], sampling, [stream_id(r["id"]) for r, _ in batch], values.add_bos)
      for (record, _), completions in zip(batch, results):
        record = {**record, "candidates": [c.text for c in completions],
                  "finish_reasons": [c.finish_reason for c in completions]}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        tokens += sum(len(c.tokens) for c in completions)
      out.flush()
      bar.update(len(batch))
      bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.1f}")
  print(f"wrote {len(todo)} records to {out_path} ({tokens} tokens)")


if __name__ == "__main__":
  cli.run(main, define_flags)
