"""Scaling curves the cheap way: RM accuracy against the number of PMP pairs from one WSD run.

The paper keeps checkpoints from the stable phase of one warmup-stable-decay PMP run at steps
spaced by a factor of sqrt(2), runs a short decay from each, fine-tunes an RM from every decayed
checkpoint and evaluates it. This module gives the steps, then fine-tunes, evaluates and plots:

  python -m launch.experiments.scaling_curve steps --first=250 --last=4000
      # -> the steps and --config.checkpoint.keep_steps=(250,354,500,...) for the PMP run
  # (PMP run with those keep_steps; then one decay run per kept step, see codepmp_jax/train.py)
  python -m launch.experiments.scaling_curve finetune --checkpoints='runs/decay_*' \
      --config=configs/rm_gsm8k_smollm2_135m.py --root=runs/curve --baseline=ckpt/smollm2 \
      [--eval=pairwise --eval_data=../shared/data/gsm8k/test.jsonl --eval_format=gsm8k] [--run]
  python -m launch.experiments.scaling_curve plot --root=runs/curve
      # -> runs/curve/curve.png, curve.csv, curve.md

`finetune` prints the commands (or runs them with --run, skipping finished ones): one RM
fine-tune per checkpoint (`init_from` = the checkpoint) and, with --eval, one evaluation. The
number of PMP pairs of a checkpoint is its training workdir's final step times its global batch
(summary.json and config.json); give it yourself as `PATH@PAIRS` for other checkpoints.
`plot` reads each evaluation report's accuracy (or, without --eval, the fine-tune's final
`eval/accuracy`) and draws accuracy against pairs, the baseline (no PMP) as a line.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import pathlib
import shlex
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags

from codepmp_jax import cli
from codepmp_jax import workdir as workdir_lib
from launch import sweep
from launch.experiments import report

MANIFEST = "curve.json"
EVAL_REPORT = "eval.json"
BASELINE = "baseline"


def geometric_steps(first: int, last: int, factor: float = math.sqrt(2)) -> list[int]:
  """Steps `round(first * factor**k)` up to `last`, without repeats.

  The stable-phase checkpoints to keep for a scaling curve (and so the curve's x positions):
  with sqrt(2) every other step doubles, e.g. 1000, 1414, 2000, 2828, 4000.
  """
  if first < 1 or last < first:
    raise ValueError(f"need 1 <= first <= last, got first={first} last={last}")
  if factor <= 1:
    raise ValueError(f"factor must be above 1, got {factor}")
  steps, k = [], 0
  while (value := first * factor**k) <= last * (1 + 1e-9):
    step = round(value)
    if not steps or step != steps[-1]:
      steps.append(step)
    k += 1
  return steps


def keep_steps_override(steps: Sequence[int]) -> str:
  """The trainer flag that keeps these checkpoints beyond the newest few."""
  return f"--config.checkpoint.keep_steps=({','.join(str(s) for s in steps)},)"


@dataclasses.dataclass(frozen=True)
class Point:
  """One curve point: a PMP checkpoint (empty: from scratch), its pair count and its run name."""
  name: str
  checkpoint: str
  pairs: int


def pairs_of_workdir(path: str | pathlib.Path) -> int:
  """PMP pairs a training workdir has seen: final step (summary.json) x train.global_batch."""
  summary, config = workdir_lib.read_summary(path), workdir_lib.read_config(path)
  missing = [name for name, data in ((workdir_lib.SUMMARY, summary), (workdir_lib.CONFIG, config))
             if data is None]
  if missing:
    raise sweep.SweepError(f"{path}: no {' or '.join(missing)} to count its PMP pairs from; "
                           f"is it a finished training workdir? Else write {path}@PAIRS")
  return int(summary["step"]) * int(config["train"]["global_batch"])


def resolve_points(patterns: Sequence[str], baseline: str | None = None) -> list[Point]:
  """Curve points from checkpoint globs (`PATH` or `PATH@PAIRS`), sorted by pairs.

  Run names are the checkpoint directory names (with the parent's in front where two share one);
  `baseline` (a checkpoint, or `scratch` for a fresh model) becomes the point `baseline` at 0 pairs.
  """
  entries: list[tuple[str, int | None]] = []
  for pattern in patterns:
    path, _, pairs = pattern.partition("@")
    matches = sorted(glob.glob(path))
    directories = [m for m in matches if pathlib.Path(m).is_dir()]
    if not directories:
      raise sweep.SweepError(f"--checkpoints: no directory matches {path!r}")
    if len(directories) < len(matches):  # e.g. a sweep root's results.csv and sweep.json
      print(f"scaling_curve: {path!r}: skipped {len(matches) - len(directories)} files that are not "
            "checkpoint directories", file=sys.stderr)
    if pairs and not pairs.isdigit():
      raise sweep.SweepError(f"--checkpoints: {pattern!r}: PAIRS must be an integer")
    entries += [(m, int(pairs) if pairs else None) for m in directories]
  names = [pathlib.Path(p).name for p, _ in entries]
  points = []
  for (path, pairs), name in zip(entries, names):
    if names.count(name) > 1:
      name = f"{pathlib.Path(path).parent.name}_{name}"
    points.append(Point(sweep.safe_name(name), path,
                        pairs if pairs is not None else pairs_of_workdir(path)))
  if baseline:
    points.append(Point(BASELINE, "" if baseline == "scratch" else baseline, 0))
  seen = [p.name for p in points]
  if len(set(seen)) != len(seen):
    raise sweep.SweepError(f"two checkpoints give the same run name: {seen}")
  return sorted(points, key=lambda p: (p.pairs, p.name))


def finetune_runs(points: Sequence[Point], fixed: Sequence[tuple[str, str]] = ()) -> list[sweep.Run]:
  """One sweep run per point: the fine-tune config with `init_from` set to the point's checkpoint."""
  return [sweep.Run(p.name, (*fixed, ("init_from", p.checkpoint))) for p in points]


@dataclasses.dataclass(frozen=True)
class CurveSettings:
  """One scaling curve: an RM fine-tune (`config`) from each checkpoint, evaluated, plotted.

  checkpoints: globs of checkpoints or workdirs, each optionally `PATH@PAIRS`; baseline: a
  checkpoint without PMP (or `scratch`) fine-tuned the same way; overrides: `KEY=V` for every
  fine-tune; extra: trainer flags passed unchanged; evaluation: `pairwise` | `mc` with
  `eval_data` / `eval_format` (empty: the fine-tune's own eval/accuracy); execute: run here
  (skipping finished steps) and plot, else print the commands.
  """
  checkpoints: tuple[str, ...]
  config: str
  root: str
  baseline: str = ""
  overrides: tuple[str, ...] = ()
  extra: tuple[str, ...] = ()
  evaluation: str = ""
  eval_data: str = ""
  eval_format: str = ""
  eval_args: str = ""
  execute: bool = False
  python: str = ""
  skip_check: bool = False


def eval_command(python: str, settings: CurveSettings, workdir: pathlib.Path) -> list[str]:
  """`python -m codepmp_jax.eval MODE` on a fine-tuned workdir, writing `workdir/eval.json`."""
  return [python, "-m", "codepmp_jax.eval", settings.evaluation, f"--checkpoint={workdir}",
          f"--data={settings.eval_data}", f"--format={settings.eval_format}",
          f"--out={workdir / EVAL_REPORT}", *shlex.split(settings.eval_args)]


def point_accuracy(workdir: pathlib.Path) -> tuple[float, float | None, float | None, str]:
  """Accuracy of a fine-tuned point, with its 95% CI when an eval report has one, and the source."""
  report = workdir / EVAL_REPORT
  if report.exists():
    data = json.loads(report.read_text())
    low, high = data.get("ci95", (None, None))
    return float(data["accuracy"]), low, high, f"{EVAL_REPORT} ({data.get('mode', '')})"
  result = sweep.read_result(workdir)
  if result.status != "finished":
    raise sweep.SweepError(f"{workdir}: fine-tune is {result.status} and has no {EVAL_REPORT}")
  if "eval/accuracy" not in result.metrics:
    raise sweep.SweepError(f"{workdir}: no {EVAL_REPORT} and no eval/accuracy in "
                           f"{workdir_lib.SUMMARY}")
  return result.metrics["eval/accuracy"], None, None, f"{workdir_lib.SUMMARY} eval/accuracy"


def curve_rows(root: str | pathlib.Path) -> list[dict]:
  """One row per point of a fine-tuned curve: name, pairs, accuracy (+ CI), checkpoint, source."""
  root = pathlib.Path(root)
  manifest = root / MANIFEST
  if not manifest.exists():
    raise sweep.SweepError(f"{manifest}: missing; run `python -m launch.experiments.scaling_curve finetune` first")
  rows = []
  for point in json.loads(manifest.read_text())["points"]:
    accuracy, low, high, source = point_accuracy(root / point["name"])
    rows.append({"run": point["name"], "pairs": point["pairs"], "accuracy": accuracy,
                 "ci95_low": low, "ci95_high": high, "checkpoint": point["checkpoint"] or "scratch",
                 "source": source})
  return rows


def plot_curve(rows: Sequence[dict], path: str | pathlib.Path, title: str) -> pathlib.Path:
  """Accuracy against PMP pairs (log scale), 95% CIs where known, the baseline as a dashed line."""
  fig, ax = report.pyplot().subplots(figsize=(6, 4))
  points = [r for r in rows if r["pairs"] > 0]
  xs = [r["pairs"] for r in points]
  ys = [100 * r["accuracy"] for r in points]
  errors = None
  if points and all(r["ci95_low"] is not None for r in points):
    errors = [[y - 100 * r["ci95_low"] for y, r in zip(ys, points)],
              [100 * r["ci95_high"] - y for y, r in zip(ys, points)]]
  ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label="PMP-initialized")
  for r, x, y in zip(points, xs, ys):
    ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
  for r in rows:
    if r["pairs"] == 0:
      ax.axhline(100 * r["accuracy"], linestyle="--", color="gray", label=f"{r['run']} (no PMP)")
  if xs and min(xs) != max(xs):
    ax.set_xscale("log", base=2)
  ax.set_xlabel("PMP pairs")
  ax.set_ylabel("RM accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  return report.save_figure(fig, path)


def run(settings: CurveSettings) -> int:
  """Fine-tunes (and evaluates) an RM from every checkpoint, or prints the commands; 0 if all ran.

  With `execute` it then tabulates and plots the curve (`plot`).
  """
  points = resolve_points(settings.checkpoints, settings.baseline)
  fixed = [sweep.parse_override(s, "--set") for s in settings.overrides]
  runs = finetune_runs(points, fixed)
  extra = list(settings.extra)
  if not settings.skip_check:
    sweep.check_overrides(settings.config, runs, extra)
  if settings.evaluation and not (settings.eval_data and settings.eval_format):
    raise sweep.SweepError("--eval needs --eval_data and --eval_format")
  root = pathlib.Path(settings.root)
  python = settings.python or (sys.executable if settings.execute else "python")
  if not settings.execute:
    print(f"# {len(runs)} fine-tunes of {settings.config} under {root} (pairs: "
          f"{', '.join(f'{p.name}={p.pairs}' for p in points)})")
    for point_run in runs:
      print(shlex.join([python, "-m", "codepmp_jax.train",
                        *sweep.train_args(settings.config, str(root), point_run, extra)]))
      if settings.evaluation:
        print(shlex.join(eval_command(python, settings, root / point_run.name)))
    return 0
  sweep.write_manifest(root, settings.config, runs)
  (root / MANIFEST).write_text(json.dumps(
      {"config": settings.config, "eval": settings.evaluation, "eval_data": settings.eval_data,
       "points": [dataclasses.asdict(p) for p in points]}, indent=2) + "\n")
  if sweep.run_all(python, settings.config, str(root), runs, extra, keep_going=False):
    return 1
  if settings.evaluation:
    for i, point_run in enumerate(runs, 1):
      workdir = root / point_run.name
      if (workdir / EVAL_REPORT).exists():
        print(f"scaling_curve: [{i}/{len(runs)}] {point_run.name}: evaluated before, skipped",
              flush=True)
        continue
      command = eval_command(python, settings, workdir)
      print(f"scaling_curve: [{i}/{len(runs)}] {shlex.join(command)}", flush=True)
      if subprocess.run(command, check=False).returncode != 0:
        print(f"scaling_curve: evaluating {point_run.name} failed", file=sys.stderr)
        return 1
  plot(str(root))
  return 0


def plot(root: str, title: str | None = None) -> list[dict]:
  """Writes ROOT/curve.csv, curve.md and curve.png of a fine-tuned curve; returns its rows."""
  root_path = pathlib.Path(root)
  rows = curve_rows(root_path)
  header = ["run", "pairs", "accuracy", "ci95_low", "ci95_high", "checkpoint", "source"]
  table = [[r[h] for h in header] for r in rows]
  (root_path / "curve.csv").write_text(report.to_csv(header, table))
  markdown = report.to_markdown(header, table)
  (root_path / "curve.md").write_text(markdown)
  png = plot_curve(rows, root_path / "curve.png",
                   title or f"RM accuracy against PMP pairs ({root_path.name})")
  print(markdown, end="")
  print(f"wrote {png}, {root_path / 'curve.csv'} and {root_path / 'curve.md'}")
  return rows


COMMANDS = ("steps", "finetune", "plot")
REQUIRED = {"steps": ("first", "last"), "finetune": ("checkpoints", "config", "root"), "plot": ("root",)}


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """Every command's flags (which ones a command requires is checked in `main`)."""
  def string(name: str, help: str, default: str | None = None) -> None:
    flags.DEFINE_string(name, default, help, flag_values=values)

  flags.DEFINE_integer("first", None, "steps: first kept step.", flag_values=values)
  flags.DEFINE_integer("last", None, "steps: no step beyond this (the stable phase's end).",
                       flag_values=values)
  flags.DEFINE_float("factor", math.sqrt(2), "steps: ratio of consecutive steps.", flag_values=values)
  string("checkpoints", "finetune: comma-separated globs of checkpoints or workdirs, each "
         "optionally PATH@PAIRS.")
  string("config", "finetune: the RM fine-tune config[:arg].")
  string("root", "finetune: directory holding one fine-tune workdir per point; plot: the finetune "
         "--root.")
  string("baseline", "finetune: a checkpoint without PMP (or 'scratch') fine-tuned the same way.")
  flags.DEFINE_multi_string("set", [], "finetune: KEY=V, an override for every fine-tune "
                            "(repeatable).", flag_values=values)
  flags.DEFINE_enum("eval", None, ("pairwise", "mc"), "finetune: evaluate with codepmp_jax.eval "
                    "(default: the fine-tune's eval/accuracy).", flag_values=values)
  string("eval_data", "finetune: held-out data for --eval.")
  string("eval_format", "finetune: its loader format (gsm8k, logiqa2, pairs, ...).")
  string("eval_args", "finetune: more codepmp_jax.eval arguments, e.g. '--limit=500'.", default="")
  flags.DEFINE_bool("run", False, "finetune: run here (skipping finished steps) and plot, instead "
                    "of printing the commands.", flag_values=values)
  string("python", "finetune: Python of the commands (default: python; with --run, this one).")
  flags.DEFINE_bool("skip_check", False, "finetune: do not check overrides against the config.",
                    flag_values=values)
  string("title", "plot: plot title.")


def main(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> int:
  """The command is `argv[1]`; arguments after `--` (left in `argv` by absl) go to every fine-tune."""
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"expected a command, {'|'.join(COMMANDS)}, as the first argument; got "
                         f"{list(argv[1:])} (--help for usage)")
  command, extra = argv[1], list(argv[2:])
  if extra and command != "finetune":
    raise app.UsageError(f"{command}: unexpected arguments {extra}")
  for name in REQUIRED[command]:
    if values[name].value is None:
      raise app.UsageError(f"{command}: --{name} is required")
  if command == "steps":
    steps = geometric_steps(values.first, values.last, values.factor)
    print(" ".join(str(s) for s in steps))
    print(keep_steps_override(steps))
    return 0
  if command == "finetune":
    return run(CurveSettings(
        checkpoints=tuple(values.checkpoints.split(",")), config=values.config, root=values.root,
        baseline=values.baseline or "", overrides=tuple(values.set), extra=tuple(extra),
        evaluation=values.eval or "", eval_data=values.eval_data or "",
        eval_format=values.eval_format or "", eval_args=values.eval_args, execute=values.run,
        python=values.python or "", skip_check=values.skip_check))
  plot(values.root, values.title)
  return 0


if __name__ == "__main__":
  cli.run(main, define_flags)
