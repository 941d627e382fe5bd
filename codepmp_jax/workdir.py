"""The training workdir: one module owns its layout (docs/contracts.md, the workdir table).

  WORKDIR/
    config.json          the run's resolved training config (ml_collections JSON)
    model_config.json    the model's ModelConfig (so a workdir is a model checkpoint too)
    tokenizer/           the tokenizer the run trained with
    prompt_format.json   the template the data's prompts were rendered in (`data.templates`), when known
    truncation.json      how the data's overlong sequences were cut (`data.encode.TRUNCATION`)
    reward_stats.json    the reward mean and std over the held-out split, at the end of a finished
                         run (`checkpoint.save_reward_stats`; normalized rewards)
    metrics.jsonl        one JSON record a logged step: {"step": N, "loss": ..., "eval/...": ...}
    checkpoints/N/       orbax train-state checkpoints (params, optimizer state, data position)
    summary.json         written once at the end: {"step", "finished", **last logged metrics}

Paths go through `etils.epath`, so a `gs://` workdir stays one. Readers name the file and line of
what they cannot read.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from etils import epath

from codepmp_jax.data import encode, templates

CONFIG = "config.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
REWARD_STATS = "reward_stats.json"  # written and read by checkpoint.save/load_reward_stats
PROMPT_FORMAT = templates.PROMPT_FORMAT_FILE  # written and read by templates.save/load_prompt_format
TRUNCATION = encode.TRUNCATION_FILE  # written and read by encode.save/load_truncation
NAMES = (CONFIG, MODEL_CONFIG, TOKENIZER, PROMPT_FORMAT, TRUNCATION, REWARD_STATS, METRICS,
         CHECKPOINTS, SUMMARY)

PathLike = str | epath.PathLike


class WorkdirError(ValueError):
  """A workdir file that is there but cannot be read (the message names it)."""


def path(workdir: PathLike, name: str) -> epath.Path:
  """`workdir/name` for one of the names above (`path(w, SUMMARY)`), as an `epath.Path`."""
  if name not in NAMES:
    raise ValueError(f"{name!r} is not a workdir entry; one of {NAMES}")
  return epath.Path(workdir) / name


def _read_json(file: epath.Path) -> dict[str, Any]:
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{file}: not JSON ({e})") from e


def read_config(workdir: PathLike) -> dict[str, Any] | None:
  """The run's `config.json` as a dict, or None before the run has started."""
  file = path(workdir, CONFIG)
  return _read_json(file) if file.exists() else None


def read_summary(workdir: PathLike) -> dict[str, Any] | None:
  """The run's `summary.json` (its end: step, finished, final metrics), or None before it."""
  file = path(workdir, SUMMARY)
  return _read_json(file) if file.exists() else None


def last_metrics(workdir: PathLike) -> dict[str, Any] | None:
  """The last record of `metrics.jsonl`, or None; a torn last line (a kill mid-write) is skipped."""
  file = path(workdir, METRICS)
  if not file.exists():
    return None
  lines = file.read_text().splitlines()
  last = None
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      last = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        logging.warning("%s:%d: torn last line skipped", file, number)
        break
      raise WorkdirError(f"{file}:{number}: not JSON ({e})") from e
  return last


def is_finished(workdir: PathLike) -> bool:
  """Whether the workdir holds a run that reached its last step (not one stopped by preemption).

  `summary.json` says so (`finished`); a summary without that field (older runs) counts as
  finished when its step reaches the config's `train.total_steps` (or that is 0: epochs).
  """
  summary = read_summary(workdir)
  if summary is None:
    return False
  if "finished" in summary:
    return bool(summary["finished"])
  total = int(((read_config(workdir) or {}).get("train") or {}).get("total_steps") or 0)
  return not total or int(summary.get("step", 0)) >= total
