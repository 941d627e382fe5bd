"""The paper's central claim: PMP-initialized reward models learn from fewer preference pairs.

  python -m launch.experiments.sample_efficiency                      # small CPU version (tiny)
  python -m launch.experiments.sample_efficiency --preset=smollm2_135m \
      --base=ckpt/smollm2 --pmp=runs/pmp_smollm2 --ks=1000,3000,7000   # the real one, on a GPU/TPU

For each k: fine-tune a reward model on the first k GSM8K training questions' pairs, once from the
base model and once from the PMP checkpoint, with the same data, seed and schedule
(configs/short_rm.py on the preset's config); evaluate each on held-out GSM8K test pairs (pairwise
accuracy) and by Best-of-4; write a table (Markdown and JSON) and a plot of accuracy against k,
base against PMP. With `--preset=tiny` the PMP checkpoint is the demo's (built on first use) and
the base is the same tiny model from scratch.
"""
from __future__ import annotations

import dataclasses
import json
import math

from etils import epath

from absl import logging

from codepmp_jax.config import load_config
from codepmp_jax.data import registry
from launch.experiments import report, settings_flags, stages
from launch.experiments.settings_flags import setting

ARMS = ("base", "pmp")
METRICS = (("pairwise accuracy", ("pairwise", "accuracy")), ("Best-of-4 accuracy", ("bon", "4", "rm")))
# The config each preset fine-tunes (its model shape, batch and sequence length).
PRESET_CONFIGS = {"tiny": "tiny", "smollm2_135m": "rm_gsm8k_smollm2_135m"}


@dataclasses.dataclass(frozen=True)
class SampleEfficiencySettings:
  """The experiment's sizes and checkpoints; the defaults are the small CPU version."""
  preset: str = setting("tiny", f"Model family: {' or '.join(PRESET_CONFIGS)}.")
  out: str = setting("runs/sample_efficiency", "Output directory.")
  ks: tuple[int, ...] = setting((128, 512, 2048), "Numbers of GSM8K training questions.")
  base: str = setting("", "Base checkpoint (empty: the PMP run's model from scratch).")
  pmp: str = setting("", "PMP checkpoint (tiny: the demo's PMP run, built here when empty).")
  epochs: float = setting(3.0, "Passes over the k pairs (at least `min_steps` steps).")
  min_steps: int = setting(20, "Fewest fine-tuning steps of any run.")
  lr: float = setting(0.0, "Fine-tuning lr (0: the preset config's, 1e-3 tiny, 3e-6 smollm2).")
  eval_questions: int = setting(300, "GSM8K test questions for pairwise and Best-of-N.")
  data_dir: str = setting("", "A directory holding gsm8k/ (empty: where `data.registry` finds it).")


def write_results(results: dict[int, dict[str, dict]], out: epath.Path) -> str:
  """Table and plot of each metric against k for both arms."""
  ks = sorted(results)
  header = ["k", *[f"{arm} {name}" for name, _ in METRICS for arm in ARMS]]
  rows = [[k, *[report.lookup(results[k][arm], keys) for _, keys in METRICS for arm in ARMS]]
          for k in ks]
  table = report.to_markdown(header, rows, cell=report.fixed3, align="---:").rstrip("\n")
  (out / "results.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
  fig, axes = report.pyplot().subplots(1, len(METRICS), figsize=(10, 3.8), dpi=120)
  for ax, (name, keys) in zip(axes, METRICS):
    for arm, style in zip(ARMS, ("s--", "o-")):
      ax.plot(ks, [report.lookup(results[k][arm], keys) for k in ks], style, label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("GSM8K training questions (k)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("Sample efficiency of RM fine-tuning: base vs PMP initialization")
  report.save_figure(fig, out / "results.png")
  return table


def run(settings: SampleEfficiencySettings) -> dict[int, dict[str, dict]]:
  """Every fine-tune and evaluation of the experiment; returns {k: {arm: evaluation report}}."""
  if settings.preset not in PRESET_CONFIGS:
    raise ValueError(f"preset {settings.preset!r} is not one of {sorted(PRESET_CONFIGS)}")
  if settings.preset != "tiny" and not (settings.base and settings.pmp):
    raise ValueError(f"preset {settings.preset} needs base and pmp checkpoints")
  out = epath.Path(settings.out)
  gsm8k_train, gsm8k_test = (registry.path(f"gsm8k/{split}", data_dir=settings.data_dir or None)
                             for split in ("train", "test"))
  name = PRESET_CONFIGS[settings.preset]
  base_config = load_config(name)
  pmp = settings.pmp or str(out / "pmp")
  if settings.preset == "tiny" and not settings.pmp:
    base_config.data.path = str(out / "code_pairs")
    stages.train_once(base_config, out / "pmp")
  lr = settings.lr or base_config.optimizer.lr
  candidates = stages.bon_candidates(gsm8k_test, out / "bon_candidates.jsonl",
                                      settings.eval_questions, n=4)
  results: dict[int, dict[str, dict]] = {}
  for k in sorted(settings.ks):
    subset = stages.first_lines(gsm8k_train, out / f"gsm8k_{k}.jsonl", k)
    data = stages.prepare_once([subset], "gsm8k", pmp, out / f"pairs_{k}",
                                seq_len=base_config.train.seq_len, split="train:0.95,eval:0.05")
    steps = max(settings.min_steps, math.ceil(settings.epochs * k / base_config.train.global_batch))
    results[k] = {}
    for arm, init_from in (("base", settings.base), ("pmp", pmp)):
      workdir = out / f"rm_{arm}_{k}"
      logging.info("k=%d %s: %d steps -> %s", k, arm, steps, workdir)
      config = load_config(f"short_rm:base={name},steps={steps},lr={lr!r}")
      config.update(init_from=init_from, tokenizer=pmp)
      config.data.path = str(data)
      stages.train_once(config, workdir)
      results[k][arm] = stages.evaluate_rm(
          workdir, workdir / "eval.json", gsm8k_pairs=gsm8k_test, candidates=candidates,
          limit=settings.eval_questions)
  print("\n" + write_results(results, out) + f"\n\nwrote {out}/results.md, results.json, results.png")
  return results


if __name__ == "__main__":
  settings_flags.run_program(SampleEfficiencySettings, run)
