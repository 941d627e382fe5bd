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
4. Evaluation of every RM on whole test sets: GSM8K pairwise (every test pair) and Best-of-N on
   real model-written CHAMP candidates (`eval/candidates.py`), plus LogiQA 2.0 multiple choice
   with `logiqa=True` (off by default: a math RM is at chance there, and its 6,288 options would
   be most of the scoring time).
Every sequence is seen whole where it can be: the scoring length is measured from the data (the
smallest scoring bucket that cuts under `max_truncated_share` of each evaluation's sequences,
tokenized by this run's tokenizer), and training sequences are cut by the `keep_end` policy
(prompt from the left, then the response's start, so the answer stays), with pairs that become
token-identical dropped by prepare. The run prints, per evaluation, the share of scored sequences
that were cut (a WARNING at `max_truncated_share` or more), the pairs skipped as identical and the
ties, and, from the prepare manifests, the share of training pairs cut or dropped.
Per arm and k: the mean over RM seeds and a 95% Student-t interval over them (the seeds vary the
GSM8K subset and data order; each arm is pretrained once, so no interval covers the pretraining
seed). Per k, the paired differences pmp - base, pmp - lm and lm - base: over seeds (same seed =
same subset and order) with their t-interval, and as a paired bootstrap over the same test items
(per-item scores averaged over the seeds), which covers the test-item sampling.
Writes results.json, results.md and results.png under --out, and prints the tables and a
plain-language conclusion. Each stage skips itself when its output is complete; an --out built
with other settings is refused (`check_out_dir`).
"""
from __future__ import annotations

import dataclasses
import gzip
import itertools
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
from codepmp_jax.data.prepared import MANIFEST

ARMS = ("base", "lm", "pmp")
COMPARISONS = (("pmp", "base"), ("pmp", "lm"), ("lm", "base"))


@dataclasses.dataclass(frozen=True)
class ControlSettings:
  """Everything that sizes the experiment; the defaults are the full CPU run (see README).

  Lengths, measured with this run's 4,000-piece code tokenizer (keep_end truncation): of the 6,000
  stdlib code pairs, seq_len 128 / 256 / 384 / 512 cuts the prompt (the code's description) of
  85% / 42% / 22% / 12% and leaves 16% / 5.5% / 2.3% / 1.1% token-identical (dropped); of the
  GSM8K training sequences, 128 / 256 / 384 cuts 94% / 32% / 5%. A training step of 16 pairs took
  1.5 / 2.5 / 6 s at 256 / 384 / 512 tokens (this machine, shared), hence 384. Scoring is
  bucketed by each sequence's own length, so its cost is set by the data (GSM8K test pairs: median 221 tokens, max 590; CHAMP candidates: median 659, 99th percentile
  ~2,300), not by the cap; `score_length=0` picks the cap from the data.
  """
  out: str = "runs/pmp_control"
  # The model (the tiny family) and its sequences.
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  seq_len: int = 384
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
  logiqa: bool = False
  champ_models: tuple[str, ...] = ("GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium")
  champ_settings: tuple[str, ...] = ("0-Shot", "5-Shot")
  bon_ns: tuple[int, ...] = (1, 2, 4, 8)
  score_batch: int = 64
  # Tokens scored per sequence: 0 = the smallest scoring bucket that cuts under
  # `max_truncated_share` of each evaluation's sequences (`choose_score_length`).
  score_length: int = 0
  max_truncated_share: float = 0.01


def smoke_settings(out: str, code_pairs_file: str = "") -> ControlSettings:
  """The same design at a size that runs end to end in well under a minute (tests, wiring).

  Synthesizing even 200 stdlib pairs scans the whole standard library (~1 min on a loaded CPU),
  so a test passes a small `code_pairs_file` of its own. Scoring is cut at 64 tokens to stay
  fast, so the smoke run prints the truncation WARNING.
  """
  return ControlSettings(
      out=out, code_pairs_file=code_pairs_file, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
      seq_len=64, batch=8, code_pairs=200, vocab_size=400, base_steps=2, continue_steps=2,
      ks=(8,), seeds=(0, 1), rm_epochs=1.0, rm_min_steps=2, eval_limit=12, logiqa=True,
      champ_models=("GPT-4", "PaLM 2 Medium"), champ_settings=("0-Shot",), bon_ns=(1, 2),
      score_batch=16, score_length=64)


# Settings that may change between runs in one --out: the finished stages stay valid.
REUSABLE_SETTINGS = ("out", "ks", "seeds", "score_batch", "code_pairs_file")


def check_out_dir(s: ControlSettings, out: epath.Path) -> None:
  """Records the settings in `out/settings.json`, refusing an `out` built with other ones: its
  finished stages (pretrained arms, RMs, evaluations) would be reused as if this run made them."""
  now = json.loads(json.dumps(dataclasses.asdict(s)))
  file = out / "settings.json"
  before = (json.loads(file.read_text()) if file.exists() else
            json.loads((out / "results.json").read_text())["settings"]
            if (out / "results.json").exists() else None)
  if before is not None:
    changed = sorted(k for k in set(now) | set(before)
                     if k not in REUSABLE_SETTINGS and before.get(k) != now.get(k))
    if changed:
      raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)} differ); "
                       "pass a new --out or delete it")
  out.mkdir(parents=True, exist_ok=True)
  file.write_text(json.dumps(now, indent=1))


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
  if not (out / MANIFEST).exists():
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


def prepared_summary(prepared: epath.Path) -> dict:
  """What prepare cut and dropped, as shares of the pairs it read (its manifest): `prompt_cut` and
  `response_cut` of the kept pairs (a code pair's prompt is its description), `identical` the
  pairs dropped as token-identical once cut (no ranking signal)."""
  from codepmp_jax.data import prepare
  manifest = json.loads((prepared / MANIFEST).read_text())
  kept = sum(split["pairs"] for split in manifest["splits"].values())
  read = kept + sum(manifest["dropped"].values())
  return {"seq_len": manifest["seq_len"], "truncation": manifest.get("truncation"), "pairs": read,
          "kept": kept, "prompt_cut": manifest["truncated"]["prompt"] / max(read, 1),
          "response_cut": manifest["truncated"]["response"] / max(read, 1),
          "identical": manifest["dropped"]["identical_after_truncation"] / max(read, 1)}


def prepared_line(name: str, summary: dict) -> str:
  return (f"{name}: {summary['pairs']:,} pairs at seq_len {summary['seq_len']}: prompt cut "
          f"{100 * summary['prompt_cut']:.1f}%, response cut {100 * summary['response_cut']:.1f}%, "
          f"dropped as identical after truncation {100 * summary['identical']:.1f}%")


def scored_texts(s: ControlSettings, champ: epath.Path, gsm8k_test: epath.Path,
                 logiqa_test: epath.Path | None) -> dict[str, tuple[list[str], list[str]]]:
  """(prompts, responses) of every sequence each evaluation scores, built as `reward_tasks` builds
  them (same loaders, templates, seed and limit)."""
  from codepmp_jax.data import loaders
  from codepmp_jax.data.records import BadRecords
  from codepmp_jax.eval import bon
  records = list(itertools.islice(loaders.load_records(
      [str(gsm8k_test)], "gsm8k", BadRecords(), loaders.LoaderOptions(seed=0)), s.eval_limit))
  texts = {"pairwise": ([r.prompt for r in records] * 2,
                        [r.chosen for r in records] + [r.rejected for r in records])}
  if logiqa_test is not None:
    items = list(itertools.islice(loaders.load_multiple_choice([str(logiqa_test)], BadRecords()),
                                  s.eval_limit))
    texts["mc"] = ([i.prompt for i in items for _ in i.options],
                   [o for i in items for o in i.options])
  questions = bon.load_candidates(str(champ))
  texts["bon"] = ([q.prompt for q in questions for _ in q.candidates],
                  [c for q in questions for c in q.candidates])
  return texts


def fitting_length(lengths: Sequence[int], max_share: float) -> int:
  """The smallest scoring bucket length (`score.BUCKETS_PER_OCTAVE` per octave) that leaves under
  `max_share` of `lengths` longer. The scorer pads every batch to such a bucket anyway, so a cap
  there costs nothing beyond the sequences it keeps whole."""
  from codepmp_jax.data.encode import bucket_length
  from codepmp_jax.score import BUCKETS_PER_OCTAVE
  lengths = np.asarray(lengths)
  for length in sorted({bucket_length(int(n), steps_per_octave=BUCKETS_PER_OCTAVE) for n in lengths}):
    if np.mean(lengths > length) < max_share:
      return length
  raise ValueError("no lengths to fit")


def choose_score_length(s: ControlSettings, tokenizer: epath.Path, texts: dict) -> tuple[int, dict]:
  """The scoring length (`s.score_length`, or when 0 the largest of each evaluation's
  `fitting_length`) and, per evaluation, the measured lengths (with the end token) and the share
  of sequences that length cuts."""
  from codepmp_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(tokenizer)
  lengths = {mode: np.asarray([len(ids) + 1 for ids, _ in tok.encode_joined_batch(*pair)])
             for mode, pair in texts.items()}
  length = s.score_length or max(fitting_length(v, s.max_truncated_share) for v in lengths.values())
  return length, {mode: {"sequences": int(v.size), "median": int(np.median(v)),
                         "p99": int(np.percentile(v, 99)), "max": int(v.max()),
                         "cut_share": float(np.mean(v > length))} for mode, v in lengths.items()}


def evaluate(s: ControlSettings, workdir: epath.Path, champ: epath.Path, score_length: int,
             gsm8k_test: epath.Path, logiqa_test: epath.Path | None = None) -> dict:
  """GSM8K pairwise, CHAMP Best-of-N and (with `logiqa_test`) LogiQA 2.0 multiple choice of one
  RM at `score_length` tokens (eval.json; reused when it was scored at the same length)."""
  out = workdir / "eval.json"
  if out.exists():
    report = json.loads(out.read_text())
    if report.get("score_length") == score_length and ("mc" in report) == (logiqa_test is not None):
      return report
  from codepmp_jax.eval import reward_tasks
  from codepmp_jax.score import RewardScorer
  scorer = RewardScorer(str(workdir), batch_size=s.score_batch, max_length=score_length,
                        show_progress=False)
  report = {"score_length": score_length,
            "pairwise": reward_tasks.pairwise(scorer, str(gsm8k_test), "gsm8k", limit=s.eval_limit)}
  if logiqa_test is not None:
    report["mc"] = reward_tasks.multiple_choice(scorer, str(logiqa_test), "logiqa2",
                                                limit=s.eval_limit)
  report["bon"] = reward_tasks.best_of_n(str(champ), "champ", s.bon_ns, scorer=scorer)
  out.write_text(json.dumps(report, indent=1))
  return report


def truncation_line(name: str, report: dict, max_share: float) -> str:
  """One evaluation's cut sequences, a `WARNING:` line when they are `max_share` or more."""
  lines = []
  for mode in ("pairwise", "mc", "bon"):
    if mode in report:
      t = report[mode]["truncation"]
      lines.append(f"{mode} {100 * t['share']:.2f}% of {t['sequences']:,} "
                   f"(prompt {t['prompt']}, response {t['response']})")
  text = f"{name}: scored sequences truncated at {report['score_length']} tokens: " + "; ".join(lines)
  worst = max(report[m]["truncation"]["share"] for m in ("pairwise", "mc", "bon") if m in report)
  if worst >= max_share:
    text = (f"WARNING: {text} -- {100 * worst:.2f}% is not under {100 * max_share:g}%: the RM did "
            "not see those sequences whole")
  return text


# --- Statistics and the report.


def metric_scores(s: ControlSettings) -> dict[str, tuple[str, str]]:
  """Each compared metric -> (evaluation mode, per-item score) in an RM's eval report: pairwise
  strict (a tie is wrong) and tie-aware (a tie scores 0.5), multiple choice tie-aware, and the RM's
  Best-of-N pick at the largest N."""
  top = max(s.bon_ns)
  scores = {"gsm8k_pairwise": ("pairwise", "strict"),
            "gsm8k_pairwise_tie_aware": ("pairwise", "tie_aware")}
  if s.logiqa:
    scores["logiqa2_mc_tie_aware"] = ("mc", "tie_aware")
  scores[f"champ_bon{top}"] = ("bon", f"rm@{top}")
  return scores


def metrics_of(s: ControlSettings, report: dict) -> dict[str, float]:
  """The numbers compared across arms, from one RM's eval report (the means of its per-item scores)."""
  return {name: float(np.mean(report[mode]["per_item"][score]))
          for name, (mode, score) in metric_scores(s).items()}


def paired_items(s: ControlSettings, reports: dict, arms: Sequence[str] = ARMS) -> dict:
  """Per metric, k and comparison a-b: a paired bootstrap over the same test items
  (`stats.paired_bootstrap`) of each item's score averaged over the seeds, per arm. It covers the
  test-item sampling; the fine-tuning seeds are averaged in, the pretraining seed is fixed."""
  from codepmp_jax.eval import stats
  out: dict = {}
  for name, (mode, score) in metric_scores(s).items():
    out[name] = {}
    for k in s.ks:
      means = {}
      for arm in arms:
        per_seed = [reports[f"{arm}/k{k}/seed{seed}"][mode]["per_item"] for seed in s.seeds]
        ids = sorted(per_seed[0]["id"])
        means[arm] = np.mean([[dict(zip(p["id"], p[score]))[i] for i in ids] for p in per_seed], axis=0)
      out[name][str(k)] = {f"{a}-{b}": stats.paired_bootstrap(means[a], means[b])
                           for a, b in comparisons(arms)}
  return out


def evaluation_facts(reports: Sequence[dict]) -> dict[str, dict]:
  """Per evaluation mode, what every RM's scoring shared (items, the scoring length, the sequences
  cut, pairs skipped as identical) and its ties (min and max over the RMs)."""
  facts = {}
  for mode in ("pairwise", "mc", "bon"):
    if mode not in reports[0]:
      continue
    first = reports[0][mode]
    truncation = max((r[mode]["truncation"] for r in reports), key=lambda t: t["share"])
    ties = [r[mode].get("ties", 0) for r in reports]
    facts[mode] = {"items": first.get("n", first.get("questions")),
                   "score_length": reports[0]["score_length"], "truncation": truncation,
                   "identical_after_truncation": first.get("identical_after_truncation", 0),
                   "ties": [min(ties), max(ties)]}
  return facts


EVAL_NAMES = {"pairwise": "GSM8K pairwise", "mc": "LogiQA 2.0 multiple choice",
              "bon": "CHAMP Best-of-N"}


def facts_table(facts: dict[str, dict]) -> str:
  """The evaluation facts (`evaluation_facts`) as a Markdown table."""
  lines = ["| evaluation | items | scored at (tokens) | sequences | truncated (prompt / response) "
           "| truncated share | identical pairs skipped | ties per RM |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for mode, f in facts.items():
    t = f["truncation"]
    ties = f"{f['ties'][0]}" if f["ties"][0] == f["ties"][1] else f"{f['ties'][0]}-{f['ties'][1]}"
    lines.append(f"| {EVAL_NAMES[mode]} | {f['items']:,} | {f['score_length']:,} | "
                 f"{t['sequences']:,} | {t['prompt']} / {t['response']} | {100 * t['share']:.2f}% | "
                 f"{f['identical_after_truncation'] if mode == 'pairwise' else '-'} | "
                 f"{ties if mode != 'bon' else '-'} |")
  return "\n".join(lines)


def baselines_line(bon_report: dict, n: int) -> str:
  """Best-of-n without a reward model, on the RMs' draws: random, majority, oracle and the style
  baselines (longest, shortest, always one source model)."""
  row = bon_report["bon"][str(n)]
  values = {m: row[m] for m in ("random", "majority", "oracle")} | row.get("baselines", {})
  return (f"CHAMP Best-of-{n} without a reward model ({bon_report['questions']} questions, same "
          "draws): " + ", ".join(f"{m} {100 * v:.1f}" for m, v in values.items()))


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


def bootstrap_table(paired: dict, arms: Sequence[str] = ARMS) -> str:
  """One row per metric and k: each paired difference over items [95% bootstrap interval] and its
  one-sided p (the share of resamples on the other side of 0), in points."""
  columns = [f"{a}-{b}" for a, b in comparisons(arms)]
  lines = ["| metric | k | items | " + " | ".join(columns) + " |",
           "|---|---:|---:|" + "---:|" * len(columns)]
  for name, by_k in paired.items():
    for k, row in by_k.items():
      cells = [f"{100 * row[c]['difference']:+.1f} [{100 * row[c]['ci95'][0]:.1f}, "
               f"{100 * row[c]['ci95'][1]:.1f}] p={row[c]['one_sided_p']:.3f}" for c in columns]
      lines.append(f"| {name} | {k} | {row[columns[0]]['n']:,} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _verdict(by_k: dict, key: str) -> str:
  """Where the 95% interval of difference `key` lies above 0 and below 0, by k."""
  wins = [k for k, row in by_k.items() if row[key]["ci95"][0] > 0]
  losses = [k for k, row in by_k.items() if row[key]["ci95"][1] < 0]
  parts = [f"better at k={','.join(wins)}"] if wins else []
  parts += [f"worse at k={','.join(losses)}"] if losses else []
  return "; ".join(parts) or "not distinguishable at any k"


def conclusion(summary: dict, num_seeds: int, arms: Sequence[str] = ARMS,
               paired: dict | None = None) -> str:
  """Plain words: where PMP beats the base and the LM-only control, by the t-interval over seeds
  and (given `paired`, `paired_items`) by the paired bootstrap over items, each excluding 0."""
  lines = []
  for name, by_k in summary.items():
    for (a, b) in [c for c in comparisons(arms) if c[0] == "pmp"]:
      key = f"{a}-{b}"
      diffs = ", ".join(f"k={k}: {100 * row[key]['mean']:+.1f}" for k, row in by_k.items())
      line = f"- {name}: {a} vs {b}: {_verdict(by_k, key)} (mean differences in points: {diffs})"
      if paired is not None:
        line += f"; over items: {_verdict(paired[name], key)}"
      lines.append(line)
  head = (f"Conclusion ({num_seeds} seeds per point; 'better' = the 95% t-interval over seeds of "
          "the paired difference excludes 0" + ("; 'over items': the 95% paired-bootstrap "
                                               "interval over test items does" if paired else "")
          + "):")
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
  """Every stage; returns `{"settings", "champ", "runs", "summary", ...}` (also in results.json)."""
  import jax
  start = time.time()
  out = epath.Path(s.out)
  check_out_dir(s, out)
  # Runs of one shape (the arms and seeds at one k) compile the same programs: compile them once.
  jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  timings = {}

  tokenizer, base_data, continue_data = code_data(s, out)
  prepared = {"code pairs, base half": prepared_summary(base_data),
              "code pairs, continuation half": prepared_summary(continue_data)}
  for name, summary_ in prepared.items():
    print(prepared_line(name, summary_), flush=True)
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
  gsm8k_test = registry.path("gsm8k/test")
  logiqa_test = registry.path("logiqa2/test") if s.logiqa else None
  score_length, lengths = choose_score_length(
      s, tokenizer, scored_texts(s, champ, gsm8k_test, logiqa_test))
  print(f"scoring length {score_length} tokens ("
        + ("fixed" if s.score_length else f"the smallest bucket that cuts under "
           f"{100 * s.max_truncated_share:g}% of each evaluation's sequences") + "): "
        + "; ".join(f"{EVAL_NAMES[m]} {v['sequences']:,} sequences, median {v['median']}, "
                    f"99th percentile {v['p99']}, max {v['max']}" for m, v in lengths.items()),
        flush=True)
  per_run, reports, gsm8k_prepared, warnings = {}, {}, [], []
  t = time.time()
  for k in s.ks:
    for seed in s.seeds:
      data = _prepare_once([gsm8k_subset(out, k, seed)], "gsm8k", tokenizer,
                           out / "gsm8k" / f"prepared_k{k}_seed{seed}", s.seq_len, "train:1")
      gsm8k_prepared.append(prepared_summary(data))
      for arm in ARMS:
        workdir = out / f"rm_{arm}_k{k}_seed{seed}"
        _train_once(rm_config(s, data, str(pretrained[arm]), k, seed), workdir)
        report = evaluate(s, workdir, champ, score_length, gsm8k_test, logiqa_test)
        line = truncation_line(f"{arm}/k{k}/seed{seed}", report, s.max_truncated_share)
        print(line, flush=True)
        if line.startswith("WARNING"):
          warnings.append(line)
        reports[f"{arm}/k{k}/seed{seed}"] = report
        per_run[(arm, k, seed)] = metrics_of(s, report)
  timings["rm_and_eval_s"] = time.time() - t
  if warnings and not s.score_length:  # the measured length should have fit: a bug, not a setting
    raise RuntimeError(f"{len(warnings)} evaluations cut {100 * s.max_truncated_share:g}% or more "
                       f"of their sequences at the measured length {score_length}:\n{warnings[0]}")
  prepared["GSM8K RM pairs (all subsets)"] = {
      "seq_len": s.seq_len, "pairs": sum(p["pairs"] for p in gsm8k_prepared),
      **{key: sum(p[key] * p["pairs"] for p in gsm8k_prepared)
         / max(1, sum(p["pairs"] for p in gsm8k_prepared))
         for key in ("prompt_cut", "response_cut", "identical")}}
  summary = summarize(s, per_run)
  paired = paired_items(s, reports)
  facts = evaluation_facts(list(reports.values()))
  first = reports[next(iter(reports))]
  timings["total_s"] = time.time() - start
  results = {"settings": dataclasses.asdict(s), "champ": champ_counts,
             "pretraining": {arm: {k: v for k, v in summary_.items()
                                   if k in ("step", "loss", "lm_loss", "bt_loss", "accuracy")}
                             for arm, summary_ in pretraining.items()},
             "prepared": prepared, "score_length": score_length, "scored_lengths": lengths,
             "evaluation": facts, "warnings": warnings,
             "champ_baselines": first["bon"]["bon"][str(max(s.bon_ns))], "timings": timings,
             "runs": {f"{a}/k{k}/seed{seed}": v for (a, k, seed), v in per_run.items()},
             "summary": summary, "paired_items": paired}
  text = "\n\n".join([
      "Training data (prepare manifests, keep_end truncation):\n"
      + "\n".join(f"- {prepared_line(n, p)}" for n, p in prepared.items()),
      "Evaluations (the same for every RM but the ties):\n" + facts_table(facts),
      baselines_line(first["bon"], max(s.bon_ns)),
      f"Each arm's mean over {len(s.seeds)} RM seeds [95% t-interval over the seeds], and the paired "
      "differences (same seed = same GSM8K subset and order), in points:\n" + markdown_table(summary),
      "Paired bootstrap over the same test items (each item's score averaged over the "
      f"{len(s.seeds)} RM seeds; the interval covers the test items; one pretraining run per arm), "
      "in points:\n" + bootstrap_table(paired),
      conclusion(summary, len(s.seeds), paired=paired)])
  (out / "results.json").write_text(json.dumps(results, indent=1))
  (out / "results.md").write_text(text + "\n")
  png = plot(summary, out / "results.png")
  print("\n" + text)
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
  define("bool", "logiqa", defaults.logiqa, "Also LogiQA 2.0 multiple choice (a math RM: chance).")
  define("integer", "score_length", defaults.score_length,
         "Tokens scored per sequence (0: the smallest bucket cutting under 1% of each evaluation's).")


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
      eval_limit=values.eval_limit or None, logiqa=values.logiqa, score_length=values.score_length)


def main(argv: list[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """Runs the experiment the flags describe."""
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
  run(settings_from_flags(values))


if __name__ == "__main__":
  from codepmp_jax import cli
  cli.run(main, define_flags)
