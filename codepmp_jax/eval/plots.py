"""PNG plots: the one matplotlib set-up of the project (Agg backend: no display needed), used by
`eval bon --plot` and by the experiments' reports (launch/experiments/report.py)."""
from __future__ import annotations

from typing import Any

from etils import epath

from codepmp_jax.eval import bon as bon_lib

_STYLE = {"rm": ("C0", "o", "reward model"), "random": ("C7", "s", "random (pass@1)"),
          "majority": ("C2", "^", "majority vote"), "oracle": ("C3", "v", "oracle (any correct)")}


def pyplot():
  """matplotlib's pyplot on the file-only Agg backend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig: Any, path: str | epath.PathLike, dpi: int = 120) -> epath.Path:
  """Lays out and writes the figure as PNG (creating its folder), then closes it."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, dpi=dpi, format="png")
  pyplot().close(fig)
  return path


def plot_bon(results: dict[str, dict[str, float]], path: str | epath.PathLike,
             title: str = "Best-of-N") -> epath.Path:
  """Accuracy against N (log2 axis) for each method of a `bon.best_of_n` result; writes `path`."""
  ns = sorted(results, key=int)
  fig, ax = pyplot().subplots(figsize=(6, 4), dpi=120)
  for method in bon_lib.METHODS:
    color, marker, label = _STYLE[method]
    ax.plot([int(n) for n in ns], [100 * results[n][method] for n in ns], color=color,
            marker=marker, label=label)
  ax.set_xscale("log", base=2)
  ax.set_xticks([int(n) for n in ns], ns)
  ax.set_xlabel("N (candidates per question)")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  return save_figure(fig, path)
