"""Score JSONL records with a reward model checkpoint.

  python -m codepmp_jax.score --checkpoint=CKPT --input=IN.jsonl --output=OUT.jsonl \
      [--batch_size=16] [--max_length=1024] [--template=none|code|math|logic|chat] [--mesh=-1,1,1] \
      [--normalize]
  python -m codepmp_jax.score --checkpoint=CKPT --calibrate=DATA.jsonl    # reward mean/std -> CKPT

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
`--calibrate=DATA` scores every sequence of DATA (same line formats; a pair file gives both sides)
and stores their mean and std with the checkpoint (`checkpoint.save_reward_stats`, as OpenRLHF
computes them); `--normalize` then writes `(reward - mean) / std`. Training stores them itself
from its held-out split when it ends with an evaluation.
Every path may be `gs://...` (through etils.epath).
`RewardScorer` is the same scorer as a Python object (the evaluation stages and `serve` use it);
`RewardScorer.score_steps` reads the reward at the end of every step of a solution in one forward
pass (`RewardModel` at several reward positions a row).
"""
from __future__ import annotations

import collections
import dataclasses
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
from codepmp_jax.eval import bon
from codepmp_jax.model import attention, transformer
from codepmp_jax.model.config import resolve_attention

EXAMPLES_SHOWN = 10
MAX_ROWS_FACTOR = 8  # short buckets batch up to 8x the rows of the longest one
BUCKETS_PER_OCTAVE = 4  # padded lengths 128, 160, 192, 224, 256, 320, ...: under 25% padding
# Scoring compiles once per bucket and runs many batches, so blocked attention uses short causal
# blocks (more of the masked triangle skipped); where the resolved attention caps a block's scores
# (`model.attention_block_bytes`: auto on CPU), a batch is cut so that one block's float32 scores
# ([rows, heads, queries, keys]) stay within that cap (docs/performance.md, "What makes it fast").
SCORE_CAUSAL_BLOCK = 64
# Batches dispatched and not yet read back, at most: the host pads and sends the next batches while
# the device runs the oldest, and no more than these batches' inputs are held at once. Reading
# each batch back before sending the next made the tiny model's scoring of 256 GSM8K records
# 1.15-1.2x slower (interleaved in one process, Dec 3).
BATCHES_IN_FLIGHT = 3
MIN_POSITIONS = 4  # step positions per row are padded to a power of two, at least this


@dataclasses.dataclass(frozen=True)
class StepSequence:
  """A solution encoded for step-level scores: `sequence` (prompt + response + end token, cut by
  the truncation policy) and `positions`, the token index of each step's last token that survived
  the cut (the last step's is the end token, where the solution's reward is read); `steps` counts
  the text's steps, `steps_cut` those lost to truncation."""
  sequence: EncodedSequence
  positions: tuple[int, ...]
  steps: int
  steps_cut: int = 0


class RewardScorer:
  """A checkpoint's reward for token sequences or (prompt, response) texts, batched and jitted.

  Sequences are sorted by length and padded to `BUCKETS_PER_OCTAVE` lengths per octave
  (`bucket_length`); shorter buckets take proportionally more rows (up to `MAX_ROWS_FACTOR` x
  `batch_size`, and no more than keeps a block of attention scores within the resolved
  `attention_block_bytes`, if any), so a batch holds about the same number of tokens and each bucket
  is one compiled shape. `RewardModel` reads each row's reward at its last token, or at given
  positions (`score_positions`), with `rewards_only`: the layers below the last run under
  `lax.scan` (params stacked once at load), so a compile traces two layers, not all of them, and
  the last runs at the reward positions only. The batch is split over the mesh's data axes.

  With `normalize`, rewards are `(r - mean) / std` by the checkpoint's reward stats
  (`checkpoint.load_reward_stats`; `reward_stats` holds them, or None when never measured).
  `forwarded` counts the batches and sequences run through the model.
  """

  def __init__(self, checkpoint_path: str | os.PathLike, batch_size: int = 16, max_length: int = 1024,
               mesh_shape: Sequence[int] = (-1, 1, 1), show_progress: bool = True,
               truncation: str | None = None, normalize: bool = False):
    path = epath.Path(checkpoint_path)
    self.reward_stats = checkpoint.load_reward_stats(path)
    if normalize and self.reward_stats is None:
      raise ValueError(f"{path} has no reward stats ({checkpoint.REWARD_STATS_FILE}) to normalize with; "
                       f"measure them: python -m codepmp_jax.score --checkpoint={path} --calibrate=DATA")
    self.normalize = normalize
    self.forwarded: collections.Counter = collections.Counter()
    canonical = checkpoint.load_model_config(path).replace(scan_layers=False, remat_policy="none")
    self.mesh = sharding.make_mesh(mesh_shape)
    # A reader picks the attention of its own device, whatever the checkpoint was trained with.
    self.config = resolve_attention(canonical.replace(attention="auto", scan_layers=True),
                                    self.mesh.devices.flat[0].platform).replace(causal_block=SCORE_CAUSAL_BLOCK)
    self.rules = sharding.DEFAULT_RULES
    shardings_of = lambda config: sharding.logical_sharding(nn.get_partition_spec(jax.eval_shape(  # noqa: E731
        lambda: transformer.init_params(config, jax.random.key(0)))), self.mesh, self.rules)
    params, _ = checkpoint.load_model(path, shardings=shardings_of(canonical))
    param_shardings = shardings_of(self.config)
    self.params = jax.jit(lambda p: transformer.stack_layers(p, self.config.num_layers),
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
    self._batch_sharding = batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    model = transformer.RewardModel(self.config)

    def rewards(params, ids, lengths, reward_index):
      inputs = transformer.right_padded(lengths, ids.shape[1])
      return model.apply({"params": params}, ids, **{**inputs, "reward_index": reward_index},
                         rewards_only=True).rewards
    self._forward = jax.jit(rewards, in_shardings=(param_shardings,) + (batch_sharding,) * 3,
                            out_shardings=sharding.replicated(self.mesh))

  def normalized(self, rewards: np.ndarray) -> np.ndarray:
    """`(rewards - mean) / std` by the checkpoint's reward stats (float32)."""
    if self.reward_stats is None:
      raise ValueError("this checkpoint has no reward stats to normalize with (score --calibrate)")
    return ((np.asarray(rewards, np.float64) - self.reward_stats["mean"])
            / self.reward_stats["std"]).astype(np.float32)

  def _check_lengths(self, sequences: Sequence[Sequence[int]]) -> None:
    for i, seq in enumerate(sequences):
      if not 0 < len(seq) <= self.max_length:
        raise ValueError(f"sequence {i} has {len(seq)} tokens; scoring needs 1..{self.max_length}")

  def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """float32 rewards of token sequences, each read at its last token (nothing is added);
    normalized when the scorer was made with `normalize`."""
    self._check_lengths(sequences)
    rewards = np.concatenate([np.zeros(0, np.float32), *self._run(sequences, None)])
    return self.normalized(rewards) if self.normalize else rewards

  def score_positions(self, sequences: Sequence[Sequence[int]],
                      positions: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """float32 rewards of each token sequence read at its `positions` (token indices), one
    forward pass per sequence: the reward at position p is the reward of the sequence cut after
    token p (causal attention: nothing after p reaches it). Normalized when the scorer was made
    with `normalize`."""
    if len(positions) != len(sequences):
      raise ValueError(f"{len(sequences)} sequences but {len(positions)} position lists")
    self._check_lengths(sequences)
    for i, (seq, where) in enumerate(zip(sequences, positions)):
      if not len(where) or not all(0 <= int(p) < len(seq) for p in where):
        raise ValueError(f"sequence {i}: positions must be 1 or more indices in 0..{len(seq) - 1}")
    out = self._run(sequences, positions)
    return [self.normalized(r) for r in out] if self.normalize else out

  def _run(self, sequences: Sequence[Sequence[int]],
           positions: Sequence[Sequence[int]] | None) -> list[np.ndarray]:
    """Each sequence's rewards, read at its last token (`positions` None: one each) or at its
    positions, from length-bucketed batches (`length_batches`) of one row per sequence."""
    results: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
    bar = tqdm(total=len(sequences), unit="seq", desc="score", disable=not self.show_progress)
    in_flight: collections.deque = collections.deque()

    def collect():
      rows, out = in_flight.popleft()
      out = np.asarray(out, np.float32)
      for row, index in enumerate(rows):
        results[index] = out[row, :1 if positions is None else len(positions[index])]
      bar.update(len(rows))

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for rows, length, batch_rows in self.length_batches([len(s) for s in sequences]):
        ids = np.full((batch_rows, length), self.pad_id, np.int32)
        lengths = np.ones(batch_rows, np.int32)  # filler rows: one token, result discarded
        # K reward positions a row (the last token; or K a power of two: one compile per bucket and K)
        widest = 1 if positions is None else max(len(positions[index]) for index in rows)
        at = np.zeros((batch_rows, 1 if positions is None else
                       max(MIN_POSITIONS, 1 << (widest - 1).bit_length())), np.int32)
        for row, index in enumerate(rows):
          ids[row, :len(sequences[index])] = sequences[index]
          lengths[row] = len(sequences[index])
          where = (np.asarray([lengths[row] - 1]) if positions is None
                   else np.asarray(positions[index], np.int32))
          at[row, :len(where)], at[row, len(where):] = where, where[-1]
        self.forwarded.update(batches=1, sequences=len(rows))
        batch = jax.device_put((ids, lengths, at), self._batch_sharding)
        in_flight.append((rows, self._forward(self.params, *batch)))
        if len(in_flight) == BATCHES_IN_FLIGHT:
          collect()
      while in_flight:
        collect()
    bar.close()
    return results

  def length_batches(self, lengths: Sequence[int]) -> list[tuple[list[int], int, int]]:
    """(indices, padded length, rows) of each batch: longest first, each bucket's rows scaled up
    as its padded length falls (`batch_size` x min(MAX_ROWS_FACTOR, longest bucket // length)),
    and capped by the resolved `attention_block_bytes` (if any).

    A batch never mixes buckets, so every bucket compiles once; callers restore the input order
    from the indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: dict[int, list[int]] = {}
    for i in order:
      length = bucket_length(lengths[i], steps_per_octave=BUCKETS_PER_OCTAVE)
      buckets.setdefault(min(length, self.max_length), []).append(i)
    longest = max(buckets, default=1)
    block_bytes = self.config.attention_block_bytes if self.config.attention == "blocked" else 0
    batches = []
    for length, indices in buckets.items():
      rows = self.batch_size * max(1, min(MAX_ROWS_FACTOR, longest // length))
      if block_bytes:
        queries = attention.causal_query_block(length, self.config.causal_block)
        row_bytes = self.config.num_heads * queries * length * 4
        fits = max(1, block_bytes // row_bytes // self._data_ways)
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

  def encode_steps(self, prompts: Sequence[str], responses: Sequence[str],
                   delimiter: str = bon.DEFAULT_STEP_DELIMITER) -> list[StepSequence]:
    """Each (prompt, response) encoded as `encode` does, with the token index of every step's last
    token (steps: `bon.split_steps(response, delimiter)`; the last step's index is the end token's).

    The token holding a step's last character ends the step (one that also holds the delimiter's
    first characters still does), found from the tokenizer's offsets of the ONE tokenization of
    prompt + response; steps whose last token the truncation policy cut are left out and counted.
    """
    if self.tokenizer is None:
      raise ValueError("this checkpoint has no tokenizer/; only token ids can be scored")
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ends = [bon.split_steps(r, delimiter) for r in responses]
    # prompt + response split at each step's last character: the boundary token is the one that
    # holds it (`Tokenizer.encode_joined`), in the same token ids as the whole text's.
    splits = [(p + r[:e - 1], r[e - 1:]) for p, r, item in zip(prompts, responses, ends) for e in item[:-1]]
    whole = self.tokenizer.encode_joined_batch(prompts, responses)
    boundaries = iter(self.tokenizer.encode_joined_batch([a for a, _ in splits], [b for _, b in splits]))
    out = []
    for (ids, start), item in zip(whole, ends):
      sequence = encoding.fit_sequence(ids, start, self.tokenizer.eos_id, self.max_length, self.truncation)
      kept = _kept_indices(len(ids), start, sequence, self.truncation)
      positions = []
      for _ in item[:-1]:
        split_ids, last = next(boundaries)
        if list(split_ids) != list(ids):
          raise AssertionError("one text tokenized two ways")
        if last in kept:
          positions.append(kept[last])
      positions.append(len(sequence.ids) - 1)
      out.append(StepSequence(sequence, tuple(positions), len(item), len(item) - len(positions)))
    return out

  def score_steps(self, prompts: Sequence[str], responses: Sequence[str],
                  delimiter: str = bon.DEFAULT_STEP_DELIMITER) -> list[np.ndarray]:
    """The reward at the end of every step of each response (`encode_steps`), one forward pass
    per response; the last is the whole response's reward (`score_texts`'s)."""
    steps = self.encode_steps(prompts, responses, delimiter)
    return self.score_positions([s.sequence.ids for s in steps], [s.positions for s in steps])


def _kept_indices(length: int, response_start: int, sequence: EncodedSequence,
                  truncation: str) -> dict[int, int]:
  """Where each token of the uncut prompt + response (`length` tokens) is in the cut `sequence`
  (tokens the cut removed are absent), as `encode.fit_sequence` cuts."""
  cut_prompt, cut_response = sequence.prompt_cut, sequence.response_cut
  if truncation == "keep_end":
    kept = [*range(cut_prompt, response_start), *range(response_start + cut_response, length)]
  else:
    kept = list(range(cut_prompt, length - cut_response))
  if len(kept) != len(sequence.ids) - 1:
    raise AssertionError(f"{len(kept)} kept tokens for a sequence of {len(sequence.ids) - 1}")
  return {old: new for new, old in enumerate(kept)}


def render_prompt(record: dict, template: str, where: str) -> str:
  """The scored prompt of a record with a 'prompt' field, in the checkpoint's prompt format
  (`template`); ValueError names the problem at `where`."""
  prompt = text_field(record, "prompt", where)
  if template == "none":
    return prompt
  if template == "chat":  # a model trained on conversations: the prompt is the user's turn
    return templates.render_chat([{"role": "user", "content": prompt}])
  fields = {k: v for k, v in record.items() if isinstance(v, str)}
  fields.setdefault("question", prompt)
  fields.setdefault("query", fields["question"])
  try:
    return templates.render(template, **fields)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def text_field(record: dict, field: str, where: str) -> str:
  """`record[field]` if it is text a tokenizer takes; ValueError names the problem at `where`
  (JSON's lone surrogate escapes such as "\\ud800" decode to strings that are not Unicode text)."""
  value = record.get(field)
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{where}: field {field!r} is not Unicode text ({e.reason} at character "
                     f"{e.start})") from None
  return value


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
    return {"reward": scorer.encode("", text_field(record, "text", where))}
  if "response" in record:
    return {"reward": scorer.encode(render_prompt(record, template, where), text_field(record, "response", where))}
  if "chosen" in record and "rejected" in record:
    prompt = render_prompt(record, template, where)
    return {f"{side}_reward": scorer.encode(prompt, text_field(record, side, where)) for side in ("chosen", "rejected")}
  raise ValueError(f"{where}: expected 'input_ids', 'text', 'prompt'+'response' or "
                   f"'prompt'+'chosen'+'rejected'; got fields {sorted(record)}")


def read_file(scorer: RewardScorer, input_path: epath.Path, template: str
              ) -> tuple[list[dict], list[list[str]], list[tuple[int, ...]], collections.Counter]:
  """(records, each record's output fields, the sequences to score in order, counts) of every
  usable line of `input_path`; bad lines are printed (the first few) and counted. A file with no
  usable line is an error."""
  counts: collections.Counter = collections.Counter()
  records, fields, sequences = [], [], []
  first_bad = ""
  with input_path.open("rb") as f:  # bytes: a line that is not UTF-8 is one bad line
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{input_path}:{line_no}"
      try:
        record = json.loads(line)
        wanted = sequences_of(record, scorer, template, where)
      except json.JSONDecodeError as e:
        wanted, message = None, f"{where}: invalid JSON ({e.msg} at column {e.colno})"
      except UnicodeDecodeError as e:
        wanted, message = None, f"{where}: not UTF-8 ({e.reason} at byte {e.start})"
      except ValueError as e:
        wanted, message = None, str(e)
      if wanted is None:
        counts["bad_lines"] += 1
        first_bad = first_bad or message
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
    raise ValueError(f"{input_path}: no usable lines ({counts['bad_lines']} bad, the first {first_bad}); each line needs "
                     "'input_ids', 'text', 'prompt'+'response' or 'prompt'+'chosen'+'rejected'")
  return records, fields, sequences, counts


def score_file(scorer: RewardScorer, input_path: epath.Path, output_path: epath.Path,
               template: str) -> collections.Counter:
  """Score every line of `input_path` into `output_path`; returns counts (records, sequences, bad
  lines, and the sequences that lost prompt or response tokens: `truncated_prompt`,
  `truncated_response`). A file with no usable line is an error (nothing is written). The file
  appears whole or not at all: it is written under a temporary name and renamed, so a killed run
  never leaves a partial output that looks finished."""
  records, fields, sequences, counts = read_file(scorer, input_path, template)
  rewards = iter(scorer.score_ids(sequences).tolist())
  output_path.parent.mkdir(parents=True, exist_ok=True)
  partial = output_path.parent / f".{output_path.name}.partial"
  with partial.open("w", encoding="utf-8") as out:
    for record, names in zip(records, fields):
      out.write(json.dumps({**record, **{name: next(rewards) for name in names}}, ensure_ascii=False) + "\n")
  partial.replace(output_path)
  counts["records"] = len(records)
  counts["sequences"] = len(sequences)
  return counts


def calibrate(scorer: RewardScorer, data_path: epath.Path, template: str) -> dict:
  """The raw reward mean and std (`checkpoint.reward_stats_of`) over every sequence of
  `data_path` (score's line formats: a pair gives its chosen and rejected sequences)."""
  _, _, sequences, counts = read_file(scorer, data_path, template)
  rewards = scorer.score_ids(sequences)
  if scorer.normalize:
    raise ValueError("calibrate needs raw rewards: a scorer made without normalize")
  return checkpoint.reward_stats_of(rewards, source=str(data_path), bad_lines=counts["bad_lines"],
                                    max_length=scorer.max_length)



def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags (defined only when run as a program, so other programs can import this module)."""
  flags.DEFINE_string("checkpoint", None, "Checkpoint directory or training workdir.", flag_values=values)
  flags.DEFINE_string("input", None, "Input JSONL.", flag_values=values)
  flags.DEFINE_string("output", None, "Output JSONL (input records with rewards added).", flag_values=values)
  flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.", flag_values=values)
  flags.DEFINE_integer("max_length", 1024, "Longest sequence; longer texts are cut as in training.", flag_values=values)
  flags.DEFINE_enum("template", None, list(templates.FORMATS),
                    "Prompt template for 'prompt' records (default: the checkpoint's prompt format, else none).", flag_values=values)
  flags.DEFINE_list("mesh", ["-1", "1", "1"], "Mesh shape (data, fsdp, tensor); -1 = the rest.", flag_values=values)
  flags.DEFINE_string("calibrate", None, "Measure the reward mean and std over this JSONL (score's "
                      "line formats) and store them with the checkpoint (reward_stats.json).", flag_values=values)
  flags.DEFINE_bool("normalize", False, "Write (reward - mean) / std by the checkpoint's reward stats.", flag_values=values)


def main(argv: list[str], values: flags.FlagValues = flags.FLAGS) -> None:
  del argv
  for name in ("checkpoint",) + (() if values.calibrate else ("input", "output")):
    if not getattr(values, name):
      raise app.UsageError(f"--{name} is required")
  if values.calibrate and values.normalize:
    raise app.UsageError("--calibrate measures raw rewards; --normalize does not apply")
  path = epath.Path(values.checkpoint)
  scorer = RewardScorer(path, values.batch_size, values.max_length, [int(s) for s in values.mesh],
                        normalize=values.normalize)
  template = values.template or scorer.prompt_format
  if template is None:
    print(f"note: {path} records no prompt format; prompts are used verbatim (--template to choose)")
    template = "none"
  if values.calibrate:
    stats = checkpoint.save_reward_stats(path, **calibrate(scorer, epath.Path(values.calibrate), template))
    print(f"reward mean {stats['mean']:.6g}, std {stats['std']:.6g} over {stats['sequences']} sequences "
          f"of {values.calibrate} -> {path / checkpoint.REWARD_STATS_FILE}")
    return
  counts = score_file(scorer, epath.Path(values.input), epath.Path(values.output), template)
  print(f"scored {counts['records']} records ({counts['sequences']} sequences; cut to {values.max_length} "
        f"tokens by {scorer.truncation}: {counts['truncated_prompt']} lost prompt tokens, "
        f"{counts['truncated_response']} lost response tokens) -> {values.output}; "
        f"{counts['bad_lines']} bad lines skipped" + ("; rewards normalized" if values.normalize else ""))


if __name__ == "__main__":
  cli.run(main, define_flags)
