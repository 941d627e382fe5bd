"""Tables and plots of the experiments and sweeps: one Markdown/CSV format, one matplotlib set-up.

Every experiment writes its results as `results.md` (a GitHub Markdown table), `results.csv` or
`results.json`, and `results.png`; these helpers are the only place that formats them, and
`pyplot` / `save_figure` (the project's one matplotlib set-up, `codepmp_jax/eval/plots.py`) draw.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from codepmp_jax.eval.plots import pyplot, save_figure  # noqa: F401  (the experiments' plots)


def format_cell(value: object, digits: int = 4) -> str:
  """A table cell: floats to `digits` significant digits (nan as nan), None as empty."""
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.{digits}g}"
  return "" if value is None else str(value)


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[object]],
                cell: Callable[[object], str] = format_cell,
                align: str | Sequence[str] = "---") -> str:
  """A GitHub Markdown table, newline-ended; `align` is the rule of every column or of each
  (`---` left, `---:` right)."""
  rules = [align] * len(header) if isinstance(align, str) else list(align)
  lines = ["| " + " | ".join(header) + " |", "|" + "".join(f"{r}|" for r in rules)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def to_csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """CSV with full-precision numbers and empty cells for missing values."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(header)
  writer.writerows([["" if v is None else v for v in row] for row in rows])
  return out.getvalue()


def fixed3(value: object) -> str:
  """Accuracy-style cells: floats to three decimals (other values as `format_cell`)."""
  return f"{value:.3f}" if isinstance(value, float) else format_cell(value)


def lookup(report: Mapping[str, Any], keys: Sequence[str]) -> float:
  """`report[k1][k2]...` as a float (a metric deep in an evaluation report)."""
  value: Any = report
  for key in keys:
    value = value[key]
  return float(value)
