"""Helpers shared by the benchmarks: step FLOPs, the PyTorch peer's model config, timing, tables,
and a per-op breakdown of a jitted step from a profiler trace."""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

from codepmp_jax.model import flops
from codepmp_jax.model.config import ModelConfig


def pmp_step_flops(config: ModelConfig, pairs: int, seq_len: int) -> float:
  """Model FLOPs of one PMP step: every sequence through the body and the score head, the LM head
  only over the chosen sequences (PaLM convention, `codepmp_jax.model.flops`)."""
  body = flops.flops_per_token(config, seq_len, lm_head=False)
  lm_head = flops.flops_per_token(config, seq_len) - body
  return 2 * pairs * seq_len * body + pairs * seq_len * lm_head


def hf_config(config: ModelConfig) -> Any:
  """A transformers Llama / Qwen2 / Mistral config of the same shape, with one reward label."""
  import transformers

  rope = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling:
    rope.update({k: v for k, v in config.rope_scaling.items() if k != "type"},
                rope_type=config.rope_scaling["type"])
  fields = dict(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.resolved_head_dim, max_position_embeddings=config.max_position_embeddings,
      rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, rope_parameters=rope,
      tie_word_embeddings=config.tie_word_embeddings, num_labels=1,
      pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0)
  if config.architecture == "llama":
    return transformers.LlamaConfig(attention_bias=config.qkv_bias, mlp_bias=False, **fields)
  if config.architecture == "qwen2":
    return transformers.Qwen2Config(use_sliding_window=False, **fields)
  return transformers.MistralConfig(sliding_window=config.sliding_window, **fields)


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
  """["num_layers=4", "remat_policy=dots"] -> [("num_layers", 4), ("remat_policy", "dots")].

  Values are read as int, float, true/false or none where they look like one, else as strings;
  names must be ModelConfig fields.
  """
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  out = []
  for item in items:
    name, sep, text = item.partition("=")
    if not sep or name not in fields:
      raise ValueError(f"{item!r} is not FIELD=VALUE with FIELD one of {sorted(fields)}")
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
      value = {"true": True, "false": False, "none": None}[lowered]
    else:
      try:
        value = int(text)
      except ValueError:
        try:
          value = float(text)
        except ValueError:
          value = text
    out.append((name, value))
  return out


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table with right-aligned columns (floats shown with 4 significant digits)."""
  cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
  widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
  lines = ["  ".join(str(h).rjust(w) for h, w in zip(header, widths))]
  lines.append("  ".join("-" * w for w in widths))
  lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def op_breakdown(trace_dir: str | pathlib.Path, hlo_text: str, top: int = 25
                 ) -> list[tuple[float, float, str]]:
  """Where a traced step's time went: (milliseconds, share, op) grouped by the JAX op that each
  executed HLO instruction came from (layer indices merged, so a row sums over layers).

  Reads the perfetto trace that `jax.profiler.trace(trace_dir, create_perfetto_trace=True)`
  wrote and the compiled module's text (`compiled.as_text()`) for the instructions' op names.
  XLA's CPU runtime runs independent instructions at the same time (e.g. the gate and up
  projections), so rows can overlap in time: read shares as relative costs, not as a partition
  of the step's wall time.
  """
  files = sorted(pathlib.Path(trace_dir).glob("**/*.trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"no perfetto trace (*.trace.json.gz) under {trace_dir}")
  op_names = {}
  for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", hlo_text, re.M):
    op_names.setdefault(match.group(1), match.group(2))
  events = json.loads(gzip.decompress(files[-1].read_bytes()))["traceEvents"]
  spent: dict[str, float] = collections.defaultdict(float)
  for event in events:
    if event.get("ph") != "X" or event["name"] not in op_names:
      continue
    op = re.sub(r"layers_\d+", "layers_*", op_names[event["name"]])
    op = re.sub(r"^jit\([^)]*\)/", "", op)
    spent[op] += event["dur"] / 1e3
  total = sum(spent.values()) or 1.0
  ranked = sorted(spent.items(), key=lambda item: -item[1])[:top]
  return [(ms, ms / total, op) for op, ms in ranked]
