"""The whole CodePMP method on one machine, on the built-in default (`make demo`).

  python -m codepmp_jax.demo [--out=demo_out]

1. Synthesize code-preference pairs from the standard library (offline `mutate` strategy), train a
   tokenizer on them, prepare them, and PMP-pretrain the tiny model (configs/tiny.py).
2. Prepare GSM8K preference pairs (reference vs a consistently wrong solution) with that tokenizer.
3. Fine-tune two reward models on them, one from the PMP checkpoint and one from scratch, with the
   same data, seed and schedule.
4. Evaluate both: pairwise accuracy on held-out GSM8K test pairs, LogiQA 2.0 multiple choice, and
   Best-of-4 on GSM8K test questions; print a side-by-side table and write its plot.
Each stage says what it wrote where; a rerun reuses finished stages.
"""
from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags, logging

from codepmp_jax import recipes, train
from codepmp_jax.data.builtin import SHARED_DATA
from codepmp_jax.config import load_config

FLAGS = flags.FLAGS

ROWS = (("GSM8K pairwise accuracy (held-out test)", ("pairwise", "accuracy")),
        ("LogiQA 2.0 multiple-choice accuracy", ("mc", "accuracy")),
        ("GSM8K Best-of-4 accuracy", ("bon", "4", "rm")),
        ("RM fine-tune final train loss", ("train", "loss")))


def _get(report: dict, keys: tuple[str, ...]) -> float:
  for key in keys:
    report = report[key]
  return float(report)


def results_table(reports: dict[str, dict]) -> str:
  """A Markdown table: one row per metric, one column per arm."""
  arms = list(reports)
  lines = ["| metric | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
  for name, keys in ROWS:
    lines.append(f"| {name} | " + " | ".join(f"{_get(reports[a], keys):.3f}" for a in arms) + " |")
  return "\n".join(lines)


def plot_results(reports: dict[str, dict], path: pathlib.Path) -> pathlib.Path:
  """Grouped bars of the accuracy rows, PMP-initialized against scratch."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in ROWS if "accuracy" in r[0]]
  fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
  width = 0.8 / len(reports)
  for i, (arm, report) in enumerate(reports.items()):
    values = [_get(report, keys) for _, keys in rows]
    bars = ax.bar([j + i * width for j in range(len(rows))], values, width, label=arm)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
  ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(rows))],
                [name.split(" (")[0] for name, _ in rows], fontsize=8)
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.set_title("Reward models fine-tuned on GSM8K pairs")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def run(out: pathlib.Path) -> dict[str, dict]:
  """Every stage of the demo; returns the evaluation report of each arm."""
  start = time.time()

  logging.info("[1/4] PMP: code pairs from the standard library -> %s", out / "pmp")
  pmp_config = load_config("tiny")
  pmp_config.data.path = str(out / "code_pairs")
  pmp_summary = recipes.train_once(pmp_config, out / "pmp")
  logging.info("PMP done: held-out code-pair accuracy %.3f", pmp_summary.get("eval/accuracy", float("nan")))

  logging.info("[2/4] GSM8K pairs with the PMP tokenizer -> %s", out / "gsm8k_pairs")
  gsm8k = SHARED_DATA / "gsm8k"
  subset = recipes.first_lines(gsm8k / "train.jsonl", out / "gsm8k_train_subset.jsonl",
                               FLAGS.rm_questions)
  pairs = recipes.prepare_once([subset], "gsm8k", out / "pmp", out / "gsm8k_pairs",
                               seq_len=pmp_config.train.seq_len, split="train:0.95,eval:0.05")

  reports = {}
  for arm, init_from in (("PMP-initialized", str(out / "pmp")), ("scratch", "")):
    workdir = out / ("rm_pmp" if init_from else "rm_scratch")
    logging.info("[3/4] RM fine-tuning (%s) -> %s", arm, workdir)
    config = recipes.rm_config(pmp_config, pairs, init_from, str(out / "pmp"), FLAGS.rm_steps,
                               FLAGS.rm_lr)
    train_summary = recipes.train_once(config, workdir)
    logging.info("[4/4] evaluating %s -> %s", arm, workdir / "eval.json")
    candidates = recipes.bon_candidates(gsm8k / "test.jsonl", out / "bon_candidates.jsonl",
                                        FLAGS.eval_questions, n=4)
    report = recipes.evaluate_rm(
        workdir, workdir / "eval.json", gsm8k_pairs=gsm8k / "test.jsonl",
        logiqa=SHARED_DATA / "logiqa2" / "test.jsonl", candidates=candidates,
        ns=(1, 2, 4), limit=FLAGS.eval_questions)
    reports[arm] = {**report, "train": train_summary}

  table = results_table(reports)
  (out / "results.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps(reports, indent=1))
  plot = plot_results(reports, out / "results.png")
  print("\n" + table + "\n")
  print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {plot} "
        f"({(time.time() - start) / 60:.1f} min this run)")
  return reports


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing adds none)."""
  flags.DEFINE_string("out", "demo_out", "Directory for every stage's output.")
  flags.DEFINE_integer("rm_questions", 1500, "GSM8K train questions used for RM fine-tuning.")
  flags.DEFINE_integer("rm_steps", 80, "RM fine-tuning steps (both arms).")
  flags.DEFINE_float("rm_lr", 1e-3, "RM fine-tuning learning rate (both arms).")
  flags.DEFINE_integer("eval_questions", 150, "Held-out GSM8K test / LogiQA 2.0 test questions scored.")


def main(argv: list[str]) -> None:
  del argv
  train.quiet_library_logs()
  run(pathlib.Path(FLAGS.out).absolute())


if __name__ == "__main__":
  define_flags()
  app.run(main)
