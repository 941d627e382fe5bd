"""`python -m codepmp_jax.eval pairwise|bon|mc|compare ... --out=REPORT.json`: evaluate a reward model.

  pairwise --checkpoint=CKPT --data=FILE --format=F [--by=source]
  bon      --candidates=FILE --task=gsm8k|math|champ (--checkpoint=CKPT | --scores=FILE) --n=1,2,4,...
           [--aggregate=min|max|sum|mean|last|product [--step_delimiter=TEXT]]
  mc       --checkpoint=CKPT --data=FILE --format=logiqa2|reclor [--by=type]
  compare  --reports=A.json,B.json [--score=tie_aware|strict|rm@N]

Every mode prints a table and writes its report as JSON (accuracies are fractions). The first three
say how many scored sequences were cut (and in which part), report ties beside the strict accuracy
and keep per-item scores; `compare` reads two such reports of the same items and prints A minus B
with a paired bootstrap interval over the items.
`--normalize` scores with the checkpoint's reward normalization ((r - mean) / std, `score
--calibrate`); `bon --aggregate=HOW` scores each candidate by its step rewards (the reward at the
end of every step, one forward pass per candidate) aggregated by HOW (`bon.AGGREGATES`).
Every path (inputs, --out, --plot, --save_scores) may be `gs://...` (through etils.epath).
"""
from __future__ import annotations

import json
from typing import Sequence

from absl import app, flags
from etils import epath

from codepmp_jax import cli
from codepmp_jax.data import loaders, registry
from codepmp_jax.eval import answers, bon, reward_tasks, stats

MODES = ("pairwise", "bon", "mc", "compare")
# The flags each mode needs (bon needs one of --checkpoint and --scores too).
REQUIRED = {"pairwise": ("out", "checkpoint", "data", "format"),
            "mc": ("out", "checkpoint", "data", "format"), "bon": ("out", "candidates", "task"),
            "compare": ("out", "reports")}
MC_FORMATS = ("logiqa2", "reclor")
DEFAULT_BY = {"pairwise": "source", "mc": "type"}


def _ns(text: Sequence[str]) -> list[int]:
  try:
    ns = [int(x) for x in text if x.strip()]
  except ValueError:
    raise ValueError(f"--n must be comma-separated integers, got {','.join(text)!r}") from None
  if not ns or min(ns) < 1:
    raise ValueError(f"--n needs positive integers, got {','.join(text)!r}")
  return sorted(set(ns))


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """Every mode's flags (which ones a mode requires is checked in `main`)."""
  def string(name: str, help: str, default: str | None = None) -> None:
    flags.DEFINE_string(name, default, help, flag_values=values)

  string("out", "Where to write the JSON report (every mode).")
  flags.DEFINE_integer("limit", None, "Use only the first LIMIT records.", flag_values=values)
  flags.DEFINE_integer("seed", 0, "Seed of draws and bootstrap.", flag_values=values)
  string("checkpoint", "Model checkpoint or training workdir (pairwise, mc; bon unless --scores).")
  flags.DEFINE_integer("batch_size", 8, "Sequences scored per batch.", flag_values=values)
  flags.DEFINE_integer("max_length", 1024, "Tokens per sequence.", flag_values=values)
  string("data_dir", "Where registered data sets (--data=gsm8k/test) live (default: $CODEPMP_DATA, "
         "../shared/data, the cache, else downloaded).")
  # pairwise and mc.
  string("data", "pairwise, mc: a file, or a registered data set (gsm8k/test, logiqa2/test).")
  string("format", "pairwise: a data loader format (pairs, gsm8k, logiqa2, ...); mc: logiqa2|reclor.")
  string("by", "Meta field (pairwise, default source) or row field (mc, default type) to break "
         "accuracy down by.")
  flags.DEFINE_bool("strict", False, "pairwise, mc: malformed records are an error.", flag_values=values)
  # bon.
  string("candidates", 'bon: JSONL {"id", "question", "reference", "candidates": [...]}.')
  flags.DEFINE_enum("task", None, answers.TASKS, "bon: how answers are checked.", flag_values=values)
  string("scores", 'bon: JSONL {"id", "rewards": [...]} used instead of a checkpoint.')
  flags.DEFINE_list("n", ["1", "2", "4", "8", "16", "32", "64", "128", "256"],
                    "bon: comma-separated N values.", flag_values=values)
  flags.DEFINE_integer("draws", 100, "bon: random draws per question and N (all subsets when there "
                       "are fewer).", flag_values=values)
  string("plot", "bon: PNG of accuracy against N (default: beside --out).")
  string("save_scores", "bon: write the rewards used, in the --scores format.")
  flags.DEFINE_float("sympy_timeout", 5.0, "bon: seconds per MATH comparison.", flag_values=values)
  flags.DEFINE_enum("aggregate", None, bon.AGGREGATES, "bon: score each candidate by its step rewards "
                    "(one per step, read at the step's last token) aggregated this way.", flag_values=values)
  string("step_delimiter", "bon --aggregate: the text between steps.", bon.DEFAULT_STEP_DELIMITER)
  flags.DEFINE_bool("normalize", False, "Normalize rewards by the checkpoint's reward mean and std "
                    "(reward_stats.json; score --calibrate).", flag_values=values)
  # compare.
  flags.DEFINE_list("reports", None, "compare: two reports of the same items, A,B.", flag_values=values)
  string("score", "compare: the per-item score compared: tie_aware (default) or strict (pairwise, "
         "mc), rm@N (bon; default the largest N).")


def mode_of(argv: Sequence[str], values: flags.FlagValues) -> str:
  """The mode (the one positional argument), after checking that its required flags are given."""
  if len(argv) != 2 or argv[1] not in MODES:
    raise app.UsageError(f"expected one mode, {'|'.join(MODES)}, as the first argument; got "
                         f"{list(argv[1:])} (--help for usage)")
  mode = argv[1]
  for name in REQUIRED[mode]:
    if values[name].value is None:
      raise app.UsageError(f"{mode}: --{name} is required")
  if mode == "mc" and values.format not in MC_FORMATS:
    raise app.UsageError(f"mc: --format must be one of {MC_FORMATS}, got {values.format!r}")
  if mode == "compare" and len(values.reports) != 2:
    raise app.UsageError(f"compare: --reports needs two report files, got {values.reports}")
  if mode == "bon":
    if (values.checkpoint is None) == (values.scores is None):
      raise app.UsageError("bon: give one of --checkpoint and --scores")
    _ns(values.n)
    if values.aggregate is not None and values.scores is not None:
      raise app.UsageError("bon: --aggregate scores step rewards from --checkpoint, not --scores")
  if values.normalize and values.checkpoint is None:
    raise app.UsageError(f"{mode}: --normalize needs --checkpoint")
  return mode


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A plain-text table with aligned columns."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _interval(ci: Sequence[float]) -> str:
  return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def truncation_line(truncation: dict | None) -> str:
  """One line on what scoring cut: the share of sequences and the parts they lost."""
  if truncation is None:
    return "truncation: unknown (rewards read from a file)"
  return (f"truncation: {_pct(truncation['share'])}% of "
          f"{truncation['sequences']} scored sequences cut ({truncation['prompt']} lost prompt tokens, "
          f"{truncation['response']} lost response tokens)")


def render(report: dict) -> str:
  """The human-readable table of a report."""
  if report["mode"] == "compare":
    c = report["comparison"]
    return (f"{report['score']}: A - B = {_pct(c['difference'])} points, 95% CI {_interval(c['ci95'])} "
            f"(paired bootstrap over {c['n']} items; one-sided p {c['one_sided_p']:.3f})\n"
            f"A: {report['a']}\nB: {report['b']}")
  if report["mode"] == "bon":
    baselines = list(next(iter(report["bon"].values()))["baselines"])
    rows = [[n] + [_pct(acc[m]) for m in bon.METHODS] + [_interval(acc["rm_ci95"])]
            + [_pct(acc["baselines"][b]) for b in baselines] for n, acc in report["bon"].items()]
    head = (f"Best-of-N on {report['task']}: {report['questions']} questions, "
            f"{report['candidates_without_answer']} candidates without an answer (accuracy %; "
            "style baselines after the rm interval)\n" + truncation_line(report["truncation"]))
    return head + "\n" + format_table(["N", *bon.METHODS, "rm 95% CI", *baselines], rows)
  rows = [["all", report["n"], _pct(report["accuracy"]), _interval(report["ci95"])]]
  rows += [[name, g["n"], _pct(g["accuracy"]), _interval(g["ci95"])]
           for name, g in report["breakdown"].items()]
  head = (f"{report['mode']} accuracy on {report['data']} (%, strict: a tie is wrong; by {report['by']})\n"
          f"tie-aware accuracy {_pct(report['accuracy_tie_aware'])} {_interval(report['ci95_tie_aware'])}; "
          f"{report['ties']} ties")
  if report["mode"] == "pairwise":
    head += (f"; {report['identical_after_truncation']} pairs token-identical at this length, skipped; "
             f"mean margin {report['mean_margin']:.4f}")
  head += "\n" + truncation_line(report["truncation"])
  bad = sum(report["bad_records"].values())
  if bad:
    head += f"; {bad} bad records: " + ", ".join(
        f"{k}={v}" for k, v in report["bad_records"].items() if v)
  return head + "\n" + format_table(["group", "n", "accuracy", "95% CI"], rows)


def compare(paths: Sequence[str], score: str | None, seed: int) -> dict:
  """The paired comparison of two reports (A minus B) by their per-item `score`."""
  reports = [json.loads(epath.Path(p).read_text()) for p in paths]
  modes = {r.get("mode") for r in reports}
  if len(modes) != 1 or None in modes:
    raise ValueError(f"compare needs two reports of one mode; got modes {sorted(map(str, modes))}")
  if score is None:
    score = (f"rm@{max(int(n) for n in reports[0]['bon'])}" if modes == {"bon"} else "tie_aware")
  return {"mode": "compare", "score": score, "a": str(paths[0]), "b": str(paths[1]),
          "comparison": stats.compare(reports[0], reports[1], score, seed=seed)}


def run(mode: str, values: flags.FlagValues) -> dict:
  """Runs one mode from parsed flags and returns its report."""
  if mode == "compare":
    return compare(values.reports, values.score, values.seed)
  data = None if values.data is None else str(registry.resolve(values.data, values.data_dir))
  by = values.by or DEFAULT_BY.get(mode)
  scorer = None
  if values.checkpoint is not None:
    from codepmp_jax.score import RewardScorer  # JAX and the model load only when scoring.
    scorer = RewardScorer(values.checkpoint, values.batch_size, values.max_length,
                          normalize=values.normalize)
    data_format = {"pairwise": values.format, "mc": "logiqa2", "bon": "gsm8k"}[mode]
    expected = loaders.FORMAT_TEMPLATES.get(data_format)
    if scorer.prompt_format not in (None, expected):
      print(f"note: {values.checkpoint} was trained with prompt format {scorer.prompt_format!r}; this "
            f"evaluation renders prompts as {expected!r}")
  if mode == "pairwise":
    report = reward_tasks.pairwise(scorer, data, values.format, by, values.limit, values.strict,
                                   values.seed)
  elif mode == "mc":
    report = reward_tasks.multiple_choice(scorer, data, values.format, by, values.limit,
                                          values.strict, values.seed)
  else:
    if values.aggregate is not None:
      scorer = bon.StepAggregateScorer(scorer, values.aggregate, values.step_delimiter)
    plot = values.plot or epath.Path(values.out).with_suffix(".png")
    report = reward_tasks.best_of_n(values.candidates, values.task, _ns(values.n), scorer,
                                    values.scores, values.draws, values.seed, values.limit,
                                    values.sympy_timeout, plot, values.save_scores)
  if values.checkpoint is not None:
    report["checkpoint"] = str(values.checkpoint)
    report["normalized"] = bool(values.normalize)
  if mode == "bon" and values.aggregate is not None:
    report["step_aggregate"] = {"aggregate": values.aggregate, "delimiter": values.step_delimiter}
  return report


def main(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """Runs the mode (`argv[1]`), prints its table and writes the JSON report to --out."""
  mode = mode_of(argv, values)
  report = run(mode, values)
  print(render(report))
  out = epath.Path(values.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  print(f"report: {out}")


if __name__ == "__main__":
  cli.run(main, define_flags)
