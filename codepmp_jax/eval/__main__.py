"""`python -m codepmp_jax.eval pairwise|bon|mc ... --out=REPORT.json`: evaluate a reward model.

  pairwise --checkpoint=CKPT --data=FILE --format=F [--by=source]
  bon      --candidates=FILE --task=gsm8k|math|champ (--checkpoint=CKPT | --scores=FILE) --n=1,2,4,...
  mc       --checkpoint=CKPT --data=FILE --format=logiqa2|reclor [--by=type]

Every mode prints a table and writes its report as JSON (accuracies are fractions).
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

from etils import epath

from codepmp_jax import cli
from codepmp_jax.data import loaders, registry
from codepmp_jax.eval import answers, bon, reward_tasks


def _ns(text: str) -> list[int]:
  try:
    ns = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--n must be comma-separated integers, got {text!r}") from None
  if not ns or min(ns) < 1:
    raise argparse.ArgumentTypeError(f"--n needs positive integers, got {text!r}")
  return sorted(set(ns))


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one `error: ...` line (exit 2), like every other CLI."""

  def error(self, message: str):
    cli.fail(f"{self.prog}: {message} (--help for usage)")


def build_parser() -> argparse.ArgumentParser:
  """The command line: one subcommand per mode."""
  parser = _Parser(prog="python -m codepmp_jax.eval", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="mode", required=True, parser_class=_Parser)

  def common(p: argparse.ArgumentParser, checkpoint_required: bool) -> None:
    p.add_argument("--out", required=True, help="where to write the JSON report")
    p.add_argument("--verbose", action="store_true", help="library logs and full tracebacks")
    p.add_argument("--limit", type=int, default=None, help="use only the first LIMIT records")
    p.add_argument("--seed", type=int, default=0, help="seed of draws and bootstrap")
    p.add_argument("--checkpoint", required=checkpoint_required,
                   help="model checkpoint or training workdir")
    p.add_argument("--batch_size", type=int, default=8, help="sequences scored per batch")
    p.add_argument("--max_length", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--data_dir", default=None,
                   help="where registered data sets (--data=gsm8k/test) live (default: $CODEPMP_DATA, "
                        "../shared/data, the cache, else downloaded)")

  p = sub.add_parser("pairwise", help="accuracy on held-out preference pairs")
  common(p, checkpoint_required=True)
  p.add_argument("--data", required=True, help="a file, or a registered data set (gsm8k/test, logiqa2/test)")
  p.add_argument("--format", required=True, help="a data loader format (pairs, gsm8k, logiqa2, ...)")
  p.add_argument("--by", default="source", help="meta field to break accuracy down by")
  p.add_argument("--strict", action="store_true", help="malformed records are an error")

  p = sub.add_parser("bon", help="Best-of-N selection with answer checking")
  common(p, checkpoint_required=False)
  p.add_argument("--candidates", required=True,
                 help='JSONL: {"id", "question", "reference", "candidates": [...]}')
  p.add_argument("--task", required=True, choices=answers.TASKS)
  p.add_argument("--scores", help='JSONL {"id", "rewards": [...]} used instead of a checkpoint')
  p.add_argument("--n", type=_ns, default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                 help="comma-separated N values")
  p.add_argument("--draws", type=int, default=100,
                 help="random draws per question and N (all subsets when there are fewer)")
  p.add_argument("--plot", help="PNG of accuracy against N (default: beside --out)")
  p.add_argument("--save_scores", help="write the rewards used, in the --scores format")
  p.add_argument("--sympy_timeout", type=float, default=5.0, help="seconds per MATH comparison")

  p = sub.add_parser("mc", help="multiple choice: score every option, pick the highest")
  common(p, checkpoint_required=True)
  p.add_argument("--data", required=True, help="a file, or a registered data set (logiqa2/test)")
  p.add_argument("--format", required=True, choices=("logiqa2", "reclor"))
  p.add_argument("--by", default="type", help="row field to break accuracy down by")
  p.add_argument("--strict", action="store_true", help="malformed records are an error")
  return parser


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A plain-text table with aligned columns."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def render(report: dict) -> str:
  """The human-readable table of a report."""
  if report["mode"] == "bon":
    rows = [[n] + [_pct(acc[m]) for m in bon.METHODS] for n, acc in report["bon"].items()]
    head = (f"Best-of-N on {report['task']}: {report['questions']} questions, "
            f"{report['candidates_without_answer']} candidates without an answer (accuracy %)")
    return head + "\n" + format_table(["N"] + list(bon.METHODS), rows)
  rows = [["all", report["n"], _pct(report["accuracy"]),
           f"[{_pct(report['ci95'][0])}, {_pct(report['ci95'][1])}]"]]
  rows += [[name, g["n"], _pct(g["accuracy"]), f"[{_pct(g['ci95'][0])}, {_pct(g['ci95'][1])}]"]
           for name, g in report["breakdown"].items()]
  head = f"{report['mode']} accuracy on {report['data']} (%, by {report['by']})"
  if report["mode"] == "pairwise":
    head += f"; mean margin {report['mean_margin']:.4f}"
  bad = sum(report["bad_records"].values())
  if bad:
    head += f"; {bad} bad records: " + ", ".join(
        f"{k}={v}" for k, v in report["bad_records"].items() if v)
  return head + "\n" + format_table(["group", "n", "accuracy", "95% CI"], rows)


def run(args: argparse.Namespace) -> dict:
  """Runs one mode from parsed arguments and returns its report."""
  if getattr(args, "data", None) is not None:
    args.data = str(registry.resolve(args.data, args.data_dir))
  scorer = None
  if args.checkpoint is not None:
    from codepmp_jax.score import RewardScorer  # JAX and the model load only when scoring.
    scorer = RewardScorer(args.checkpoint, args.batch_size, args.max_length)
    data_format = {"pairwise": getattr(args, "format", None), "mc": "logiqa2", "bon": "gsm8k"}[args.mode]
    expected = loaders.FORMAT_TEMPLATES.get(data_format)
    if scorer.prompt_format not in (None, expected):
      print(f"note: {args.checkpoint} was trained with prompt format {scorer.prompt_format!r}; this "
            f"evaluation renders prompts as {expected!r}")
  if args.mode == "pairwise":
    report = reward_tasks.pairwise(scorer, args.data, args.format, args.by, args.limit, args.strict,
                            args.seed)
  elif args.mode == "mc":
    report = reward_tasks.multiple_choice(scorer, args.data, args.format, args.by, args.limit,
                                   args.strict, args.seed)
  else:
    plot = args.plot or epath.Path(args.out).with_suffix(".png")
    report = reward_tasks.best_of_n(args.candidates, args.task, args.n, scorer, args.scores, args.draws,
                             args.seed, args.limit, args.sympy_timeout, plot, args.save_scores)
  if args.checkpoint is not None:
    report["checkpoint"] = str(args.checkpoint)
  return report


def main(argv: Sequence[str] | None = None) -> dict:
  """Parses `argv`, runs the mode, prints its table and writes the JSON report."""
  args = build_parser().parse_args(argv)
  cli.quiet_logs(args.verbose)
  with cli.expected_errors(args.verbose):
    report = run(args)
  print(render(report))
  out = epath.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  print(f"report: {out}")
  return report


if __name__ == "__main__":
  main()
