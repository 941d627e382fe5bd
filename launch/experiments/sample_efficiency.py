"""The paper's central claim: PMP-initialized reward models learn from fewer preference pairs.

  python -m launch.experiments.sample_efficiency                      # small CPU version (tiny)
  python -m launch.experiments.sample_efficiency --preset=smollm2_135m \
      --base=ckpt/smollm2 --pmp=runs/pmp_smollm2 --ks=1000,3000,7000   # the real one, on a GPU/TPU

For each k: fine-tune a reward model on the first k GSM8K training questions' pairs, once from the
base model and once from the PMP checkpoint, with the same data, seed and schedule; evaluate each
on held-out GSM8K test pairs (pairwise accuracy) and by Best-of-4; write a table (Markdown and
JSON) and a plot of accuracy against k, base against PMP. With `--preset=tiny` the PMP checkpoint
is the demo's (built on first use) and the base is the same tiny model from scratch.
"""
from __future__ import annotations

import json
import math
import pathlib

from absl import app, flags, logging

from codepmp_jax import recipes, train
from codepmp_jax.data.builtin import SHARED_DATA
from codepmp_jax.config import load_config

FLAGS = flags.FLAGS

ARMS = ("base", "pmp")
METRICS = (("pairwise accuracy", ("pairwise", "accuracy")), ("Best-of-4 accuracy", ("bon", "4", "rm")))


def _value(report: dict, keys: tuple[str, ...]) -> float:
  for key in keys:
    report = report[key]
  return float(report)


def write_results(results: dict[int, dict[str, dict]], out: pathlib.Path) -> str:
  """Table and plot of each metric against k for both arms."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ks = sorted(results)
  header = "| k | " + " | ".join(f"{arm} {name}" for name, _ in METRICS for arm in ARMS) + " |"
  lines = [header, "|---:|" + "---:|" * (len(METRICS) * len(ARMS))]
  for k in ks:
    cells = [f"{_value(results[k][arm], keys):.3f}" for _, keys in METRICS for arm in ARMS]
    lines.append(f"| {k} | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  (out / "results.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
  fig, axes = plt.subplots(1, len(METRICS), figsize=(10, 3.8), dpi=120)
  for ax, (name, keys) in zip(axes, METRICS):
    for arm, style in zip(ARMS, ("s--", "o-")):
      ax.plot(ks, [_value(results[k][arm], keys) for k in ks], style, label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("GSM8K training questions (k)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("Sample efficiency of RM fine-tuning: base vs PMP initialization")
  fig.tight_layout()
  fig.savefig(out / "results.png")
  plt.close(fig)
  return table


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing adds none)."""
  flags.DEFINE_enum("preset", "tiny", ["tiny", "smollm2_135m"], "Model family of the experiment.")
  flags.DEFINE_string("out", "runs/sample_efficiency", "Output directory.")
  flags.DEFINE_list("ks", ["128", "512", "2048"], "Numbers of GSM8K training questions.")
  flags.DEFINE_string("base", "", "Base checkpoint (empty: the PMP run's model from scratch).")
  flags.DEFINE_string("pmp", "", "PMP checkpoint (tiny: built here when empty).")
  flags.DEFINE_float("epochs", 3.0, "Passes over the k pairs (at least `min_steps` steps).")
  flags.DEFINE_integer("min_steps", 20, "Fewest fine-tuning steps of any run.")
  flags.DEFINE_float("lr", 1e-3, "Fine-tuning learning rate (tiny; smollm2 uses its config's).")
  flags.DEFINE_integer("eval_questions", 300, "GSM8K test questions for pairwise and Best-of-N.")


def main(argv: list[str]) -> None:
  del argv
  train.quiet_library_logs()
  out = pathlib.Path(FLAGS.out).absolute()
  gsm8k = SHARED_DATA / "gsm8k"
  if FLAGS.preset == "tiny":
    base_config = load_config("tiny")
    pmp = FLAGS.pmp or str(out / "pmp")
    if not FLAGS.pmp:
      base_config.data.path = str(out / "code_pairs")
      recipes.train_once(base_config, out / "pmp")
    lr = FLAGS.lr
  else:
    if not (FLAGS.base and FLAGS.pmp):
      raise app.UsageError("--preset=smollm2_135m needs --base and --pmp checkpoints")
    base_config = load_config("rm_gsm8k_smollm2_135m")
    pmp = FLAGS.pmp
    lr = base_config.optimizer.lr
  candidates = recipes.bon_candidates(gsm8k / "test.jsonl", out / "bon_candidates.jsonl",
                                      FLAGS.eval_questions, n=4)
  results: dict[int, dict[str, dict]] = {}
  for k in sorted(int(k) for k in FLAGS.ks):
    subset = recipes.first_lines(gsm8k / "train.jsonl", out / f"gsm8k_{k}.jsonl", k)
    data = recipes.prepare_once([subset], "gsm8k", pmp, out / f"pairs_{k}",
                                seq_len=base_config.train.seq_len, split="train:0.95,eval:0.05")
    steps = max(FLAGS.min_steps, math.ceil(FLAGS.epochs * k / base_config.train.global_batch))
    results[k] = {}
    for arm, init_from in (("base", FLAGS.base), ("pmp", pmp)):
      workdir = out / f"rm_{arm}_{k}"
      logging.info("k=%d %s: %d steps -> %s", k, arm, steps, workdir)
      recipes.train_once(recipes.rm_config(base_config, data, init_from, pmp, steps, lr), workdir)
      results[k][arm] = recipes.evaluate_rm(
          workdir, workdir / "eval.json", gsm8k_pairs=gsm8k / "test.jsonl", candidates=candidates,
          limit=FLAGS.eval_questions)
  print("\n" + write_results(results, out) + f"\n\nwrote {out}/results.md, results.json, results.png")


if __name__ == "__main__":
  define_flags()
  app.run(main)
