"""Sweeps: a list of config overrides -> one training command per run, each in its own workdir.

  python -m launch.sweep --config=configs/tiny.py --root=runs/lr \
      --grid 'optimizer.lr=1e-4,1e-3' --grid 'loss.lm_coef=0,1' [--set train.total_steps=100]
  python -m launch.sweep --config=configs/pmp_smollm2_135m.py --sweep=loss_components \
      --root=runs/loss --run
  python -m launch.sweep --config=configs/pmp_smollm2_135m.py --sweep=schedule --root=runs/sched \
      --emit=slurm --launcher_args='--nodes=4' > submit.sh
  python -m launch.sweep collect --root=runs/lr      # -> runs/lr/results.csv and results.md

Modes: --print (default) prints the commands; --run runs them here one after another and skips
workdirs that already finished (an unfinished one resumes from its checkpoint); --emit=slurm|tpu
prints commands for launch/gpu_slurm.sbatch or launch/tpu_vm.sh. Arguments after `--` go to every
training command unchanged. Overrides are checked against the config before anything runs.

Named sweeps live in Python beside their config (as big_vision's `get_hyper`): the config file
defines `get_hyper(hyper)` returning `{sweep name: runs}`, built with this module's `sweep`,
`named`, `fixed` and `product` (passed in as `hyper`, so the config file imports nothing):

  def get_hyper(hyper):
    return {"schedule": hyper.product(hyper.fixed({"optimizer.warmup_ratio": 0.03}),
                                      hyper.sweep("optimizer.schedule", ["cosine", "wsd"]))}

`--grid KEY=V1,V2` and `--set KEY=V` add axes and shared overrides on the command line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import pathlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence

from absl import app, flags

from codepmp_jax import cli
from codepmp_jax import workdir as workdir_lib
from launch.experiments import report

MANIFEST = "sweep.json"
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
  if not sep or not _KEY.fullmatch(key):
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


# ---------------------------------------------------------------------------------------------
# Building sweeps in Python (`get_hyper(hyper)` of a config file receives this module).

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _value(value: object) -> str:
  """A Python value as the trainer flag takes it: `(1, -1, 1)` -> `(1,-1,1)`, `True` -> `True`."""
  return str(value).replace(" ", "") if isinstance(value, (tuple, list)) else str(value)


def _overrides(overrides: Mapping[str, object], where: str) -> tuple[tuple[str, str], ...]:
  for key in overrides:
    if not _KEY.fullmatch(key):
      raise SweepError(f"{where}: {key!r} is not a dotted config key")
  return tuple((k, _value(v)) for k, v in overrides.items())


def fixed(overrides: Mapping[str, object]) -> list[Run]:
  """One unnamed run with these overrides (cross it with `product` to share them)."""
  return [Run("", _overrides(overrides, "fixed"))]


def sweep(key: str, values: Sequence[object]) -> list[Run]:
  """One run per value of `key`, named `last_key_component=value` (`lr=1e-6`)."""
  strings = [_value(v) for v in values]
  if not strings or len(set(strings)) != len(strings):
    raise SweepError(f"sweep {key}: needs distinct values, got {list(values)}")
  short = key.rsplit(".", 1)[-1]
  return [Run(safe_name(f"{short}={v}"), _overrides({key: v}, f"sweep {key}")) for v in strings]


def named(runs: Mapping[str, Mapping[str, object]]) -> list[Run]:
  """One run per name, with its own overrides (`{"rm_only": {"loss.lm_coef": 0}, ...}`)."""
  for name in runs:
    if not name or _NAME_CHARS.search(name):
      raise SweepError(f"run name {name!r} may use only letters, digits and ._=+-")
  return [Run(name, _overrides(o, f"run {name}")) for name, o in runs.items()]


def product(*axes: Sequence[Run]) -> list[Run]:
  """Every combination of one run from each axis: names joined by `_`, later overrides win."""
  runs, seen = [], {}
  for combo in itertools.product(*axes):
    merged: dict[str, str] = {}
    for run in combo:
      merged.update(run.overrides)
    name = "_".join(r.name for r in combo if r.name) or "run"
    if name in seen:
      raise SweepError(f"two runs would share the workdir {name!r}: {seen[name]} and {merged}")
    seen[name] = merged
    runs.append(Run(name, tuple(merged.items())))
  return runs


def config_sweeps(config: str) -> dict[str, list[Run]]:
  """The named sweeps of a config file (`get_hyper(hyper)`); {} when it defines none."""
  path = pathlib.Path(config.partition(":")[0])
  spec = importlib.util.spec_from_file_location(path.stem, path)
  if spec is None or not path.is_file():
    raise SweepError(f"no config file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get_hyper = getattr(module, "get_hyper", None)
  return dict(get_hyper(sys.modules[__name__])) if get_hyper else {}


def safe_name(text: str) -> str:
  """`text` as a workdir name: runs of other characters than letters, digits and ._=+- become '-'."""
  return _NAME_CHARS.sub("-", text).strip("-")


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


def read_result(workdir: str | pathlib.Path, name: str | None = None) -> Result:
  """Final metrics of one training workdir: `summary.json`, else the last `metrics.jsonl` line.

  `finished` as `workdir.is_finished` says (a preempted run's summary is `stopped`); a run with
  metrics but no summary is `incomplete`.
  """
  name = name or pathlib.PurePath(workdir).name
  try:
    record = workdir_lib.read_summary(workdir)
    status = "finished" if record is not None else "incomplete"
    if record is None:
      record = workdir_lib.last_metrics(workdir)
  except workdir_lib.WorkdirError as e:
    raise SweepError(str(e)) from e
  if record is None:
    return Result(name, "not started", None, {})
  step = record.pop("step", None)
  if not isinstance(step, int):
    raise SweepError(f"{workdir}: the final record has no integer 'step': {step!r}")
  if status == "finished" and not workdir_lib.is_finished(workdir):
    status = "stopped"
  values = {k: float("nan") if v is None else float(v) for k, v in record.items()
            if not isinstance(v, bool) and (v is None or isinstance(v, (int, float)))}
  return Result(name, status, step, values)


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
            if d.is_dir() and (workdir_lib.path(d, workdir_lib.SUMMARY).exists()
                               or workdir_lib.path(d, workdir_lib.METRICS).exists())}
  if not runs:
    raise SweepError(f"{root}: no {MANIFEST} and no workdir with {workdir_lib.SUMMARY} or "
                     f"{workdir_lib.METRICS}")
  return [read_result(root / name, name) for name in runs], runs


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


# ---------------------------------------------------------------------------------------------
# Command line.


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The flags of a sweep and of `collect` (which share --root)."""
  def string(name: str, help: str, default: str | None = None) -> None:
    flags.DEFINE_string(name, default, help, flag_values=values)

  def boolean(name: str, help: str) -> None:
    flags.DEFINE_bool(name, False, help, flag_values=values)

  string("config", "Config file[:arg] (required but with collect).")
  string("sweep", "A named sweep of the config's get_hyper (see --list).")
  boolean("list", "List the config's named sweeps and exit.")
  string("root", "Directory holding one workdir per run (required but with --list).")
  flags.DEFINE_multi_string("grid", [], "KEY=V1,V2: a grid axis (repeatable).", flag_values=values)
  flags.DEFINE_multi_string("set", [], "KEY=V: an override for every run (repeatable).",
                            flag_values=values)
  boolean("print", "Print the training commands (the default mode).")
  boolean("run", "Run them here one after another, skipping finished workdirs.")
  flags.DEFINE_enum("emit", None, ("slurm", "tpu"), "Print launcher commands.", flag_values=values)
  string("launcher_args", "Arguments for sbatch or tpu_vm.sh, e.g. '--type=v4-32 --zone=... "
         "--version=...'.", default="")
  string("python", "Python of the commands (default: python; with --run, this one).")
  boolean("keep_going", "With --run, go on after a failed run.")
  boolean("skip_check", "Do not check the overrides against the config.")
  string("out", "collect: output path prefix (default: ROOT/results -> .csv and .md).")
  string("metrics", "collect: comma-separated metrics for the Markdown table (default: "
         f"{','.join(MARKDOWN_METRICS)}; the CSV always has all).")


def sweep_from_flags(values: flags.FlagValues) -> tuple[str, list[Run]]:
  """The config and runs given by --sweep (the config's `get_hyper`) and --grid/--set flags."""
  axes: list[list[Run]] = []
  if values.sweep:
    sweeps = config_sweeps(values.config)
    if values.sweep not in sweeps:
      raise SweepError(f"{values.config} has no sweep {values.sweep!r}; it has {sorted(sweeps)}")
    axes.append(sweeps[values.sweep])
  if values.set:
    axes.append(fixed(dict(parse_override(s, "--set") for s in values.set)))
  for text in values.grid:
    key, values_text = parse_grid(text, "--grid")
    axes.append(sweep(key, values_text))
  if not axes:
    raise SweepError("nothing to sweep: pass --sweep=NAME, --grid or --set")
  return values.config, product(*axes)


def run_all(python: str, config: str, root: str, runs: Sequence[Run], extra: Sequence[str],
            keep_going: bool) -> int:
  """Runs the sweep here, one run after another; finished workdirs are skipped. Returns failures."""
  failed, skipped, start = [], 0, time.time()
  for i, run in enumerate(runs, 1):
    workdir = pathlib.Path(root) / run.name
    if workdir_lib.is_finished(workdir):
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


def main_sweep(extra: Sequence[str], values: flags.FlagValues) -> int:
  """`python -m launch.sweep ...`: prints, runs or emits the sweep's commands (`extra`: after `--`)."""
  if values.config is None:
    raise SweepError("--config is required")
  if values.list:
    for name, runs in config_sweeps(values.config).items():
      print(f"{name}: {', '.join(r.name for r in runs)}")
    return 0
  if not values.root:
    raise SweepError("--root is required: the directory holding one workdir per run")
  modes = [m for m, on in (("print", values.print), ("run", values.run),
                           ("emit", values.emit is not None)) if on]
  if len(modes) > 1:
    raise SweepError(f"--print, --run and --emit exclude each other; got {modes}")
  config, runs = sweep_from_flags(values)
  if not values.skip_check:
    check_overrides(config, runs, extra)
  mode = modes[0] if modes else "print"
  if mode == "run":
    write_manifest(pathlib.Path(values.root), config, runs)
    return 1 if run_all(values.python or sys.executable, config, values.root, runs, extra,
                        values.keep_going) else 0
  if mode == "emit":
    write_manifest(pathlib.Path(values.root), config, runs)
    launcher_args = shlex.split(values.launcher_args)
    commands = [launcher_command(values.emit, values.root, run,
                                 train_args(config, values.root, run, extra), launcher_args)
                for run in runs]
  else:
    commands = [[values.python or "python", "-m", "codepmp_jax.train",
                 *train_args(config, values.root, run, extra)] for run in runs]
  print(f"# {len(runs)} runs of {config} under {values.root}")
  for command in commands:
    print(shlex.join(command))
  return 0


def main_collect(values: flags.FlagValues) -> int:
  """`python -m launch.sweep collect ...`: writes the CSV and Markdown tables and prints the latter."""
  if not values.root:
    raise SweepError("collect: --root is required: the sweep's root directory")
  results, overrides = collect(values.root)
  out = pathlib.Path(values.out) if values.out else pathlib.Path(values.root) / "results"
  out.parent.mkdir(parents=True, exist_ok=True)
  header, rows = results_table(results, overrides)
  out.with_suffix(".csv").write_text(report.to_csv(header, rows))
  chosen = values.metrics.split(",") if values.metrics else default_markdown_metrics(results)
  markdown = report.to_markdown(*results_table(results, overrides, chosen))
  out.with_suffix(".md").write_text(markdown)
  print(markdown, end="")
  counts = {s: sum(r.status == s for r in results) for s in dict.fromkeys(r.status for r in results)}
  print(f"{len(results)} runs ({', '.join(f'{n} {s}' for s, n in counts.items())}); wrote "
        f"{out.with_suffix('.csv')} and {out.with_suffix('.md')}")
  return 0


def main(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> int:
  """`collect` as the first argument gathers results; else a sweep, with the arguments after `--`
  (absl leaves them in `argv`) going to every training command."""
  if argv[1:2] == ["collect"]:
    if argv[2:]:
      raise app.UsageError(f"collect: unexpected arguments {list(argv[2:])}")
    return main_collect(values)
  if argv[1:] and not argv[1].startswith("-"):
    raise app.UsageError(f"unexpected argument {argv[1]!r}: the only command is collect; training "
                         "arguments go after `--`")
  return main_sweep(argv[1:], values)


if __name__ == "__main__":
  cli.run(main, define_flags)
