"""Score JSONL records with a reward model checkpoint.

  python -m codepmp_jax.score --checkpoint=CKPT --input=IN.jsonl --output=OUT.jsonl \
      [--batch_size=16] [--max_length=1024] [--template=none|code|math|logic|chat] [--mesh=-1,1,1]

Each input line is one of
  {"input_ids": [...]}                 scored verbatim (no template, nothing added);
  {"text": ...}                        text + end token;
  {"prompt", "response"}               template(prompt) + response + end token (the template
                                       is the checkpoint's stored prompt format unless --template);
  {"prompt", "chosen", "rejected"}     both responses, as above.
The output repeats each record with `"reward"` (or `"chosen_reward"` and `"rejected_reward"`) added.
Texts longer than --max_length are cut by the checkpoint's truncation policy (`truncation.json`;
`keep_end` by default: the prompt from the left, then the start of the response, so the answer
stays); how many lost prompt or response tokens is printed.
A bad line is reported with its line number and left out of the output; the counts are printed.
`RewardScorer` is the same scorer as a Python object (the evaluation stages use it).
"""
from __future__ import annotations

import collections
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from etils import epath
from tqdm import tqdm

from codepmp_jax import checkpoint, cli, sharding, workdir
from codepmp_jax.data import templates
from codepmp_jax.data import encode as encoding
from codepmp_jax.data.encode import EncodedSequence, bucket_length, encode_sequence
from codepmp_jax.data.tokenizer import load_tokenizer
from codepmp_jax.model import attention, frozen_trunk, transformer

EXAMPLES_SHOWN = 10
MAX_ROWS_FACTOR = 8  # short buckets batch up to 8x the rows of the longest one
BUCKETS_PER_OCTAVE = 4  # padded lengths 128, 160, 192, 224, 256, 320, ...: under 25% padding
# Scoring compiles once per bucket and runs many batches, so its plain attention uses short causal
# blocks (more of the masked triangle skipped), and on CPU a batch is cut so that one block's
# float32 scores ([rows, heads, queries, keys]) stay within `attention.CPU_SCORE_BYTES`: the tiny
# model scored 512-token rows 1.8x faster per row at 4 rows than at 8 (2 MB vs 4 MB of scores).
SCORE_CAUSAL_BLOCK = 64
# Batches dispatched and not yet read back, at most: the host pads and sends the next batches while
# the device runs the oldest, and no more than these batches' inputs are held at once. Reading
# each batch back before sending the next made the tiny model's scoring of 256 GSM8K records
# 1.15-1.2x slower (interleaved in one process, Dec 3).
BATCHES_IN_FLIGHT = 3


class RewardScorer:
  """A checkpoint's reward for token sequences or (prompt, response) texts, batched and jitted.

  Sequences are sorted by length and padded to `BUCKETS_PER_OCTAVE` lengths per octave
  (`bucket_length`); shorter buckets take proportionally more rows (up to `MAX_ROWS_FACTOR` x
  `batch_size`, and on CPU no more than keeps attention's scores cache-sized,
  `attention.CPU_SCORE_BYTES`), so a batch holds about the same number of tokens and each bucket
  is one compiled shape. All layers but the last run under `lax.scan` (params stacked once at
  load), so a compile traces two layers, not all of them; the last runs at each row's reward token
  only (`frozen_trunk.last_token_rewards`). The batch is split over the mesh's data axes.
  """

  def __init__(self, checkpoint_path: str | os.PathLike, batch_size: int = 16, max_length: int = 1024,
               mesh_shape: Sequence[int] = (-1, 1, 1), show_progress: bool = True,
               truncation: str | None = None):
    path = epath.Path(checkpoint_path)
    canonical = checkpoint.load_model_config(path).replace(scan_layers=False, remat_policy="none")
    self.config = canonical.replace(causal_block=SCORE_CAUSAL_BLOCK)
    self.mesh = sharding.make_mesh(mesh_shape)
    self.rules = sharding.DEFAULT_RULES
    shardings_of = lambda config: sharding.logical_sharding(nn.get_partition_spec(jax.eval_shape(  # noqa: E731
        lambda: transformer.init_params(config, jax.random.key(0)))), self.mesh, self.rules)
    param_shardings = shardings_of(canonical)
    params, _ = checkpoint.load_model(path, shardings=param_shardings)
    # All layers but the last stacked (`frozen_trunk.last_token_rewards`'s layout).
    scanned = self.config.num_layers - 1
    if scanned:
      param_shardings = {k: v for k, v in param_shardings.items()
                         if k not in {f"layers_{i}" for i in range(scanned)}}
      param_shardings["layers"] = shardings_of(canonical.replace(scan_layers=True))["layers"]
    self.params = jax.jit(lambda p: transformer.stack_layers(p, scanned),
                          out_shardings=param_shardings)(params)
    tokenizer_dir = path / workdir.TOKENIZER
    self.tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None
    self.prompt_format = templates.load_prompt_format(path)  # None if the checkpoint records none
    # How texts longer than max_length are cut: the checkpoint's policy unless given.
    self.truncation = encoding.check_truncation(truncation or encoding.load_truncation(path))
    if self.truncation == "drop":
      raise ValueError(f"{path} records truncation 'drop'; scoring cannot drop a text: pass "
                       "truncation='keep_end' or 'keep_head'")
    self._data_ways = data_ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.batch_size = -(-batch_size // data_ways) * data_ways
    self.max_length = max_length
    self.show_progress = show_progress
    self.pad_id = self.tokenizer.pad_id if self.tokenizer else (self.config.pad_token_id or 0)
    self._batch_sharding = batch_sharding = sharding.batch_sharding(self.mesh, self.rules, 2)
    self._forward = jax.jit(
        lambda params, ids, mask: frozen_trunk.last_token_rewards(self.config, params, ids, mask),
        in_shardings=(param_shardings, batch_sharding, batch_sharding),
        out_shardings=sharding.replicated(self.mesh))

  def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """float32 rewards of token sequences, each read at its last token (nothing is added)."""
    for i, seq in enumerate(sequences):
      if not 0 < len(seq) <= self.max_length:
        raise ValueError(f"sequence {i} has {len(seq)} tokens; scoring needs 1..{self.max_length}")
    rewards = np.zeros(len(sequences), np.float32)
    bar = tqdm(total=len(sequences), unit="seq", desc="score", disable=not self.show_progress)
    in_flight: collections.deque = collections.deque()

    def collect():
      rows, out = in_flight.popleft()
      rewards[rows] = np.asarray(out)[:len(rows)]
      bar.update(len(rows))

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for rows, length, batch_rows in self.length_batches([len(s) for s in sequences]):
        ids = np.full((batch_rows, length), self.pad_id, np.int32)
        mask = np.zeros((batch_rows, length), np.int32)
        mask[len(rows):, 0] = 1  # filler rows: one token, result discarded
        for row, index in enumerate(rows):
          ids[row, :len(sequences[index])] = sequences[index]
          mask[row, :len(sequences[index])] = 1
        ids, mask = jax.device_put((ids, mask), self._batch_sharding)
        in_flight.append((rows, self._forward(self.params, ids, mask)))
        if len(in_flight) == BATCHES_IN_FLIGHT:
          collect()
      while in_flight:
        collect()
    bar.close()
    return rewards

  def length_batches(self, lengths: Sequence[int]) -> list[tuple[list[int], int, int]]:
    """(indices, padded length, rows) of each batch: longest first, each bucket's rows scaled up
    as its padded length falls (`batch_size` x min(MAX_ROWS_FACTOR, longest bucket // length)),
    and on CPU capped by `attention.CPU_SCORE_BYTES`.

    A batch never mixes buckets, so every bucket compiles once; callers restore the input order
    from the indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: dict[int, list[int]] = {}
    for i in order:
      length = bucket_length(lengths[i], steps_per_octave=BUCKETS_PER_OCTAVE)
      buckets.setdefault(min(length, self.max_length), []).append(i)
    longest = max(buckets, default=1)
    on_cpu = self.mesh.devices.flat[0].platform == "cpu"
    batches = []
    for length, indices in buckets.items():
      rows = self.batch_size * max(1, min(MAX_ROWS_FACTOR, longest // length))
      if on_cpu:
        queries = attention.causal_query_block(length, self.config.causal_block)
        row_bytes = self.config.num_heads * queries * length * 4
        fits = max(1, attention.CPU_SCORE_BYTES // row_bytes // self._data_ways)
        rows = min(rows, fits * self._data_ways)
      batches += [(indices[s:s + rows], length, rows) for s in range(0, len(indices), rows)]
    return batches

  def encode(self, prompt: str, response: str) -> EncodedSequence:
    """prompt + response + end token, cut to `max_length` by the checkpoint's truncation policy
    (its `prompt_cut` / `response_cut` say what was lost)."""
    if self.tokenizer is None:
      raise ValueError("this checkpoint has no tokenizer/; only token ids can be scored")
    return encode_sequence(self.tokenizer, prompt, response, self.max_length, self.truncation)

  def encode_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[EncodedSequence]:
    """`encode` of each (prompt, response) (prompts already rendered with their template)."""
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [self.encode(p, r) for p, r in zip(prompts, responses)]

  def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Rewards of each `prompt + response + eos` (prompts already rendered with their template)."""
    return self.score_ids([s.ids for s in self.encode_texts(prompts, responses)])


def _prompt(record: dict, template: str, where: str) -> str:
  if not isinstance(record.get("prompt"), str):
    raise ValueError(f"{where}: field 'prompt' must be a string")
  if template == "none":
    return record["prompt"]
  if template == "chat":  # a model trained on conversations: the prompt is the user's turn
    return templates.render_chat([{"role": "user", "content": record["prompt"]}])
  fields = {k: v for k, v in record.items() if isinstance(v, str)}
  fields.setdefault("question", record["prompt"])
  fields.setdefault("query", fields["question"])
  try:
    return templates.render(template, **fields)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _string(record: dict, field: str, where: str) -> str:
  if not isinstance(record[field], str):
    raise ValueError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
  return record[field]


def sequences_of(record: Any, scorer: RewardScorer, template: str, where: str) -> dict[str, EncodedSequence]:
  """Output field -> the sequence to score, for one input record; ValueError names the problem."""
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if "input_ids" in record:
    ids = record["input_ids"]
    if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
      raise ValueError(f"{where}: field 'input_ids' must be a non-empty list of integers")
    vocab = scorer.config.vocab_size
    if not all(0 <= t < vocab for t in ids):
      raise ValueError(f"{where}: field 'input_ids' has ids outside 0..{vocab - 1}")
    if len(ids) > scorer.max_length:
      raise ValueError(f"{where}: field 'input_ids' has {len(ids)} tokens, more than --max_length={scorer.max_length}")
    return {"reward": EncodedSequence(tuple(ids), 0)}
  if "text" in record:
    return {"reward": scorer.encode("", _string(record, "text", where))}
  if "response" in record:
    return {"reward": scorer.encode(_prompt(record, template, where), _string(record, "response", where))}
  if "chosen" in record and "rejected" in record:
    prompt = _prompt(record, template, where)
    return {f"{side}_reward": scorer.encode(prompt, _string(record, side, where)) for side in ("chosen", "rejected")}
  raise ValueError(f"{where}: expected 'input_ids', 'text', 'prompt'+'response' or "
                   f"'prompt'+'chosen'+'rejected'; got fields {sorted(record)}")


def score_file(scorer: RewardScorer, input_path: epath.Path, output_path: epath.Path,
               template: str) -> collections.Counter:
  """Score every line of `input_path` into `output_path`; returns counts (records, sequences, bad
  lines, and the sequences that lost prompt or response tokens: `truncated_prompt`,
  `truncated_response`). A file with no usable line is an error (nothing is written)."""
  counts: collections.Counter = collections.Counter()
  records, fields, sequences = [], [], []
  with input_path.open(encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{input_path}:{line_no}"
      try:
        record = json.loads(line)
        wanted = sequences_of(record, scorer, template, where)
      except json.JSONDecodeError as e:
        wanted, message = None, f"{where}: invalid JSON ({e.msg} at column {e.colno})"
      except ValueError as e:
        wanted, message = None, str(e)
      if wanted is None:
        counts["bad_lines"] += 1
        if counts["bad_lines"] <= EXAMPLES_SHOWN:
          print(f"bad line: {message}", file=sys.stderr)
        continue
      records.append(record)
      fields.append(list(wanted))
      for sequence in wanted.values():
        sequences.append(sequence.ids)
        counts["truncated_prompt"] += bool(sequence.prompt_cut)
        counts["truncated_response"] += bool(sequence.response_cut)
  if not records:
    raise ValueError(f"{input_path}: no usable lines ({counts['bad_lines']} bad); each line needs "
                     "'input_ids', 'text', 'prompt'+'response' or 'prompt'+'chosen'+'rejected'")
  rewards = iter(scorer.score_ids(sequences).tolist())
  output_path.parent.mkdir(parents=True, exist_ok=True)
  with output_path.open("w", encoding="utf-8") as out:
    for record, names in zip(records, fields):
      out.write(json.dumps({**record, **{name: next(rewards) for name in names}}, ensure_ascii=False) + "\n")
  counts["records"] = len(records)
  counts["sequences"] = len(sequences)
  return counts


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so other programs can import this module)."""
  flags.DEFINE_string("checkpoint", None, "Checkpoint directory or training workdir.")
  flags.DEFINE_string("input", None, "Input JSONL.")
  flags.DEFINE_string("output", None, "Output JSONL (input records with rewards added).")
  flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.")
  flags.DEFINE_integer("max_length", 1024, "Longest sequence; longer texts are cut as in training.")
  flags.DEFINE_enum("template", None, list(templates.FORMATS),
                    "Prompt template for 'prompt' records (default: the checkpoint's prompt format, else none).")
  flags.DEFINE_list("mesh", ["-1", "1", "1"], "Mesh shape (data, fsdp, tensor); -1 = the rest.")


def main(argv: list[str]) -> None:
  del argv
  for name in ("checkpoint", "input", "output"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  path = epath.Path(FLAGS.checkpoint)
  scorer = RewardScorer(path, FLAGS.batch_size, FLAGS.max_length, [int(s) for s in FLAGS.mesh])
  template = FLAGS.template or scorer.prompt_format
  if template is None:
    print(f"note: {path} records no prompt format; prompts are used verbatim (--template to choose)")
    template = "none"
  counts = score_file(scorer, epath.Path(FLAGS.input), epath.Path(FLAGS.output), template)
  print(f"scored {counts['records']} records ({counts['sequences']} sequences; cut to {FLAGS.max_length} "
        f"tokens by {scorer.truncation}: {counts['truncated_prompt']} lost prompt tokens, "
        f"{counts['truncated_response']} lost response tokens) -> {FLAGS.output}; "
        f"{counts['bad_lines']} bad lines skipped")


if __name__ == "__main__":
  cli.run(main, define_flags)
