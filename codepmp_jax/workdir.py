"""The training workdir: one module owns its layout (docs/CONTRACTS.md, "Workdir").

  WORKDIR/
    config.json          the run's resolved training config (ml_collections JSON)
    model_config.json    the model's ModelConfig (so a workdir is a model checkpoint too)
    tokenizer/           the tokenizer the run trained with
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

CONFIG = "config.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"

PathLike = str | epath.PathLike


class WorkdirError(ValueError):
  """A workdir file that is there but cannot be read (the message names it)."""


def config_path(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir) / CONFIG


def model_config_path(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir) / MODEL_CONFIG


def tokenizer_path(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir) / TOKENIZER


def metrics_path(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir) / METRICS


def checkpoints_path(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINTS


def summary_path(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir) / SUMMARY


def _read_json(path: epath.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{path}: not JSON ({e})") from e


def read_config(workdir: PathLike) -> dict[str, Any] | None:
  """The run's `config.json` as a dict, or None before the run has started."""
  path = config_path(workdir)
  return _read_json(path) if path.exists() else None


def read_summary(workdir: PathLike) -> dict[str, Any] | None:
  """The run's `summary.json` (its end: step, finished, final metrics), or None before it."""
  path = summary_path(workdir)
  return _read_json(path) if path.exists() else None


def last_metrics(workdir: PathLike) -> dict[str, Any] | None:
  """The last record of `metrics.jsonl`, or None; a torn last line (a kill mid-write) is skipped."""
  path = metrics_path(workdir)
  if not path.exists():
    return None
  lines = path.read_text().splitlines()
  last = None
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      last = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        logging.warning("%s:%d: torn last line skipped", path, number)
        break
      raise WorkdirError(f"{path}:{number}: not JSON ({e})") from e
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
