"""PNG plots of evaluation results (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from codepmp_jax.eval import bon as bon_lib  # noqa: E402

_STYLE = {"rm": ("C0", "o", "reward model"), "random": ("C7", "s", "random (pass@1)"),
          "majority": ("C2", "^", "majority vote"), "oracle": ("C3", "v", "oracle (any correct)")}


def plot_bon(results: dict[str, dict[str, float]], path: str | pathlib.Path,
             title: str = "Best-of-N") -> pathlib.Path:
  """Accuracy against N (log2 axis) for each method of a `bon.best_of_n` result; writes `path`."""
  ns = sorted(results, key=int)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
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
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path
