"""The whole CodePMP method on one machine, on the built-in default (`make demo`).

  python -m launch.experiments.demo [--out=demo_out]

1. Synthesize code-preference pairs from the standard library (offline `mutate` strategy), train a
   tokenizer on them, prepare them, and PMP-pretrain the tiny model (configs/tiny.py).
2. Prepare GSM8K preference pairs (reference vs a consistently wrong solution) with that tokenizer.
3. Fine-tune two reward models on them (configs/short_rm.py), one from the PMP checkpoint and one
   from scratch, with the same data, seed and schedule.
4. Evaluate both: pairwise accuracy on held-out GSM8K test pairs, LogiQA 2.0 multiple choice, and
   Best-of-4 on GSM8K test questions; print a side-by-side table and write its plot.
Each stage says what it wrote where; a rerun reuses finished stages.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from etils import epath

if __name__ == "__main__" and not __package__:  # `python launch/experiments/demo.py`
  sys.path.insert(0, str(epath.Path(__file__).resolve().parents[2]))

from absl import logging  # noqa: E402  (after the path set-up above)

from codepmp_jax.config import load_config  # noqa: E402
from codepmp_jax.data.builtin import SHARED_DATA  # noqa: E402
from launch.experiments import recipes, report, settings_flags  # noqa: E402
from launch.experiments.settings_flags import setting  # noqa: E402

ROWS = (("GSM8K pairwise accuracy (held-out test)", ("pairwise", "accuracy")),
        ("LogiQA 2.0 multiple-choice accuracy", ("mc", "accuracy")),
        ("GSM8K Best-of-4 accuracy", ("bon", "4", "rm")),
        ("RM fine-tune final train loss", ("train", "loss")))


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """What the demo runs; the defaults are `make demo`."""
  out: str = setting("demo_out", "Directory for every stage's output.")
  rm_questions: int = setting(1500, "GSM8K train questions used for RM fine-tuning.")
  rm_steps: int = setting(80, "RM fine-tuning steps (both arms).")
  rm_lr: float = setting(1e-3, "RM fine-tuning learning rate (both arms).")
  eval_questions: int = setting(150, "Held-out GSM8K test / LogiQA 2.0 test questions scored.")
  shared_data: str = setting(str(SHARED_DATA), "The reference data sets (gsm8k/, logiqa2/).")
  pmp_overrides: Mapping[str, Any] = setting(
      {}, "Dotted fields changed on the PMP run's config (configs/tiny.py), for a smaller run.")
  rm_overrides: Mapping[str, Any] = setting(
      {}, "Dotted fields changed on the RM fine-tunes' config (configs/short_rm.py).")


def results_table(reports: dict[str, dict]) -> str:
  """A Markdown table: one row per metric, one column per arm."""
  rows = [[name, *[report.lookup(reports[arm], keys) for arm in reports]] for name, keys in ROWS]
  return report.to_markdown(["metric", *reports], rows, cell=report.fixed3,
                            align=["---", *["---:"] * len(reports)]).rstrip("\n")


def plot_results(reports: dict[str, dict], path: epath.Path) -> epath.Path:
  """Grouped bars of the accuracy rows, PMP-initialized against scratch."""
  rows = [r for r in ROWS if "accuracy" in r[0]]
  fig, ax = report.pyplot().subplots(figsize=(7, 3.6), dpi=120)
  width = 0.8 / len(reports)
  for i, (arm, arm_report) in enumerate(reports.items()):
    values = [report.lookup(arm_report, keys) for _, keys in rows]
    bars = ax.bar([j + i * width for j in range(len(rows))], values, width, label=arm)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
  ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(rows))],
                [name.split(" (")[0] for name, _ in rows], fontsize=8)
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.set_title("Reward models fine-tuned on GSM8K pairs")
  ax.legend()
  return report.save_figure(fig, path)


def run(settings: DemoSettings) -> dict[str, dict]:
  """Every stage of the demo; returns the evaluation report of each arm."""
  start = time.time()
  out = epath.Path(settings.out)
  shared = epath.Path(settings.shared_data)

  logging.info("[1/4] PMP: code pairs from the standard library -> %s", out / "pmp")
  pmp_config = load_config("tiny")
  pmp_config.update_from_flattened_dict(dict(settings.pmp_overrides))
  pmp_config.data.path = str(out / "code_pairs")
  pmp_summary = recipes.train_once(pmp_config, out / "pmp")
  logging.info("PMP done: held-out code-pair accuracy %.3f",
               pmp_summary.get("eval/accuracy", float("nan")))

  logging.info("[2/4] GSM8K pairs with the PMP tokenizer -> %s", out / "gsm8k_pairs")
  gsm8k = shared / "gsm8k"
  subset = recipes.first_lines(gsm8k / "train.jsonl", out / "gsm8k_train_subset.jsonl",
                               settings.rm_questions)
  pairs = recipes.prepare_once([subset], "gsm8k", out / "pmp", out / "gsm8k_pairs",
                               seq_len=pmp_config.train.seq_len, split="train:0.95,eval:0.05")

  reports = {}
  for arm, init_from in (("PMP-initialized", str(out / "pmp")), ("scratch", "")):
    workdir = out / ("rm_pmp" if init_from else "rm_scratch")
    logging.info("[3/4] RM fine-tuning (%s) -> %s", arm, workdir)
    config = load_config(f"short_rm:steps={settings.rm_steps},lr={settings.rm_lr!r}")
    config.update_from_flattened_dict(dict(settings.rm_overrides))
    config.update(init_from=init_from, tokenizer=str(out / "pmp"))
    config.data.path = str(pairs)
    train_summary = recipes.train_once(config, workdir)
    logging.info("[4/4] evaluating %s -> %s", arm, workdir / "eval.json")
    candidates = recipes.bon_candidates(gsm8k / "test.jsonl", out / "bon_candidates.jsonl",
                                        settings.eval_questions, n=4)
    arm_report = recipes.evaluate_rm(
        workdir, workdir / "eval.json", gsm8k_pairs=gsm8k / "test.jsonl",
        logiqa=shared / "logiqa2" / "test.jsonl", candidates=candidates,
        ns=(1, 2, 4), limit=settings.eval_questions)
    reports[arm] = {**arm_report, "train": train_summary}

  table = results_table(reports)
  (out / "results.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps(reports, indent=1))
  plot = plot_results(reports, out / "results.png")
  print("\n" + table + "\n")
  print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {plot} "
        f"({(time.time() - start) / 60:.1f} min this run)")
  return reports


if __name__ == "__main__":
  settings_flags.run_program(DemoSettings, run)
