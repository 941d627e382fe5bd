"""Sweeps: a grid or list of config overrides -> one training command per run, each in its own workdir.

  python -m launch.sweep --config=configs/tiny.py --root=runs/lr \
      --grid 'optimizer.lr=1e-4,1e-3' --grid 'loss.lm_coef=0,1' [--set train.total_steps=100]
  python -m launch.sweep launch/sweeps/loss_components.sweep --root=runs/loss --run
  python -m launch.sweep launch/sweeps/schedule.sweep --root=runs/sched --emit=slurm \
      --launcher_args='--nodes=4' > submit.sh
  python -m launch.sweep collect --root=runs/lr      # -> runs/lr/results.csv and results.md

Modes: --print (default) prints the commands; --run runs them here one after another and skips
workdirs that already finished (an unfinished one resumes from its checkpoint); --emit=slurm|tpu
prints commands for launch/gpu_slurm.sbatch or launch/tpu_vm.sh. Arguments after `--` go to every
training command unchanged. Overrides are checked against the config before anything runs.

A sweep file holds one statement a line (`#` starts a comment):
  config: configs/pmp_smollm2_135m.py       the config (--config overrides it)
  set: loss.rm_coef=1 train.epochs=1        overrides for every run
  grid: optimizer.lr=1e-6,3e-6              a grid axis (every combination of the axes runs)
  run NAME: loss.lm_coef=0                  a named run; with several, each is crossed with the grid
Values that hold commas or spaces are written in brackets or quotes: `mesh_shape=(1,-1,1)`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import pathlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

MANIFEST = "sweep.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
SLURM_SCRIPT = "launch/gpu_slurm.sbatch"
TPU_SCRIPT = "launch/tpu_vm.sh"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=+-]+")


class SweepError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep: its workdir name and its `--config.*` overrides (key, value)."""
  name: str
  overrides: tuple[tuple[str, str], ...]


@dataclasses.dataclass
class Sweep:
  """A parsed sweep: config, overrides shared by all runs, grid axes and named runs."""
  config: str | None = None
  fixed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  grid: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
  named: list[tuple[str, list[tuple[str, str]]]] = dataclasses.field(default_factory=list)


def split_top_level(text: str, separator: str = ",") -> list[str]:
  """Splits at `separator` outside brackets and quotes, so `(1,-1,1)` stays one value."""
  parts, depth, quote, start = [], 0, "", 0
  for i, ch in enumerate(text):
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "\"'":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == separator and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts]


def parse_override(text: str, where: str) -> tuple[str, str]:
  """`key=value` (an optional `--config.` prefix is dropped) -> (key, value)."""
  key, sep, value = text.strip().removeprefix("--config.").partition("=")
  if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
    raise SweepError(f"{where}: expected key=value with a dotted config key, got {text!r}")
  return key, value


def parse_grid(text: str, where: str) -> tuple[str, list[str]]:
  """`key=v1,v2,...` -> (key, values)."""
  key, values = parse_override(text, where)
  parts = split_top_level(values)
  if any(not p for p in parts):
    raise SweepError(f"{where}: grid {key} has an empty value in {values!r}")
  if len(set(parts)) != len(parts):
    raise SweepError(f"{where}: grid {key} repeats a value in {values!r}")
  return key, parts


def read_sweep_file(path: str | pathlib.Path) -> Sweep:
  """Parses a sweep file (format in the module docstring); errors name the file and line."""
  sweep = Sweep()
  for number, raw in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
    where = f"{path}:{number}"
    line = raw.split("#", 1)[0].strip()
    if not line:
      continue
    head, sep, body = line.partition(":")
    if not sep:
      raise SweepError(f"{where}: expected 'config:', 'set:', 'grid:' or 'run NAME:', got {raw!r}")
    words = shlex.split(body)
    head = head.strip()
    if head == "config":
      if len(words) != 1:
        raise SweepError(f"{where}: 'config:' takes one path, got {body.strip()!r}")
      sweep.config = words[0]
    elif head == "set":
      sweep.fixed += [parse_override(w, where) for w in words]
    elif head == "grid":
      if len(words) != 1:
        raise SweepError(f"{where}: 'grid:' takes one key=v1,v2,... (no spaces), got {body.strip()!r}")
      sweep.grid.append(parse_grid(words[0], where))
    elif head.startswith("run "):
      name = head[4:].strip()
      if not name or _NAME_CHARS.search(name):
        raise SweepError(f"{where}: run name {name!r} may use only letters, digits and ._=+-")
      sweep.named.append((name, [parse_override(w, where) for w in words]))
    else:
      raise SweepError(f"{where}: unknown statement {head!r}")
  return sweep


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """The last component of each key, or the whole key where two keys share it."""
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def safe_name(text: str) -> str:
  """`text` as a workdir name: runs of other characters than letters, digits and ._=+- become '-'."""
  return _NAME_CHARS.sub("-", text).strip("-")


def expand(sweep: Sweep) -> list[Run]:
  """Every run of the sweep: named runs (or one unnamed) crossed with every grid combination.

  Later overrides of the same key win: shared `set`, then the named run's, then the grid's.
  Workdir names are the run name plus `key=value` of each grid axis, e.g. `rm_only_lr=1e-6`.
  """
  keys = [k for k, _ in sweep.grid]
  if len(set(keys)) != len(keys):
    raise SweepError(f"a grid axis appears twice: {keys}")
  short = _short_keys(keys)
  named = sweep.named or [("", [])]
  runs, seen = [], {}
  for (name, own), combo in itertools.product(named, itertools.product(*[v for _, v in sweep.grid])):
    merged = dict(sweep.fixed)
    merged.update(own)
    merged.update(zip(keys, combo))
    parts = ([name] if name else []) + [safe_name(f"{short[k]}={v}") for k, v in zip(keys, combo)]
    run_name = "_".join(parts) or "run"
    if run_name in seen:
      raise SweepError(f"two runs would share the workdir {run_name!r}: {seen[run_name]} and {merged}")
    seen[run_name] = merged
    runs.append(Run(run_name, tuple(merged.items())))
  return runs


def override_args(run: Run) -> list[str]:
  """The run's overrides as trainer flags."""
  return [f"--config.{k}={v}" for k, v in run.overrides]


def train_args(config: str, root: str, run: Run, extra: Sequence[str] = ()) -> list[str]:
  """Arguments of `python -m codepmp_jax.train` for one run (its workdir is `root/name`)."""
  return [f"--config={config}", f"--workdir={pathlib.PurePath(root) / run.name}",
          *override_args(run), *extra]


def check_overrides(config: str, runs: Iterable[Run], extra: Sequence[str] = ()) -> None:
  """Parses every run's flags the way the trainer does, so a typo fails before any run starts."""
  from absl import flags
  from ml_collections import config_flags

  for run in runs:
    argv = ["train", f"--config={config}", *override_args(run), *extra]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    try:
      values(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
      reason = e
      while isinstance(reason, (KeyError, AttributeError)) and reason.args:  # unwrap to the message
        reason = reason.args[0]
      raise SweepError(f"run {run.name}: the config {config} rejects its overrides: {reason}") from e


def launcher_command(kind: str, root: str, run: Run, args: Sequence[str],
                     launcher_args: Sequence[str]) -> list[str]:
  """The command that hands one run to a launcher: `sbatch` with gpu_slurm.sbatch, or tpu_vm.sh."""
  job = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{pathlib.PurePath(root).name}-{run.name}")
  if kind == "slurm":
    return ["sbatch", f"--job-name={job}", *launcher_args, SLURM_SCRIPT, *args]
  if kind == "tpu":
    # TPU VM names: lowercase letters, digits and hyphens, starting with a letter, at most 63.
    vm = re.sub(r"[^a-z0-9-]+", "-", f"codepmp-{job}".lower()).strip("-")
    if len(vm) > 63:
      vm = f"{vm[:54].rstrip('-')}-{hashlib.sha256(job.encode()).hexdigest()[:8]}"
    return [TPU_SCRIPT, f"--name={vm}", *launcher_args, "--", *args]
  raise SweepError(f"unknown launcher {kind!r} (slurm or tpu)")


def write_manifest(root: pathlib.Path, config: str, runs: Sequence[Run]) -> None:
  """Records the sweep in `root/sweep.json`, so `collect` can show each run's overrides."""
  root.mkdir(parents=True, exist_ok=True)
  data = {"config": config, "runs": [{"name": r.name, "overrides": dict(r.overrides)} for r in runs]}
  (root / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Results of workdirs.


@dataclasses.dataclass
class Result:
  """What a workdir holds: status (finished, stopped, incomplete, not started), step and metrics."""
  name: str
  status: str
  step: int | None
  metrics: dict[str, float]


def _last_metrics_line(path: pathlib.Path) -> dict | None:
  """The last record of a metrics.jsonl; a torn last line (a kill mid-write) is skipped."""
  lines = path.read_text().splitlines()
  last = None
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      last = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        print(f"warning: {path}:{number}: torn last line skipped", file=sys.stderr)
        break
      raise SweepError(f"{path}:{number}: not JSON ({e})") from e
  return last


def _total_steps(workdir: pathlib.Path) -> int:
  path = workdir / "config.json"
  if not path.exists():
    return 0
  return int(json.loads(path.read_text()).get("train", {}).get("total_steps") or 0)


def read_result(workdir: str | pathlib.Path, name: str | None = None) -> Result:
  """Final metrics of one training workdir: `summary.json`, else the last `metrics.jsonl` line.

  `finished` needs summary.json at the configured `train.total_steps` (a preempted run writes
  one earlier: `stopped`); a run with metrics but no summary is `incomplete`.
  """
  workdir = pathlib.Path(workdir)
  name = name or workdir.name
  summary, metrics = workdir / SUMMARY, workdir / METRICS
  if summary.exists():
    try:
      record = json.loads(summary.read_text())
    except json.JSONDecodeError as e:
      raise SweepError(f"{summary}: not JSON ({e})") from e
    status = "finished"
  elif metrics.exists() and (record := _last_metrics_line(metrics)) is not None:
    status = "incomplete"
  else:
    return Result(name, "not started", None, {})
  step = record.pop("step", None)
  if not isinstance(step, int):
    raise SweepError(f"{workdir}: the final record has no integer 'step': {step!r}")
  total = _total_steps(workdir)
  if status == "finished" and total and step < total:
    status = "stopped"
  values = {k: float("nan") if v is None else float(v) for k, v in record.items()
            if v is None or isinstance(v, (int, float))}
  return Result(name, status, step, values)


def is_finished(workdir: str | pathlib.Path) -> bool:
  """Whether a run's workdir holds a finished run (see `read_result`)."""
  return read_result(workdir).status == "finished"


def collect(root: str | pathlib.Path) -> tuple[list[Result], dict[str, dict[str, str]]]:
  """Results of a sweep's workdirs, with each run's overrides when `root/sweep.json` exists.

  Without a manifest every subdirectory holding summary.json or metrics.jsonl is a run.
  """
  root = pathlib.Path(root)
  manifest = root / MANIFEST
  if manifest.exists():
    runs = {r["name"]: {k: str(v) for k, v in r["overrides"].items()}
            for r in json.loads(manifest.read_text())["runs"]}
  else:
    runs = {d.name: {} for d in sorted(root.iterdir())
            if d.is_dir() and ((d / SUMMARY).exists() or (d / METRICS).exists())}
  if not runs:
    raise SweepError(f"{root}: no {MANIFEST} and no workdir with {SUMMARY} or {METRICS}")
  return [read_result(root / name, name) for name in runs], runs


def _format(value: object) -> str:
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.4g}"
  return "" if value is None else str(value)


def results_table(results: Sequence[Result], overrides: dict[str, dict[str, str]],
                  metrics: Sequence[str] | None = None) -> tuple[list[str], list[list[object]]]:
  """Header and rows: run, status, step, the overrides that differ between runs, then metrics.

  Override columns carry the full config key (`optimizer.lr`), so they never clash with metric
  names (`lr`). `metrics=None` takes every metric; the Markdown table passes the eval metrics plus
  loss and accuracy to stay readable.
  """
  keys = list(dict.fromkeys(k for o in overrides.values() for k in o))
  varying = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
  if metrics is None:
    metrics = sorted({k for r in results for k in r.metrics})
  header = ["run", "status", "step", *varying, *metrics]
  rows = [[r.name, r.status, r.step, *[overrides.get(r.name, {}).get(k, "") for k in varying],
           *[r.metrics.get(m) for m in metrics]] for r in results]
  return header, rows


MARKDOWN_METRICS = ("eval/accuracy", "eval/loss", "eval/margin", "loss", "accuracy")


def default_markdown_metrics(results: Sequence[Result]) -> list[str]:
  """Those of MARKDOWN_METRICS that any run has (the CSV keeps every metric)."""
  present = {k for r in results for k in r.metrics}
  return [k for k in MARKDOWN_METRICS if k in present]


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A GitHub Markdown table (floats to 4 significant digits)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_format(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def to_csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """CSV with full-precision numbers and empty cells for missing values."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(header)
  writer.writerows([["" if v is None else v for v in row] for row in rows])
  return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Command line.


def _sweep_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("sweep_file", nargs="?", help="a sweep file (launch/sweeps/*.sweep)")
  p.add_argument("--config", help="config file[:arg] (default: the sweep file's)")
  p.add_argument("--root", required=True, help="directory holding one workdir per run")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                 help="a grid axis (repeatable)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=V",
                 help="an override for every run (repeatable)")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--print", dest="mode", action="store_const", const="print",
                    help="print the training commands (default)")
  mode.add_argument("--run", dest="mode", action="store_const", const="run",
                    help="run them here one after another, skipping finished workdirs")
  mode.add_argument("--emit", choices=("slurm", "tpu"), help="print launcher commands")
  p.add_argument("--launcher_args", default="",
                 help="arguments for sbatch or tpu_vm.sh, e.g. '--type=v4-32 --zone=... --version=...'")
  p.add_argument("--python", help="Python of the commands (default: python; with --run, this one)")
  p.add_argument("--keep_going", action="store_true", help="with --run, go on after a failed run")
  p.add_argument("--skip_check", action="store_true",
                 help="do not check the overrides against the config")
  return p


def _collect_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.sweep collect",
                              description="Gathers the final metrics of a sweep's workdirs.")
  p.add_argument("--root", required=True, help="the sweep's root directory")
  p.add_argument("--out", help="output path prefix (default: ROOT/results -> .csv and .md)")
  p.add_argument("--metrics", help="comma-separated metrics for the Markdown table (default: "
                 f"{','.join(MARKDOWN_METRICS)}; the CSV always has all)")
  return p


def sweep_from_args(args: argparse.Namespace) -> tuple[str, list[Run]]:
  """The config and runs given by a sweep file and/or --grid/--set flags."""
  sweep = read_sweep_file(args.sweep_file) if args.sweep_file else Sweep()
  sweep.fixed += [parse_override(s, "--set") for s in args.set]
  sweep.grid += [parse_grid(g, "--grid") for g in args.grid]
  config = args.config or sweep.config
  if not config:
    raise SweepError("no config: pass --config or put 'config: PATH' in the sweep file")
  return config, expand(sweep)


def run_all(python: str, config: str, root: str, runs: Sequence[Run], extra: Sequence[str],
            keep_going: bool) -> int:
  """Runs the sweep here, one run after another; finished workdirs are skipped. Returns failures."""
  failed, skipped, start = [], 0, time.time()
  for i, run in enumerate(runs, 1):
    workdir = pathlib.Path(root) / run.name
    if is_finished(workdir):
      skipped += 1
      print(f"sweep: [{i}/{len(runs)}] {run.name}: finished before, skipped", flush=True)
      continue
    command = [python, "-m", "codepmp_jax.train", *train_args(config, root, run, extra)]
    print(f"sweep: [{i}/{len(runs)}] {run.name}: {shlex.join(command)}", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
      failed.append(run.name)
      print(f"sweep: {run.name} failed", file=sys.stderr, flush=True)
      if not keep_going:
        break
  print(f"sweep: {len(runs) - skipped - len(failed)} run, {skipped} skipped, {len(failed)} failed "
        f"{failed or ''} in {time.time() - start:.0f} s; results: python -m launch.sweep collect "
        f"--root={root}", flush=True)
  return len(failed)


def main_sweep(argv: Sequence[str]) -> int:
  """`python -m launch.sweep ...`: prints, runs or emits the sweep's commands."""
  extra: list[str] = []
  if "--" in argv:
    cut = list(argv).index("--")
    argv, extra = list(argv[:cut]), list(argv[cut + 1:])
  args = _sweep_parser().parse_args(argv)
  config, runs = sweep_from_args(args)
  if not args.skip_check:
    check_overrides(config, runs, extra)
  mode = "emit" if args.emit else (args.mode or "print")
  if mode == "run":
    write_manifest(pathlib.Path(args.root), config, runs)
    return 1 if run_all(args.python or sys.executable, config, args.root, runs, extra,
                        args.keep_going) else 0
  if mode == "emit":
    write_manifest(pathlib.Path(args.root), config, runs)
    launcher_args = shlex.split(args.launcher_args)
    commands = [launcher_command(args.emit, args.root, run, train_args(config, args.root, run, extra),
                                 launcher_args) for run in runs]
  else:
    commands = [[args.python or "python", "-m", "codepmp_jax.train",
                 *train_args(config, args.root, run, extra)] for run in runs]
  print(f"# {len(runs)} runs of {config} under {args.root}")
  for command in commands:
    print(shlex.join(command))
  return 0


def main_collect(argv: Sequence[str]) -> int:
  """`python -m launch.sweep collect ...`: writes the CSV and Markdown tables and prints the latter."""
  args = _collect_parser().parse_args(argv)
  results, overrides = collect(args.root)
  out = pathlib.Path(args.out) if args.out else pathlib.Path(args.root) / "results"
  out.parent.mkdir(parents=True, exist_ok=True)
  header, rows = results_table(results, overrides)
  out.with_suffix(".csv").write_text(to_csv(header, rows))
  chosen = args.metrics.split(",") if args.metrics else default_markdown_metrics(results)
  markdown = to_markdown(*results_table(results, overrides, chosen))
  out.with_suffix(".md").write_text(markdown)
  print(markdown, end="")
  counts = {s: sum(r.status == s for r in results) for s in dict.fromkeys(r.status for r in results)}
  print(f"{len(results)} runs ({', '.join(f'{n} {s}' for s, n in counts.items())}); wrote "
        f"{out.with_suffix('.csv')} and {out.with_suffix('.md')}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point: `collect` as the first argument gathers results, anything else is a sweep."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    if argv and argv[0] == "collect":
      return main_collect(argv[1:])
    return main_sweep(argv)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  if not __package__:  # `python launch/sweep.py`: configs import codepmp_jax from the repository
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  sys.exit(main())
