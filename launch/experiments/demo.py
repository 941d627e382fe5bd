"""The CodePMP method on one machine, with the paper's control (`make demo`).

  python -m launch.experiments.demo [--out=demo_out] [--data_dir=DIR]

A smaller version of `pmp_control` (the full controlled experiment: three arms, several k and
seeds), built from its stages:
0. Find the data sets first (`codepmp_jax.data.registry`: `--data_dir` / `$CODEPMP_DATA`,
   `../shared/data`, the user's cache, else a verified download): GSM8K train and test, LogiQA 2.0
   test. Without them the demo stops here with one `error:` line, before any heavy stage.
1. Code-preference pairs synthesized from the standard library (offline `mutate` strategy,
   decontaminated against the resolved test sets) and a tokenizer trained on them; the pairs are
   split in two halves.
2. A small **base LM**: the tiny model pretrained with the LM loss only on the chosen sides of the
   first half (standing in for the paper's pretrained backbone).
3. **base + PMP**: continued from the base on the second half with the paper's BT + LM loss.
4. Two reward models fine-tuned on the same GSM8K pairs, steps and seed (as released: BT only,
   cosine, weight decay 0, clipping 1.0): one from the base, one from base + PMP.
5. Both evaluated on held-out GSM8K test pairs (accuracy strict, a tie wrong, and tie-aware, a tie
   half right), LogiQA 2.0 multiple choice (tie-aware) and Best-of-4 on real model-written CHAMP
   candidates, with 95% bootstrap intervals over questions, and pmp - base as a paired bootstrap
   over the same items; beside them the Best-of-4 picks without a reward model (random, majority,
   oracle, longest, shortest, always one source model); a table and its plot.
Sequences are seen whole: training at 384 tokens (`keep_end`: the prompt is cut first, then the
response's start; pairs identical once cut are dropped, and the shares cut and dropped are
printed from the prepare manifests), scoring at a length measured from the data that cuts under
1% of each evaluation's sequences (`pmp_control.choose_score_length`); every evaluation prints the
share it cut, a WARNING at 1% or more.
The LM-only continuation arm (more LM without preferences) and intervals over seeds are in
`python -m launch.experiments.pmp_control`. Each stage skips itself when its output is complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from etils import epath

from codepmp_jax.data import registry
from launch.experiments import pmp_control, report, settings_flags, stages
from launch.experiments.settings_flags import setting

DATASETS = ("gsm8k/train", "gsm8k/test", "logiqa2/test")
ARMS = (("base", "base LM -> RM"), ("pmp", "base + PMP -> RM"))
BON_N = 4
# (row name, evaluation mode, per-item score): the table's rows and the paired comparison's scores.
ROWS = (("GSM8K pairwise accuracy, strict (held-out test)", "pairwise", "strict"),
        ("GSM8K pairwise accuracy, tie-aware", "pairwise", "tie_aware"),
        ("LogiQA 2.0 multiple-choice accuracy, tie-aware (chance 0.25)", "mc", "tie_aware"),
        (f"CHAMP Best-of-{BON_N} accuracy (real candidates)", "bon", f"rm@{BON_N}"))


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """What the demo runs; the defaults are `make demo` (12-20 minutes on a 2-core machine;
  docs/experiments.md)."""
  out: str = setting("demo_out", "Directory for every stage's output.")
  data_dir: str = setting("", "Directory holding gsm8k/ and logiqa2/ (default: $CODEPMP_DATA, "
                          "../shared/data, the cache, else a verified download).")
  code_pairs: int = setting(4000, "Code pairs synthesized from the standard library (both halves).")
  code_pairs_file: str = setting("", "Code pairs JSONL[.gz] to use instead of synthesizing them.")
  base_steps: int = setting(150, "Base LM pretraining steps (LM loss only).")
  pmp_steps: int = setting(100, "PMP steps continuing from the base LM (BT + LM).")
  rm_questions: int = setting(1280, "GSM8K train questions (the first ones) for RM fine-tuning.")
  rm_epochs: float = setting(1.0, "Passes over the RM pairs (batch 16: 1280 questions = 80 steps).")
  eval_questions: int = setting(150, "GSM8K test / LogiQA 2.0 test / CHAMP questions scored.")
  seed: int = setting(0, "Seed of both RM fine-tunes (same data order for both arms).")
  size_overrides: Mapping[str, Any] = setting(
      {}, "pmp_control.ControlSettings fields changed for a smaller run (model size, batch, ...).")


def resolve_data(data_dir: str = "") -> dict[str, epath.Path]:
  """The local file of each data set the demo reads, fetched and verified where needed.

  Raises `registry.DataNotFound` (one line: which data set, where it looked, how to provide it).
  """
  return {name: registry.path(name, data_dir=data_dir or None) for name in DATASETS}


def synthesize_code_pairs(max_pairs: int, data: Mapping[str, epath.Path], out: epath.Path
                          ) -> epath.Path:
  """Stdlib code pairs (offline `mutate`, as the built-in default), decontaminated against the
  resolved GSM8K and LogiQA 2.0 test sets, in one JSONL file (reused when complete)."""
  import gzip

  from codepmp_jax.synth.synthesize import SynthSettings, synthesize
  pairs_file = out / "code_pairs.jsonl"
  if pairs_file.exists():
    return pairs_file
  eval_dir = out / "decontamination_sets"  # the layout `synth --eval_data_dir` reads
  for name in ("gsm8k/test", "logiqa2/test"):
    link = eval_dir / registry.DATASETS[name].file
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
      os.symlink(str(data[name]), str(link))
  synthesize(SynthSettings(out=str(out / "code_pairs"), source=("stdlib",), strategy="mutate",
                           max_pairs=max_pairs, seed=0, workers=min(2, os.cpu_count() or 1),
                           eval_data_dir=str(eval_dir)))
  lines = []
  for shard in sorted((out / "code_pairs").glob("*.jsonl.gz")):
    with gzip.open(shard, "rt", encoding="utf-8") as f:
      lines.extend(line if line.endswith("\n") else line + "\n" for line in f if line.strip())
  tmp = out / "code_pairs.jsonl.part"
  tmp.write_text("".join(lines))
  tmp.rename(pairs_file)
  return pairs_file


def control_settings(settings: DemoSettings) -> pmp_control.ControlSettings:
  """The demo as a one-k, one-seed `pmp_control` design: 384-token training sequences (of
  pmp_control's 6,000 stdlib code pairs, 22% lose part of their description and 2.3% become
  identical, against 42% and 5.5% at 256: `pmp_control.ControlSettings`), LogiQA included, the
  scoring length measured from the data."""
  control = pmp_control.ControlSettings(
      out=settings.out, seq_len=384, code_pairs=settings.code_pairs,
      code_pairs_file=settings.code_pairs_file, base_steps=settings.base_steps,
      continue_steps=settings.pmp_steps, ks=(settings.rm_questions,), seeds=(settings.seed,),
      rm_epochs=settings.rm_epochs, eval_limit=settings.eval_questions, logiqa=True,
      champ_models=("GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium"), champ_settings=("0-Shot",),
      bon_ns=(1, 2, BON_N), score_batch=32, score_length=0)
  return dataclasses.replace(control, **settings.size_overrides)


def _metric(arm_report: Mapping[str, Any], mode: str, score: str) -> Mapping[str, Any]:
  """`{"accuracy", "ci95"}` of one row in an arm's report (for Best-of-N, the RM's pick)."""
  report = arm_report[mode]
  if mode == "bon":
    row = report["bon"][score.removeprefix("rm@")]
    return {"accuracy": row["rm"], "ci95": row["rm_ci95"]}
  if score == "tie_aware":
    return {"accuracy": report["accuracy_tie_aware"], "ci95": report["ci95_tie_aware"]}
  return report


def _cell(value: Mapping[str, Any]) -> str:
  """`acc [low, high]` in points."""
  low, high = value["ci95"]
  return f"{100 * value['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def paired_difference(reports: dict[str, dict], mode: str, score: str) -> dict:
  """The last arm minus the first over the same items (`stats.compare`, a paired bootstrap)."""
  from codepmp_jax.eval import stats
  first, last = (reports[arm] for arm in (list(reports)[0], list(reports)[-1]))
  return stats.compare(last[mode], first[mode], score)


def results_table(reports: dict[str, dict]) -> str:
  """A Markdown table: one row per metric, one column per arm, accuracy [95% interval] in points,
  then the last arm minus the first as a paired bootstrap over the same items."""
  names = list(reports)
  rows = []
  for name, mode, score in ROWS:
    if mode not in reports[names[0]]:
      continue
    diff = paired_difference(reports, mode, score)
    rows.append([name, *[_cell(_metric(reports[arm], mode, score)) for arm in names],
                 f"{100 * diff['difference']:+.1f} [{100 * diff['ci95'][0]:.1f}, "
                 f"{100 * diff['ci95'][1]:.1f}]"])
  short = [name.split(" ->")[0] for name in names]
  header = ["metric (points)", *names, f"{short[-1]} - {short[0]} (paired)"]
  return report.to_markdown(header, rows, align=["---", *["---:"] * (len(names) + 1)]).rstrip("\n")


def plot_results(reports: dict[str, dict], path: epath.Path) -> epath.Path:
  """Grouped bars per metric, one per arm, with the 95% bootstrap intervals as error bars."""
  rows = [(name, mode, score) for name, mode, score in ROWS if mode in next(iter(reports.values()))]
  fig, ax = report.pyplot().subplots(figsize=(8.5, 3.8), dpi=120)
  width = 0.8 / len(reports)
  for i, (arm, arm_report) in enumerate(reports.items()):
    values, errors = [], [[], []]
    for _, mode, score in rows:
      value = _metric(arm_report, mode, score)
      mean, (low, high) = value["accuracy"], value["ci95"]
      values.append(mean)
      errors[0].append(mean - low)
      errors[1].append(high - mean)
    bars = ax.bar([j + i * width for j in range(len(rows))], values, width, yerr=errors, capsize=3,
                  label=arm)
    ax.bar_label(bars, fmt="%.2f", fontsize=8, label_type="center")
  ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(rows))],
                [name.split(" (")[0].replace(" accuracy", "") for name, _, _ in rows], fontsize=7)
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.set_title("RMs from the base LM and from base + PMP (95% bootstrap intervals)")
  ax.legend(fontsize=8)
  return report.save_figure(fig, path)


def run(settings: DemoSettings) -> dict[str, dict]:
  """Every stage of the demo; returns the evaluation report of each arm (keyed by column name)."""
  start = time.time()
  print("[0/5] data sets:", flush=True)
  data = resolve_data(settings.data_dir)  # before anything heavy: a missing set stops the demo here
  for name, file in data.items():
    print(f"  {name}: {file}", flush=True)
  s = control_settings(settings)
  out = epath.Path(s.out)
  pmp_control.check_out_dir(s, out)
  champ, champ_counts = pmp_control.champ_file(s, out)
  if not champ_counts["questions"]:
    raise ValueError(f"no CHAMP question has {BON_N} candidates from {s.champ_models} "
                     f"({s.champ_settings}): {champ_counts['skipped']}")
  timings = {}

  def stage(name: str, t: float) -> None:
    timings[name] = round(time.time() - t, 1)

  t = time.time()
  print(f"[1/5] code pairs and tokenizer -> {out}", flush=True)
  if not s.code_pairs_file:
    s = dataclasses.replace(s, code_pairs_file=str(synthesize_code_pairs(s.code_pairs, data, out)))
  tokenizer, base_data, continue_data = pmp_control.code_data(s, out)
  prepared = {"code pairs, base half": pmp_control.prepared_summary(base_data),
              "code pairs, PMP half": pmp_control.prepared_summary(continue_data)}
  for name, summary in prepared.items():
    print("  " + pmp_control.prepared_line(name, summary), flush=True)
  stage("code_data_s", t)
  t = time.time()
  print(f"[2/5] base LM ({s.base_steps} LM-only steps) -> {out / 'base'}", flush=True)
  pretraining = {"base": stages.train_once(
      pmp_control.pretrain_config(s, base_data, tokenizer, "", 0.0, s.base_steps), out / "base")}
  stage("base_lm_s", t)
  t = time.time()
  print(f"[3/5] base + PMP ({s.continue_steps} BT + LM steps) -> {out / 'pmp'}", flush=True)
  pretraining["pmp"] = stages.train_once(
      pmp_control.pretrain_config(s, continue_data, tokenizer, str(out / "base"), 1.0,
                                  s.continue_steps), out / "pmp")
  stage("pmp_s", t)

  k = settings.rm_questions
  subset = stages.first_lines(data["gsm8k/train"], out / f"gsm8k_train_first{k}.jsonl", k)
  pairs = stages.prepare_once([subset], "gsm8k", tokenizer, out / "gsm8k_pairs",
                               seq_len=s.seq_len, split="train:1")
  prepared["GSM8K RM pairs"] = pmp_control.prepared_summary(pairs)
  print("  " + pmp_control.prepared_line("GSM8K RM pairs", prepared["GSM8K RM pairs"]), flush=True)
  score_length, lengths = pmp_control.choose_score_length(s, tokenizer, pmp_control.scored_texts(
      s, champ, data["gsm8k/test"], data["logiqa2/test"]))
  print(f"  scoring at {score_length} tokens: " + "; ".join(
      f"{pmp_control.EVAL_NAMES[m]} {v['sequences']:,} sequences, max {v['max']}, "
      f"{100 * v['cut_share']:.2f}% cut" for m, v in lengths.items()), flush=True)
  reports, warnings = {}, []
  for arm, column in ARMS:
    workdir = out / f"rm_{arm}"
    t = time.time()
    print(f"[4/5] RM fine-tuning from {arm} ({pmp_control.rm_steps(s, k)} steps on {k} GSM8K "
          f"questions) -> {workdir}", flush=True)
    train_summary = stages.train_once(
        pmp_control.rm_config(s, pairs, str(out / arm), k, settings.seed), workdir)
    stage(f"rm_{arm}_s", t)
    t = time.time()
    print(f"[5/5] evaluating {arm} -> {workdir / 'eval.json'}", flush=True)
    arm_report = pmp_control.evaluate(s, workdir, champ, score_length, data["gsm8k/test"],
                                      data["logiqa2/test"])
    line = pmp_control.truncation_line(arm, arm_report, s.max_truncated_share)
    print("  " + line, flush=True)
    if line.startswith("WARNING"):
      warnings.append(line)
    stage(f"eval_{arm}_s", t)
    reports[column] = {**arm_report, "train": train_summary}

  table = results_table(reports)
  facts = pmp_control.evaluation_facts(list(reports.values()))
  words = "\n\n".join([
      "Training data (prepare manifests, keep_end truncation):\n" + "\n".join(
          f"- {pmp_control.prepared_line(n, p)}" for n, p in prepared.items()),
      "Evaluations:\n" + pmp_control.facts_table(facts),
      pmp_control.baselines_line(reports[ARMS[0][1]]["bon"], BON_N) + ".",
      "Intervals: 95% bootstrap over questions; the paired column resamples the same items for both "
      "arms (one pretraining run and one RM seed per arm, so no interval covers seeds). "
      "`python -m launch.experiments.pmp_control` adds the LM-only control and seeds."])
  timings["total_s"] = round(time.time() - start, 1)
  results = {"settings": dataclasses.asdict(s), "data": {n: str(p) for n, p in data.items()},
             "champ": champ_counts, "timings": timings, "prepared": prepared,
             "score_length": score_length, "scored_lengths": lengths, "evaluation": facts,
             "warnings": warnings,
             "pretraining": {arm: summary for arm, summary in pretraining.items()},
             "arms": reports}
  (out / "results.md").write_text(table + "\n\n" + words + "\n")
  (out / "results.json").write_text(json.dumps(results, indent=1))
  plot = plot_results(reports, out / "results.png")
  print("\n" + table + "\n\n" + words + "\n")
  print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {plot} "
        f"({timings['total_s'] / 60:.1f} min this run; stage seconds {timings})")
  return reports


def main(argv: list[str]) -> None:
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  run(settings_flags.from_flags(DemoSettings, flags.FLAGS))


if __name__ == "__main__":
  from codepmp_jax import cli
  cli.run(main, lambda: settings_flags.define_flags(DemoSettings))
