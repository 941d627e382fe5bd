"""Does preference pretraining help, or only the extra language modelling? The paper's control.

  python -m launch.experiments.pmp_control [--out=runs/pmp_control]   # the full run (CPU)
  python -m launch.experiments.pmp_control --smoke --out=/tmp/pmp_smoke  # seconds, checks the wiring

1. A small base LM: the tiny model trained on code with the LM loss only (`rm_coef=0`), on the
   chosen sides of one half of the synthesized code pairs (standing in for a pretrained backbone).
2. From it, with the other half of the code pairs, the same steps and the same seed:
   `lm`  = LM-only continued pretraining on the chosen sides (rm_coef 0, lm_coef 1),
   `pmp` = PMP, the paper's BT + LM (rm_coef 1, lm_coef 1).
   `base` gets no continuation. `lm` against `pmp` separates "more LM" from "preference
   pretraining" (the paper's loss ablation); `base` against `pmp` is the paper's comparison.
3. RM fine-tuning of each of the three on GSM8K pairs from k training questions (the
   sample-efficiency curve), one seeded random subset per seed shared by the three arms, as
   released (BT only, cosine schedule, weight decay 0, clipping 1.0, 3% warmup).
4. Evaluation of every RM on whole test sets: GSM8K pairwise (every test question), LogiQA 2.0
   multiple choice (every test question) and Best-of-N on real model-written CHAMP candidates
   (`eval/candidates.py`).
Per arm and k: the mean over seeds and a 95% Student-t interval over seeds (seeds are the
replicates; each run's own test-set bootstrap is in its eval.json). Per k, the paired differences
pmp - base, pmp - lm and lm - base (same seed = same subset and data order) with their t-interval.
Writes results.json, results.md and results.png under --out, and prints the table and a
plain-language conclusion. Each stage skips itself when its output is complete.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import random
import time
from typing import Sequence

import ml_collections
import numpy as np
from absl import flags
from etils import epath

from codepmp_jax.data import builtin, registry

ARMS = ("base", "lm", "pmp")
COMPARISONS = (("pmp", "base"), ("pmp", "lm"), ("lm", "base"))


@dataclasses.dataclass(frozen=True)
class ControlSettings:
  """Everything that sizes the experiment; the defaults are the full CPU run (see README).

  Sized for 30 minutes on 2 idle cores from measurements on this (loaded) machine: an RM step of
  the tiny model at 16 x 256 took 4.5 s loaded (~1.1 s idle, README), scoring 45-50 ms per
  sequence loaded at 256 tokens. The 18 evaluations of ~10k sequences each (LogiQA's 6,288 options
  are most of it) dominate, hence 128 tokens and two k.
  """
  out: str = "runs/pmp_control"
  # The model (the tiny family) and its sequences.
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  seq_len: int = 128
  batch: int = 16
  # Code pairs, synthesized from the standard library (or read from `code_pairs_file`, a pairs
  # JSONL[.gz]): half for the base LM, half for the continuations lm / pmp.
  code_pairs: int = 6000
  code_pairs_file: str = ""
  vocab_size: int = 4000
  base_steps: int = 100
  continue_steps: int = 60
  pretrain_lr: float = 1e-3
  # RM fine-tuning: GSM8K training questions k, seeds per point, epochs over the k pairs.
  ks: tuple[int, ...] = (64, 512)
  seeds: tuple[int, ...] = (0, 1, 2)
  rm_epochs: float = 1.0
  rm_min_steps: int = 10
  rm_lr: float = 1e-3
  rm_warmup_ratio: float = 0.03
  # Evaluation: None scores the whole test sets.
  eval_limit: int | None = None
  champ_models: tuple[str, ...] = ("GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium")
  champ_settings: tuple[str, ...] = ("0-Shot", "5-Shot")
  bon_ns: tuple[int, ...] = (1, 2, 4, 8)
  score_batch: int = 64
  score_length: int = 128


def smoke_settings(out: str, code_pairs_file: str = "") -> ControlSettings:
  """The same design at a size that runs end to end in well under a minute (tests, wiring).

  Synthesizing even 200 stdlib pairs scans the whole standard library (~1 min on a loaded CPU),
  so a test passes a small `code_pairs_file` of its own.
  """
  return ControlSettings(
      out=out, code_pairs_file=code_pairs_file, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
      seq_len=64, batch=8, code_pairs=200, vocab_size=400, base_steps=2, continue_steps=2,
      ks=(8,), seeds=(0, 1), rm_epochs=1.0, rm_min_steps=2, eval_limit=12,
      champ_models=("GPT-4", "PaLM 2 Medium"), champ_settings=("0-Shot",), bon_ns=(1, 2),
      score_batch=16, score_length=64)


# --- Stages (each skipped when its output is complete).


def _train_once(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  """Trains in `workdir` unless a finished run is there; returns its summary."""
  from codepmp_jax import train
  summary = workdir / "summary.json"
  if not (summary.exists() and json.loads(summary.read_text()).get("finished")):
    train.train(config, str(workdir))
  return json.loads(summary.read_text())


def _prepare_once(inputs: Sequence[epath.Path], fmt: str, tokenizer: epath.Path,
                  out: epath.Path, seq_len: int, split: str) -> epath.Path:
  from codepmp_jax.data import prepare
  if not (out / prepare.MANIFEST).exists():
    prepare.prepare(prepare.PrepareSettings(
        inputs=tuple(str(p) for p in inputs), format=fmt, tokenizer=str(tokenizer),
        seq_len=seq_len, out=str(out), split=split))
  return out


def _base_config(s: ControlSettings) -> ml_collections.ConfigDict:
  from codepmp_jax.config import load_config, model_fields
  config = load_config("tiny")
  config.model = model_fields("tiny", vocab_size=0, hidden_size=s.hidden_size,
                              intermediate_size=s.intermediate_size, num_layers=s.num_layers,
                              num_heads=s.num_heads, num_kv_heads=s.num_kv_heads)
  config.data.builtin.update(max_pairs=s.code_pairs, vocab_size=s.vocab_size, seq_len=s.seq_len)
  config.train.update(global_batch=s.batch, seq_len=s.seq_len, eval_batch=s.batch)
  return config


def _pair_lines(path: epath.Path) -> list[str]:
  """The non-empty lines of a pairs JSONL file, gzipped or not."""
  if path.suffix == ".gz":
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
      return [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
  return [line + "\n" for line in path.read_text().splitlines() if line.strip()]


def code_data(s: ControlSettings, out: epath.Path) -> tuple[epath.Path, epath.Path, epath.Path]:
  """(tokenizer, base-half prepared dir, continuation-half prepared dir) of the code pairs."""
  from codepmp_jax.data.tokenizer import train_sentencepiece
  if s.code_pairs_file:
    lines = _pair_lines(epath.Path(s.code_pairs_file))
    tokenizer = out / "spm.model"
    if not tokenizer.exists():
      texts = [json.loads(line)["prompt"] + json.loads(line)["chosen"] for line in lines]
      train_sentencepiece(texts, s.vocab_size, str(out / "spm"))
  else:
    config = _base_config(s)
    config.data.path = str(out / "code")
    builtin.ensure(config.data)  # synthesizes the pairs, trains the tokenizer
    tokenizer = out / "code" / "spm.model"
    lines = [line for shard in sorted((out / "code" / "pairs").glob("*.jsonl.gz"))
             for line in _pair_lines(shard)]
  if len(lines) < 4:
    raise ValueError(f"only {len(lines)} code pairs; the experiment needs at least 4")
  halves = (out / "code_base.jsonl", out / "code_continue.jsonl")
  middle = len(lines) // 2
  for half, part in zip(halves, (lines[:middle], lines[middle:])):
    if not half.exists():
      half.write_text("".join(part))
  prepared = tuple(_prepare_once([h], "pairs", tokenizer, out / f"prepared_{h.stem}", s.seq_len,
                                 "train:0.95,eval:0.05") for h in halves)
  return tokenizer, prepared[0], prepared[1]


def pretrain_config(s: ControlSettings, data: epath.Path, tokenizer: epath.Path, init_from: str,
                    rm_coef: float, steps: int) -> ml_collections.ConfigDict:
  """Code pretraining: LM on the chosen sides (rm_coef 0) or PMP (rm_coef 1), seed 0."""
  config = _base_config(s)
  config.init_from = init_from
  config.tokenizer = str(tokenizer)
  config.data.builtin.name = ""
  config.data.path = str(data)
  config.loss.update(rm_coef=rm_coef, lm_coef=1.0)
  config.optimizer.update(lr=s.pretrain_lr)
  config.train.update(total_steps=steps, log_every=max(1, steps // 5), eval_every=0,
                      eval_batches=0)
  config.checkpoint.update(save_every=steps, keep=1)
  return config


def rm_steps(s: ControlSettings, k: int) -> int:
  """Fine-tuning steps for k questions: `rm_epochs` passes, at least `rm_min_steps`."""
  return max(s.rm_min_steps, math.ceil(s.rm_epochs * k / s.batch))


def rm_config(s: ControlSettings, data: epath.Path, init_from: str, k: int,
              seed: int) -> ml_collections.ConfigDict:
  """RM fine-tuning as released: BT only, cosine, weight decay 0, clipping 1.0, small warmup."""
  config = _base_config(s)
  steps = rm_steps(s, k)
  config.seed = seed
  config.init_from = init_from
  config.data.builtin.name = ""
  config.data.path = str(data)
  config.loss.update(rm_coef=1.0, lm_coef=0.0)
  config.optimizer.update(lr=s.rm_lr, schedule="cosine", warmup_ratio=s.rm_warmup_ratio,
                          weight_decay=0.0, grad_clip=1.0)
  config.train.update(total_steps=steps, log_every=max(1, steps // 5), eval_every=0,
                      eval_batches=0)
  config.checkpoint.update(save_every=steps, keep=1)
  return config


def gsm8k_subset(out: epath.Path, k: int, seed: int) -> epath.Path:
  """k GSM8K training questions drawn at random (seeded), shared by the three arms."""
  path = out / "gsm8k" / f"train_k{k}_seed{seed}.jsonl"
  if not path.exists():
    lines = registry.path("gsm8k/train").read_text().splitlines(keepends=True)
    if k > len(lines):
      raise ValueError(f"k={k} exceeds the {len(lines)} GSM8K training questions")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(random.Random(seed).sample(lines, k)))
  return path


def champ_file(s: ControlSettings, out: epath.Path) -> tuple[epath.Path, dict]:
  """The CHAMP Best-of-N candidates file for the chosen models and settings, and its counts."""
  from codepmp_jax.eval import candidates
  path = out / "champ_candidates.jsonl"
  records, stats = candidates.champ_questions(candidates.load_problems(), s.champ_models,
                                              s.champ_settings, min_candidates=max(s.bon_ns))
  if s.eval_limit is not None:
    records = records[:s.eval_limit]
  candidates.write_jsonl(records, path)
  return path, {"questions": len(records), "candidates": sum(len(r["candidates"]) for r in records),
                "skipped": dict(stats.skipped)}


def evaluate(s: ControlSettings, workdir: epath.Path, champ: epath.Path) -> dict:
  """GSM8K pairwise, LogiQA 2.0 multiple choice and CHAMP Best-of-N of one RM (eval.json)."""
  out = workdir / "eval.json"
  if out.exists():
    return json.loads(out.read_text())
  from codepmp_jax.eval import reward_tasks
  from codepmp_jax.score import RewardScorer
  scorer = RewardScorer(str(workdir), batch_size=s.score_batch, max_length=s.score_length,
                        show_progress=False)
  report = {
      "pairwise": reward_tasks.pairwise(scorer, str(registry.path("gsm8k/test")), "gsm8k",
                                 limit=s.eval_limit),
      "mc": reward_tasks.multiple_choice(scorer, str(registry.path("logiqa2/test")), "logiqa2",
                                  limit=s.eval_limit),
      "bon": reward_tasks.best_of_n(str(champ), "champ", s.bon_ns, scorer=scorer),
  }
  out.write_text(json.dumps(report, indent=1))
  return report


# --- Statistics and the report.


def metrics_of(s: ControlSettings, report: dict) -> dict[str, float]:
  """The numbers compared across arms, from one RM's eval report."""
  top = str(max(s.bon_ns))
  return {"gsm8k_pairwise": report["pairwise"]["accuracy"], "logiqa2_mc": report["mc"]["accuracy"],
          f"champ_bon{top}": report["bon"]["bon"][top]["rm"]}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
  """Mean and Student-t interval over replicates (NaN bounds with fewer than two)."""
  from scipy import stats
  v = np.asarray(values, np.float64)
  mean = float(v.mean())
  if v.size < 2:
    return {"mean": mean, "ci95": [float("nan"), float("nan")], "n": int(v.size)}
  half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
  return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(v.size)}


def comparisons(arms: Sequence[str]) -> list[tuple[str, str]]:
  """The paired comparisons among `arms` (all three of COMPARISONS for the full design)."""
  return [(a, b) for a, b in COMPARISONS if a in arms and b in arms]


def summarize(s: ControlSettings, per_run: dict, arms: Sequence[str] = ARMS) -> dict:
  """Per metric, k and arm: mean and t-interval; per comparison: the paired difference."""
  names = list(next(iter(per_run.values())))
  table: dict = {}
  for name in names:
    table[name] = {}
    for k in s.ks:
      values = {arm: [per_run[(arm, k, seed)][name] for seed in s.seeds] for arm in arms}
      row = {arm: t_interval(values[arm]) for arm in arms}
      for a, b in comparisons(arms):
        row[f"{a}-{b}"] = t_interval(np.subtract(values[a], values[b]))
      table[name][str(k)] = row
  return table


def _cell(x: dict) -> str:
  low, high = x["ci95"]
  if math.isnan(low):
    return f"{100 * x['mean']:.1f}"
  return f"{100 * x['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def markdown_table(summary: dict, arms: Sequence[str] = ARMS) -> str:
  """One row per metric and k: each arm's mean [95% CI] and the paired differences (points)."""
  columns = list(arms) + [f"{a}-{b}" for a, b in comparisons(arms)]
  lines = ["| metric | k | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
  for name, by_k in summary.items():
    for k, row in by_k.items():
      lines.append(f"| {name} | {k} | " + " | ".join(_cell(row[c]) for c in columns) + " |")
  return "\n".join(lines)


def conclusion(summary: dict, num_seeds: int, arms: Sequence[str] = ARMS) -> str:
  """Plain words: where PMP beats the base and the LM-only control, with intervals excluding 0."""
  lines = []
  for name, by_k in summary.items():
    for (a, b) in [c for c in comparisons(arms) if c[0] == "pmp"]:
      wins = [k for k, row in by_k.items() if row[f"{a}-{b}"]["ci95"][0] > 0]
      losses = [k for k, row in by_k.items() if row[f"{a}-{b}"]["ci95"][1] < 0]
      diffs = ", ".join(f"k={k}: {100 * row[f'{a}-{b}']['mean']:+.1f}" for k, row in by_k.items())
      parts = [f"better at k={','.join(wins)}"] if wins else []
      parts += [f"worse at k={','.join(losses)}"] if losses else []
      verdict = "; ".join(parts) or "not distinguishable at any k"
      lines.append(f"- {name}: {a} vs {b}: {verdict} (mean differences in points: {diffs})")
  head = (f"Conclusion ({num_seeds} seeds per point; 'better' = the 95% t-interval of the paired "
          "difference excludes 0):")
  return head + "\n" + "\n".join(lines)


def plot(summary: dict, path: epath.Path, arms: Sequence[str] = ARMS) -> epath.Path:
  """One panel per metric: accuracy against k, one line per arm, 95% intervals as error bars."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(summary), figsize=(4.2 * len(summary), 3.6), dpi=120)
  for ax, (name, by_k) in zip(np.atleast_1d(axes), summary.items()):
    ks = [int(k) for k in by_k]
    for arm in arms:
      style, shift = {"base": ("s--", 0.94), "lm": ("^:", 1.0), "pmp": ("o-", 1.06)}[arm]
      means = np.array([by_k[str(k)][arm]["mean"] for k in ks])
      bounds = np.array([by_k[str(k)][arm]["ci95"] for k in ks])
      err = np.nan_to_num(np.abs(bounds.T - means))
      # Arms side by side at each k (a small shift on the log axis), so the intervals don't hide.
      ax.errorbar([k * shift for k in ks], means, yerr=err, fmt=style, capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlim(min(ks) / 1.5, max(ks) * 1.5)
    ax.set_xlabel("GSM8K training questions (k)")
    ax.set_ylabel("accuracy")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend()
  names = {"base": "base", "lm": "base + LM", "pmp": "base + PMP"}
  fig.suptitle(f"RM fine-tuning from {', '.join(names[a] for a in arms)} "
               "(mean, 95% t-interval over seeds)")
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return path


def run(s: ControlSettings) -> dict:
  """Every stage; returns `{"settings", "champ", "runs", "summary"}` (also written to results.json)."""
  import jax
  start = time.time()
  out = epath.Path(s.out)
  out.mkdir(parents=True, exist_ok=True)
  # Runs of one shape (the arms and seeds at one k) compile the same programs: compile them once.
  jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  timings = {}

  tokenizer, base_data, continue_data = code_data(s, out)
  timings["code_data_s"] = time.time() - start
  t = time.time()
  pretrained = {"base": out / "base"}
  pretraining = {"base": _train_once(
      pretrain_config(s, base_data, tokenizer, "", 0.0, s.base_steps), out / "base")}
  for arm, rm_coef in (("lm", 0.0), ("pmp", 1.0)):
    pretrained[arm] = out / f"continue_{arm}"
    pretraining[arm] = _train_once(pretrain_config(s, continue_data, tokenizer, str(out / "base"),
                                                   rm_coef, s.continue_steps), pretrained[arm])
  timings["pretraining_s"] = time.time() - t

  champ, champ_counts = champ_file(s, out)
  per_run, reports = {}, {}
  t = time.time()
  for k in s.ks:
    for seed in s.seeds:
      data = _prepare_once([gsm8k_subset(out, k, seed)], "gsm8k", tokenizer,
                           out / "gsm8k" / f"prepared_k{k}_seed{seed}", s.seq_len, "train:1")
      for arm in ARMS:
        workdir = out / f"rm_{arm}_k{k}_seed{seed}"
        _train_once(rm_config(s, data, str(pretrained[arm]), k, seed), workdir)
        report = evaluate(s, workdir, champ)
        reports[f"{arm}/k{k}/seed{seed}"] = report
        per_run[(arm, k, seed)] = metrics_of(s, report)
  timings["rm_and_eval_s"] = time.time() - t
  summary = summarize(s, per_run)
  baselines = {m: reports[next(iter(reports))]["bon"]["bon"][str(max(s.bon_ns))][m]
               for m in ("random", "majority", "oracle")}
  timings["total_s"] = time.time() - start
  results = {"settings": dataclasses.asdict(s), "champ": champ_counts,
             "pretraining": {arm: {k: v for k, v in summary_.items()
                                   if k in ("step", "loss", "lm_loss", "bt_loss", "accuracy")}
                             for arm, summary_ in pretraining.items()},
             "champ_baselines": baselines, "timings": timings,
             "runs": {f"{a}/k{k}/seed{seed}": v for (a, k, seed), v in per_run.items()},
             "summary": summary}
  table = markdown_table(summary)
  words = conclusion(summary, len(s.seeds))
  (out / "results.json").write_text(json.dumps(results, indent=1))
  (out / "results.md").write_text(table + "\n\n" + words + "\n")
  png = plot(summary, out / "results.png")
  print("\n" + table + "\n")
  print(f"CHAMP Best-of-{max(s.bon_ns)} without a reward model (same draws): "
        + ", ".join(f"{m} {100 * v:.1f}" for m, v in baselines.items()))
  print(words)
  print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {png} "
        f"({timings['total_s'] / 60:.1f} min this run)")
  return results


# --- Command line.


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags (defined only when run as a program, so importing adds none)."""
  defaults = ControlSettings()

  def define(kind: str, name: str, default: object, help: str) -> None:
    getattr(flags, f"DEFINE_{kind}")(name, default, help, flag_values=values)

  define("string", "out", defaults.out, "Output directory (every stage's files).")
  define("bool", "smoke", False, "The tiny wiring check instead of the full run.")
  define("string", "code_pairs_file", "", "Code pairs JSONL[.gz] to use instead of synthesizing.")
  define("list", "ks", [str(k) for k in defaults.ks], "GSM8K training questions per RM.")
  define("list", "seeds", [str(x) for x in defaults.seeds], "Seeds per point (>= 2 for CIs).")
  define("integer", "code_pairs", defaults.code_pairs, "Code pairs to synthesize (both halves).")
  define("integer", "base_steps", defaults.base_steps, "Base LM pretraining steps.")
  define("integer", "continue_steps", defaults.continue_steps, "LM / PMP continuation steps.")
  define("integer", "eval_limit", 0, "Test questions per evaluation (0: the whole test sets).")


def _ints(name: str, text: list[str]) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text)
  except ValueError:
    raise ValueError(f"--{name}: expected comma-separated integers, got {','.join(text)!r}") from None


def settings_from_flags(values: flags.FlagValues = flags.FLAGS) -> ControlSettings:
  """The settings the parsed flags describe (`--smoke`: `smoke_settings`)."""
  if values.smoke:
    return smoke_settings(values.out, values.code_pairs_file)
  return ControlSettings(
      out=values.out, code_pairs=values.code_pairs, ks=_ints("ks", values.ks),
      seeds=_ints("seeds", values.seeds), base_steps=values.base_steps,
      continue_steps=values.continue_steps, code_pairs_file=values.code_pairs_file,
      eval_limit=values.eval_limit or None)


def main(argv: list[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """Runs the experiment the flags describe."""
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
  run(settings_from_flags(values))


if __name__ == "__main__":
  from codepmp_jax import cli
  cli.run(main, define_flags)
