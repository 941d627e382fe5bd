"""Memory and start-up of the data path as the data set grows: prepare, the pipeline, a short training run.

For each size (pairs of synthetic texts, 20-80 words a side: prompt, chosen and rejected) it runs,
each in a fresh process under `/usr/bin/time -v` (peak RSS is the kernel's count, independent of
machine load):
  prepare   python -m codepmp_jax.data.prepare on the JSONL (1 process)
  pipeline  build the train iterator on the prepared directory and take its first batch
            (start-up = build + first batch), then time `--batches` more
  train     python -m codepmp_jax.train --config=configs/tiny.py, 3 steps on the prepared data
and prints a table with the extra peak memory per extra pair against the smallest size. The loader's
pairs/s is set against what one qwen2_1_5b PMP step consumes on a v4 host (4 chips at 50% MFU,
seq_len 1024, `model/flops.py`).

  python -m benchmarks.data_scale [--sizes=20000,400000] [--workdir=/tmp/data_scale] [--skip_train]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np

from codepmp_jax.model import flops
from codepmp_jax.model.config import get_preset

ROOT = pathlib.Path(__file__).resolve().parents[1]
V4_PEAK = 275e12  # bf16 FLOP/s of one TPU v4 chip
CHIPS_PER_HOST = 4
SEQ_LEN = 256
WORDS = [f"{a}{b}" for a in ("x", "def", "val", "run", "get", "set", "obj", "ret", "for", "if")
         for b in ("", "_id", "_list", "_map", "s", "_x", "_y", "_n", "_key", "2", "_at", "_to")]

_PIPELINE = """
import json, sys, time
t0 = time.perf_counter()
from codepmp_jax.data import pipeline
t_import = time.perf_counter()
cfg = pipeline.default_data_config()
cfg.update(path=sys.argv[1], bucket=True, prefetch=0)
it = pipeline.build_pipeline(cfg, split="train", global_batch=64, seq_len=%d, sharding=None, seed=0,
                             repeat=True)
next(it)
t_first = time.perf_counter()
for _ in range(int(sys.argv[2])):
  next(it)
t_end = time.perf_counter()
print(json.dumps({"startup_s": t_first - t_import, "pairs_per_s": 64 * int(sys.argv[2]) / (t_end - t_first)}))
""" % SEQ_LEN


def write_pairs(path: pathlib.Path, n: int, seed: int = 0) -> None:
  """`n` pairs of random words, 20-80 words per text (written under a temporary name, then renamed,
  so an interrupted run leaves no short file that a rerun would take as complete)."""
  rng = np.random.default_rng(seed)
  words = np.array(WORDS)
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "w") as f:
    for start in range(0, n, 10000):
      m = min(10000, n - start)
      lengths = rng.integers(20, 81, (m, 3))
      ids = rng.integers(0, len(words), lengths.sum())
      texts = iter(" ".join(words[ids[a:b]]) for a, b in zip(np.r_[0, np.cumsum(lengths)[:-1]],
                                                             np.cumsum(lengths)))
      for i in range(m):
        prompt, chosen, rejected = next(texts), next(texts), next(texts)
        f.write(json.dumps({"prompt": f"{start + i}: {prompt}", "chosen": chosen,
                            "rejected": rejected}) + "\n")
  os.replace(tmp, path)


def timed(cmd: list[str], cwd: pathlib.Path = ROOT) -> tuple[float, float, str]:
  """(peak RSS in MB, wall seconds, stdout) of `cmd` run under /usr/bin/time -v."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  start = time.perf_counter()
  result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=cwd,
                          env=env)
  elapsed = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
  rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
  return rss_kb / 1024, elapsed, result.stdout


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="20000,400000", help="comma-separated numbers of pairs")
  p.add_argument("--workdir", default="/tmp/data_scale")
  p.add_argument("--batches", type=int, default=50, help="batches timed after the first")
  p.add_argument("--skip_train", action="store_true")
  args = p.parse_args()
  work = pathlib.Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  tokenizer = work / "spm.model"
  if not tokenizer.exists():
    write_pairs(work / "tok.jsonl", 2000, seed=99)
    from codepmp_jax.data.tokenizer import train_sentencepiece
    texts = (" ".join(json.loads(line).values()) for line in open(work / "tok.jsonl"))
    train_sentencepiece(texts, 400, work / "spm")
  rows = []
  for n in [int(s) for s in args.sizes.split(",")]:
    jsonl = work / f"pairs-{n}.jsonl"
    if not jsonl.exists():
      write_pairs(jsonl, n)
    out = work / f"prepared-{n}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    prep_mb, prep_s, _ = timed([sys.executable, "-m", "codepmp_jax.data.prepare", f"--input={jsonl}",
                                "--format=pairs", f"--tokenizer={tokenizer}", f"--seq_len={SEQ_LEN}",
                                f"--out={out}", "--split=train:0.98,eval:0.02", "--num_workers=1"])
    pipe_mb, _, stdout = timed([sys.executable, "-c", _PIPELINE, str(out), str(args.batches)])
    pipe = json.loads(stdout.splitlines()[-1])
    train_mb = float("nan")
    if not args.skip_train:
      train_mb, _, _ = timed([
          sys.executable, "-m", "codepmp_jax.train", "--config=configs/tiny.py",
          f"--workdir={work / f'run-{n}'}", "--config.data.builtin.name=", f"--config.data.path={out}",
          "--config.train.total_steps=3", "--config.train.eval_every=0", "--config.train.log_every=1",
          "--config.checkpoint.save_every=1000"])
      subprocess.run(["rm", "-rf", str(work / f"run-{n}")], check=True)
    rows.append({"pairs": n, "prepare_mb": prep_mb, "prepare_s": prep_s, "pipeline_mb": pipe_mb,
                 "startup_s": pipe["startup_s"], "pairs_per_s": pipe["pairs_per_s"], "train_mb": train_mb})

  step = flops.pair_step_flops(get_preset("qwen2_1_5b"), 1, 1024, lm_loss=True)
  need = CHIPS_PER_HOST * 0.5 * V4_PEAK / step
  base = rows[0]
  print(f"synthetic pairs of 20-80 words a side, seq_len {SEQ_LEN}; peak RSS from /usr/bin/time -v")
  print("| pairs | prepare peak MB | prepare s | KB/extra pair | pipeline peak MB | start-up s "
        "| KB/extra pair | 3-step train peak MB | KB/extra pair | loader pairs/s |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    extra = r["pairs"] - base["pairs"]
    per = (lambda key: f"{(r[key] - base[key]) * 1024 / extra:.3f}" if extra else "-")
    print(f"| {r['pairs']} | {r['prepare_mb']:.0f} | {r['prepare_s']:.1f} | {per('prepare_mb')} "
          f"| {r['pipeline_mb']:.0f} | {r['startup_s']:.2f} | {per('pipeline_mb')} "
          f"| {r['train_mb']:.0f} | {per('train_mb')} | {r['pairs_per_s']:.0f} |")
  print(f"a v4 host (4 chips, 50% MFU) consumes {need:.1f} qwen2_1_5b pairs/s at seq_len 1024; "
        f"the loader gave {rows[-1]['pairs_per_s'] / need:.0f}x that at seq_len {SEQ_LEN} on this CPU")


if __name__ == "__main__":
  main()
