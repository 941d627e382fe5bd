"""The fault matrix (#35): kill -9 at seeded points of every stage, rerun, compare with a clean run.

Each stage's real CLI runs in a subprocess on tiny inputs: `synth --strategy=mutate` (stdlib,
decontaminated against the registry's GSM8K and LogiQA 2.0 test sets), `data.prepare` (four shards
per split), `train` (a tiny model on synthetic pairs, a checkpoint every 5 of 30 steps), `score` and
`eval pairwise` (on the trained workdir). A fault is SIGKILL to the command's whole process group
(the command and any workers it started, as when a machine is lost or the OOM killer strikes), sent
either after a delay drawn by `random.Random(f"{stage}/{seed}")` within the uninterrupted run's
measured wall time (seeds 0 and 1), or when a progress file appears plus a seeded jitter (seed 2: a
published shard, orbax's temporary directory of a checkpoint being written, the output file); synth,
whose scan of the whole standard library fills most of each run, takes seeds 0 and 2 only. (A run
that ends before its kill, on this shared machine, starts again with a draw within its own time.)
The same command is then run to completion, and its outputs must equal the uninterrupted run's:
- synth: every pair shard and stats file byte-equal, the manifest equal but its `elapsed_s`;
- prepare: every file (shards, sizes, stats, tokenizer, TFDS metadata) byte-equal, the manifest
  equal but its `throughput` timings, and no staging or spill directory left;
- train: the final parameters bit-equal, every step's logged metrics equal but the timings, and
  the step restored is one whose checkpoint was complete when the kill landed (never a step whose
  orbax temporary directory was still being written);
- score, eval: the output file byte-equal.
Marked `rehearse`: `make rehearse` runs it (minutes), `make test` leaves it out. Each test prints
one line on stderr (shown with `-s`): where the kill landed and what the rerun matched; each stage
prints its counts (faults injected, reruns equal) when the module ends.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable

import pytest

from codepmp_jax.data import registry

pytestmark = pytest.mark.rehearse

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)  # 0, 1: a seeded delay within the measured run; 2: a progress file appears
PROGRESS_SEED = 2
SYNTH_SEEDS = (0, PROGRESS_SEED)  # each synth run is mostly its ~20 s corpus scan
RUN_TIMEOUT_S = 300  # any one command, to completion
POLL_S = 0.002  # how often a killer looks at the clock and the output directory
TRAIN_STEPS, SAVE_EVERY = 30, 5
# metrics.jsonl fields that measure time, not the computation: left out of the comparison.
TIMING_METRICS = ("elapsed_s", "tokens_per_s", "mfu")
# Counts per stage, printed when the module ends (the numbers docs/reliability.md quotes).
TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def say(line: str) -> None:
  """One line on stderr: pytest shows it with `-s` (also from an xdist worker)."""
  print(line, file=sys.stderr, flush=True)


@pytest.fixture(scope="module", autouse=True)
def stage_summary():
  """After the last test, one line of counts per stage."""
  yield
  for stage, counts in TALLY.items():
    extra = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())
                      if k not in ("faults injected", "reruns equal", "finished before the kill"))
    say(f"rehearse {stage}: {counts['faults injected']} faults injected, "
        f"{counts['reruns equal']} reruns equal to the uninterrupted run"
        + (f", {counts['finished before the kill']} finished before the kill" if
           counts["finished before the kill"] else "") + (f"; {extra}" if extra else ""))


# --- Running and killing commands.


def _command(module: str, *args: str) -> list[str]:
  return [sys.executable, "-m", module, *args]


def _start(cmd: list[str], log: pathlib.Path) -> subprocess.Popen:
  """`cmd` in the repository root, in a session of its own (so its workers die with it), its
  output to `log`."""
  with log.open("ab") as out:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _end(proc: subprocess.Popen) -> None:
  """SIGKILL to the process group of `proc`, then reap it."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait(timeout=60)


def run_to_end(cmd: list[str], log: pathlib.Path) -> float:
  """Runs `cmd` to completion (exit 0 required); returns its wall time in seconds."""
  start = time.monotonic()
  proc = _start(cmd, log)
  try:
    code = proc.wait(timeout=RUN_TIMEOUT_S)
  finally:
    if proc.poll() is None:
      _end(proc)
  assert code == 0, f"{' '.join(cmd[2:4])} exited {code}:\n{log.read_text()[-4000:]}"
  return time.monotonic() - start


@dataclasses.dataclass(frozen=True)
class Kill:
  """Where one fault landed: seconds after the start, why then, whether the command was still
  running (a fault injected) or had already finished, and on which try."""
  at_s: float
  why: str
  landed: bool
  tries: int = 1

  def __str__(self) -> str:
    again = f", try {self.tries}" if self.tries > 1 else ""
    return (f"SIGKILL at {self.at_s:.2f} s ({self.why}{again})" if self.landed
            else f"no kill: finished at {self.at_s:.2f} s, before the {self.why} ({self.tries} tries)")


def _kill_once(cmd: list[str], log: pathlib.Path, rng: random.Random, duration_s: float,
               trigger: Callable[[], str | None] | None, jitter_s: tuple[float, float]) -> Kill:
  """One start of `cmd`, SIGKILLed at the point `kill_during` describes (unless it ends first)."""
  deadline = rng.uniform(0.1, 0.9) * duration_s if trigger is None else None
  why = f"{deadline:.2f} s drawn of {duration_s:.1f} s" if trigger is None else "progress file"
  fire_at = None
  start = time.monotonic()
  proc = _start(cmd, log)
  try:
    while True:
      now = time.monotonic() - start
      if proc.poll() is not None:
        assert proc.returncode == 0, f"exited {proc.returncode} before the kill:\n{log.read_text()[-4000:]}"
        return Kill(now, "kill" if trigger is None else "trigger", landed=False)
      assert now < RUN_TIMEOUT_S, f"{' '.join(cmd[2:4])}: no kill point within {RUN_TIMEOUT_S} s"
      if trigger is None and now >= deadline:
        break
      if trigger is not None and fire_at is None and (seen := trigger()):
        delay = rng.uniform(*jitter_s)
        why, fire_at = f"{seen} + {delay:.3f} s", now + delay
      if fire_at is not None and now >= fire_at:
        break
      time.sleep(POLL_S)
    _end(proc)
    return Kill(now, why, landed=True)
  finally:
    if proc.poll() is None:
      _end(proc)


def kill_during(cmd: list[str], log: pathlib.Path, rng: random.Random, duration_s: float,
                clean: Callable[[], None], trigger: Callable[[], str | None] | None = None,
                jitter_s: tuple[float, float] = (0.0, 0.0), tries: int = 3) -> Kill:
  """Starts `cmd` and SIGKILLs its process group at a seeded point: `rng.uniform` over 10-90% of
  `duration_s` (the uninterrupted run's wall time), or, with `trigger` (a check returning what it
  saw, else None), `rng.uniform(*jitter_s)` seconds after the trigger first fires.

  The machine is shared, so a run can be quicker than the one measured and end before its kill:
  then its outputs are removed (`clean`) and it starts again, with the next draw within the time
  that run took, up to `tries` times."""
  for attempt in range(1, tries + 1):
    kill = dataclasses.replace(_kill_once(cmd, log, rng, duration_s, trigger, jitter_s), tries=attempt)
    if kill.landed or attempt == tries:
      return kill
    duration_s = min(duration_s, kill.at_s)
    clean()
  raise AssertionError("unreachable")


def _files(root: pathlib.Path) -> dict[str, bytes]:
  """Every file below `root` by relative path, with its bytes."""
  return {p.relative_to(root).as_posix(): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_files(got: pathlib.Path, want: pathlib.Path, skip: tuple[str, ...] = ()) -> None:
  """The same relative file names below both roots, each byte-equal (but those in `skip`)."""
  a, b = _files(got), _files(want)
  assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
  different = [name for name in a if name not in skip and a[name] != b[name]]
  assert not different, different


def _count(stage: str, kill: Kill) -> None:
  TALLY[stage]["faults injected" if kill.landed else "finished before the kill"] += 1
  TALLY[stage]["runs that ended before their kill, started again"] += kill.tries - 1


# --- Inputs shared by the stages.


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, pathlib.Path]:
  """The decontamination sets in synth's `--eval_data_dir` layout (found through the data
  registry), a 400-piece sentencepiece tokenizer and preference pairs cut from stdlib code
  (3,000 for prepare; the first 300 for score and eval)."""
  from codepmp_jax.data.tokenizer import train_sentencepiece
  root = tmp_path_factory.mktemp("fault_inputs")
  eval_dir = root / "decontamination_sets"
  for name in ("gsm8k/test", "logiqa2/test"):
    link = eval_dir / registry.DATASETS[name].file
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(pathlib.Path(str(registry.path(name, download_missing=False))).resolve())
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  train_sentencepiece(sorted((stdlib / "json").glob("*.py")), vocab_size=400, out_prefix=root / "sp")
  rows = []
  for path in sorted(stdlib.glob("[a-m]*.py")):
    text = path.read_text(encoding="utf-8", errors="replace")
    for i in range(0, len(text) - 200, 400):
      good = text[i:i + 200]
      rows.append(json.dumps({"id": f"{path.stem}-{i}", "prompt": f"Continue {path.name} at {i}.",
                              "chosen": good, "rejected": good[::-1]}))
      if len(rows) == 3000:
        break
    if len(rows) == 3000:
      break
  pairs = root / "pairs.jsonl"
  pairs.write_text("\n".join(rows) + "\n")
  few = root / "pairs300.jsonl"
  few.write_text("\n".join(rows[:300]) + "\n")
  # score repeats each record in its output: long responses (cut to 64 tokens when scored) make
  # a 2.5 MB output whose writing a kill can land in.
  long = root / "long_pairs300.jsonl"
  with long.open("w") as f:
    for row in map(json.loads, rows[:300]):
      f.write(json.dumps({**row, "chosen": row["chosen"] * 20, "rejected": row["rejected"] * 20}) + "\n")
  return {"eval_dir": eval_dir, "tokenizer": root / "sp.model", "pairs": pairs,
          "few_pairs": few, "long_pairs": long}


def _rng(stage: str, seed: int) -> random.Random:
  return random.Random(f"{stage}/{seed}")


# --- synth.


def _synth(out: pathlib.Path, inputs) -> list[str]:
  """demo.py's synthesis (offline mutate, decontaminated against the resolved test sets), smaller:
  1,000 pairs in shards of 8 documents, so shards are published over a few seconds."""
  return _command("codepmp_jax.synth", "--source=stdlib", "--strategy=mutate", "--max_pairs=1000",
                  "--docs_per_shard=8", "--seed=0", "--workers=2",
                  f"--eval_data_dir={inputs['eval_dir']}", f"--out={out}")


@pytest.fixture(scope="module")
def synth_baseline(tmp_path_factory, inputs) -> tuple[pathlib.Path, float]:
  """An uninterrupted synthesis and its wall time."""
  out = tmp_path_factory.mktemp("synth_clean") / "pairs"
  return out, run_to_end(_synth(out, inputs), out.parent / "log.txt")


def _manifest_without(out: pathlib.Path, timing_key: str) -> dict:
  """`out`'s manifest.json less the key that holds its run's timings (which differ between runs
  that wrote the same output)."""
  manifest = json.loads((out / "manifest.json").read_text())
  manifest.pop(timing_key)
  return manifest


@pytest.mark.parametrize("seed", SYNTH_SEEDS)
def test_synth_killed_then_rerun_equals_uninterrupted(seed, synth_baseline, inputs, tmp_path):
  want, duration = synth_baseline
  out, log = tmp_path / "pairs", tmp_path / "log.txt"
  cmd = _synth(out, inputs)

  def shard_published():
    return "a pair shard published" if any(out.glob("pairs-*.jsonl.gz")) else None
  kill = kill_during(cmd, log, _rng("synth", seed), duration, lambda: shutil.rmtree(out),
                     shard_published if seed == PROGRESS_SEED else None, jitter_s=(0.0, 1.0))
  _count("synth", kill)
  published = len(list(out.glob("pairs-*.jsonl.gz")))
  partial = len(list(out.glob(".*.tmp-*")))
  shards = len(list(want.glob("pairs-*.jsonl.gz")))
  TALLY["synth"]["kills with shards partly published"] += bool(kill.landed and 0 < published < shards)
  run_to_end(cmd, log)

  assert_same_files(out, want, skip=("manifest.json",))
  assert _manifest_without(out, "elapsed_s") == _manifest_without(want, "elapsed_s")
  assert json.loads((out / "manifest.json").read_text())["complete"] is True
  pairs = sum(1 for p in out.glob("pairs-*.jsonl.gz") for _ in gzip.open(p, "rt"))
  assert pairs == 1000
  TALLY["synth"]["reruns equal"] += 1
  say(f"synth seed={seed}: {kill}; {published} shards published, {partial} temporary files "
      f"then; rerun: {pairs} pairs in {len(list(out.glob('pairs-*.jsonl.gz')))} shards and the "
      "manifest equal")


# --- prepare.


def _prepare(out: pathlib.Path, inputs) -> list[str]:
  return _command("codepmp_jax.data.prepare", f"--input={inputs['pairs']}", "--format=pairs",
                  f"--tokenizer={inputs['tokenizer']}", "--seq_len=128", "--num_shards=4",
                  "--split=train:0.8,eval:0.2", "--seed=0", f"--out={out}")


@pytest.fixture(scope="module")
def prepare_baseline(tmp_path_factory, inputs) -> tuple[pathlib.Path, float]:
  out = tmp_path_factory.mktemp("prepare_clean") / "prepared"
  return out, run_to_end(_prepare(out, inputs), out.parent / "log.txt")


@pytest.mark.parametrize("seed", SEEDS)
def test_prepare_killed_then_rerun_equals_uninterrupted(seed, prepare_baseline, inputs, tmp_path):
  want, duration = prepare_baseline
  out, log = tmp_path / "prepared", tmp_path / "log.txt"
  cmd = _prepare(out, inputs)

  def shard_published():
    return "a shard's stats published" if any((out / "stats").glob("*.json")) else None
  kill = kill_during(cmd, log, _rng("prepare", seed), duration, lambda: shutil.rmtree(out),
                     shard_published if seed == PROGRESS_SEED else None, jitter_s=(0.0, 0.3))
  _count("prepare", kill)
  published = len(list((out / "stats").glob("*.json")))
  TALLY["prepare"]["kills with shards partly published"] += bool(kill.landed and 0 < published < 8)
  run_to_end(cmd, log)

  assert_same_files(out, want, skip=("manifest.json",))
  # throughput: seconds and the pairs this run encoded (fewer after a resume)
  assert _manifest_without(out, "throughput") == _manifest_without(want, "throughput")
  assert not [p.name for p in out.iterdir() if p.name.startswith((".staging", ".spill"))]
  TALLY["prepare"]["reruns equal"] += 1
  say(f"prepare seed={seed}: {kill}; {published} of 8 shards published then; rerun: every "
      f"shard ({len(_files(out))} files) byte-equal, the manifest equal")


# --- train.


def _train(workdir: pathlib.Path, inputs) -> list[str]:
  """The tiny config on synthetic pairs with a tokenizer (so score and eval can read the
  workdir), a checkpoint every 5 of 30 steps (orbax keeps the newest 3)."""
  return _command(
      "codepmp_jax.train", f"--workdir={workdir}", "--config=configs/tiny.py",
      "--config.data.builtin.name=", "--config.data.source=synthetic",
      f"--config.tokenizer={inputs['tokenizer']}", "--config.data.vocab_size=400",
      "--config.data.synthetic_pairs=512", "--config.model.hidden_size=32",
      "--config.model.intermediate_size=64", "--config.model.num_layers=2",
      "--config.train.global_batch=8", "--config.train.seq_len=32",
      f"--config.train.total_steps={TRAIN_STEPS}", "--config.train.log_every=1",
      "--config.train.eval_every=0", f"--config.checkpoint.save_every={SAVE_EVERY}",
      "--config.mesh_shape=(-1,1,1)", "--verbose")  # --verbose: the log says which step it restored


@pytest.fixture(scope="module")
def train_baseline(tmp_path_factory, inputs) -> tuple[pathlib.Path, float]:
  workdir = tmp_path_factory.mktemp("train_clean") / "run"
  return workdir, run_to_end(_train(workdir, inputs), workdir.parent / "log.txt")


def _steps(workdir: pathlib.Path) -> tuple[list[int], list[int]]:
  """(steps whose checkpoint is complete, steps whose orbax temporary directory is there)."""
  names = [p.name for p in (workdir / "checkpoints").iterdir()] if (workdir / "checkpoints").is_dir() else []
  done = sorted(int(n) for n in names if n.isdigit())
  writing = sorted(int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n)
  return done, writing


def _metrics(workdir: pathlib.Path) -> dict[int, dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: {k: v for k, v in row.items() if k not in TIMING_METRICS} for row in rows}


def _params(workdir: pathlib.Path) -> dict[str, tuple]:
  """Each parameter's (dtype, shape, bytes) at the workdir's newest step."""
  import jax
  import numpy as np

  from codepmp_jax import checkpoint
  params, _ = checkpoint.load_model(workdir)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return {jax.tree_util.keystr(path): (np.asarray(x).dtype, np.asarray(x).shape,
                                       np.asarray(x).tobytes()) for path, x in leaves}


@pytest.mark.parametrize("seed", SEEDS)
def test_train_killed_then_rerun_equals_uninterrupted(seed, train_baseline, inputs, tmp_path):
  want, duration = train_baseline
  workdir, log = tmp_path / "run", tmp_path / "log.txt"
  cmd = _train(workdir, inputs)
  rng = _rng("train", seed)
  target = rng.choice(range(2 * SAVE_EVERY, TRAIN_STEPS - SAVE_EVERY + 1, SAVE_EVERY))

  def checkpoint_being_written():
    try:
      names = os.listdir(workdir / "checkpoints")
    except FileNotFoundError:
      return None
    return (f"orbax writing step {target}"
            if any(n.startswith(f"{target}.orbax-checkpoint-tmp") for n in names) else None)
  kill = kill_during(cmd, log, rng, duration, lambda: shutil.rmtree(workdir),
                     checkpoint_being_written if seed == PROGRESS_SEED else None, jitter_s=(0.0, 0.02))
  _count("train", kill)
  complete, writing = _steps(workdir)
  TALLY["train"]["kills during a checkpoint write"] += bool(kill.landed and writing)
  log.write_text("")  # the rerun's log alone
  run_to_end(cmd, log)

  restored = re.findall(r"restored step (\d+) of", log.read_text())
  if complete:  # the newest complete checkpoint, never one that was being written
    assert restored == [str(complete[-1])], (restored, complete, writing)
    assert int(restored[0]) not in writing
    TALLY["train"]["reruns restored from a complete checkpoint"] += 1
  else:
    assert restored == [], (restored, writing)
    TALLY["train"]["reruns started fresh (no complete checkpoint)"] += 1
  assert _steps(workdir)[0][-1] == TRAIN_STEPS
  got_params, want_params = _params(workdir), _params(want)
  assert got_params.keys() == want_params.keys()
  unequal = [name for name in want_params if got_params[name] != want_params[name]]
  assert not unequal, f"parameters not bit-equal after the resume: {unequal}"
  got, expected = _metrics(workdir), _metrics(want)
  assert sorted(got) == list(range(1, TRAIN_STEPS + 1))
  assert got == expected, [s for s in expected if got.get(s) != expected[s]]
  leftover = _steps(workdir)[1]
  TALLY["train"]["reruns equal"] += 1
  say(f"train seed={seed}: {kill}; complete checkpoints {complete}, being written {writing}; "
      f"rerun restored step {restored[0] if restored else 'none (fresh)'}: {len(want_params)} "
      f"parameter arrays bit-equal, {TRAIN_STEPS} steps' metrics equal"
      + (f"; orbax temporary directories left: {leftover}" if leftover else ""))


# --- score and eval (on the uninterrupted training run's workdir).


def _score(out: pathlib.Path, checkpoint: pathlib.Path, inputs) -> list[str]:
  return _command("codepmp_jax.score", f"--checkpoint={checkpoint}",
                  f"--input={inputs['long_pairs']}", f"--output={out}", "--template=none",
                  "--max_length=64", "--batch_size=16")


def _eval(out: pathlib.Path, checkpoint: pathlib.Path, inputs) -> list[str]:
  return _command("codepmp_jax.eval", "pairwise", f"--checkpoint={checkpoint}",
                  f"--data={inputs['few_pairs']}", "--format=pairs", "--max_length=64",
                  "--batch_size=16", f"--out={out}")


COMMANDS = {"score": (_score, "scores.jsonl"), "eval": (_eval, "report.json")}


@pytest.fixture(scope="module")
def output_baselines(tmp_path_factory, inputs, train_baseline) -> dict[str, tuple[pathlib.Path, float]]:
  """score's and eval's outputs, uninterrupted, and their wall times."""
  runs = {}
  for stage, (command, name) in COMMANDS.items():
    out = tmp_path_factory.mktemp(f"{stage}_clean") / name
    runs[stage] = out, run_to_end(command(out, train_baseline[0], inputs), out.parent / "log.txt")
  return runs


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stage", sorted(COMMANDS))
def test_output_killed_then_rerun_equals_uninterrupted(stage, seed, output_baselines, train_baseline,
                                                       inputs, tmp_path):
  want, duration = output_baselines[stage]
  command, name = COMMANDS[stage]
  out, log = tmp_path / name, tmp_path / "log.txt"
  cmd = command(out, train_baseline[0], inputs)

  def output_appears():
    return "the output file appears" if out.exists() else None
  kill = kill_during(cmd, log, _rng(stage, seed), duration, out.unlink,
                     output_appears if seed == PROGRESS_SEED else None, jitter_s=(0.0, 0.002))
  _count(stage, kill)
  left = ("no output" if not out.exists() else
          "a whole output" if out.read_bytes() == want.read_bytes() else
          f"a partial output ({out.stat().st_size} of {want.stat().st_size} bytes)")
  TALLY[stage]["kills that left a partial output"] += left.startswith("a partial")
  assert not (stage == "score" and left.startswith("a partial")), left  # written, then renamed
  run_to_end(cmd, log)

  assert out.read_bytes() == want.read_bytes()
  TALLY[stage]["reruns equal"] += 1
  say(f"{stage} seed={seed}: {kill}; {left} then; rerun: {name} byte-equal")
