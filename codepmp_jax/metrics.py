"""Training metrics: `metrics.jsonl` and TensorBoard event files in the workdir, a progress bar with
ETA, and the hardware peak FLOP/s that MFU is measured against."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
import tqdm
from absl import logging
from etils import epath

from codepmp_jax import storage
from codepmp_jax.workdir import METRICS as METRICS_FILE

PROGRESS_KEYS = ("loss", "accuracy", "eval/accuracy")

# Dense bf16 peak FLOP/s per chip, matched as lowercase substrings of `device_kind`, first match
# wins (so "tpu v5 lite" comes before "tpu v5", the PCIe/NVL H100s before the SXM one).
PEAK_BF16_FLOPS = (
    (("h100 pcie",), 756e12),
    (("h100 nvl",), 835e12),
    (("h200",), 989e12),
    (("h100",), 989e12),
    (("a100",), 312e12),
    (("tpu v4",), 275e12),
    (("tpu v5 lite", "tpu v5e"), 197e12),
    (("tpu v5p", "tpu v5"), 459e12),
    (("tpu v6 lite", "tpu v6e"), 918e12),
)


def device_peak_flops(device_kind: str | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of one accelerator chip (default: this process's first device).

  None for devices not in the table (CPUs, unknown GPUs): measure those instead
  (`measure_cpu_peak_flops`) rather than guess.
  """
  kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
  for patterns, peak in PEAK_BF16_FLOPS:
    if any(p in kind for p in patterns):
      return peak
  return None


def measure_cpu_peak_flops(sizes: Sequence[int] = (1024, 1536, 2048), repeats: int = 5) -> float:
  """FLOP/s of the fastest `n x n` float32 matmul over `sizes` on the host CPU (best of `repeats`
  each, after a warm-up).

  The CPU has no published peak that XLA can reach, so MFU on CPU is measured against what large
  matmuls achieve in the same process. Several sizes, because one alone can fall off the cache's
  sweet spot: on a 2-core AMD EPYC 1536 reached 207 GFLOP/s and 2048 only 178, below the 183 of
  smollm2_135m's own MLP matmul.
  """
  cpu = jax.devices("cpu")[0]
  matmul = jax.jit(jnp.matmul)
  best = 0.0
  for n in sizes:
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), cpu)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32), cpu)
    matmul(a, b).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a, b).block_until_ready()
      best = max(best, 2.0 * n**3 / (time.perf_counter() - start))
  return best


def _as_float(key: str, value: Any) -> float:
  array = np.asarray(value)
  if array.shape != () or not np.issubdtype(array.dtype, np.number):
    raise ValueError(f"metric {key!r} must be a real scalar, got {array.dtype} of shape {array.shape}")
  return float(array)


def _keep_through_step(path: epath.Path, last_step: int) -> None:
  """Rewrites `path` without the lines of steps after `last_step` (they are redone on resume).

  A torn last line (a kill during a write) is dropped with a warning; a broken line elsewhere is
  an error naming the file and line.
  """
  lines = path.read_text().splitlines()
  kept, dropped = [], 0
  for number, line in enumerate(lines, start=1):
    try:
      step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      if number == len(lines):
        logging.warning("%s:%d: dropping a torn last line (%s)", path, number, e)
        continue
      raise ValueError(f"{path}:{number}: not a metrics line with a 'step' field: {e}") from e
    if step <= last_step:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    logging.info("%s: dropped %d lines after step %d, which the resumed run redoes",
                 path, dropped, last_step)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text("".join(line + "\n" for line in kept))
  tmp.replace(path)


class MetricWriter:
  """Writes scalar metrics of training steps; only process 0 writes, other processes do nothing.

  Each `write(step, values)` call appends one JSON line `{"step": step, key: float, ...}` to
  `<workdir>/metrics.jsonl` (non-finite values as null, so the file stays strict JSON; pass a
  step's train and eval values in one call to keep one line per step) and the same scalars to
  TensorBoard event files in the workdir, and advances a tqdm bar showing loss and accuracy.
  Resuming at `start_step` first removes lines of steps after `start_step`, and tells
  TensorBoard to purge those steps, so a run resumed from an earlier checkpoint has no duplicate
  or stale steps. The workdir may be remote (`gs://`): `storage.LineWriter` then rewrites the file
  whole at each write (object stores cannot append; a few KB per thousand steps).
  """

  def __init__(self, workdir: str | os.PathLike, total_steps: int, start_step: int = 0,
               show_progress: bool = True):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    text = os.fspath(workdir)
    workdir = epath.Path(text if "://" in text else os.path.abspath(text))
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = workdir / METRICS_FILE
    if self._path.exists():
      _keep_through_step(self._path, start_step)
    self._jsonl = storage.LineWriter(self._path)
    # tensorboardX names event files by the second they were opened: without a unique suffix a
    # writer restarted within the same second would overwrite the previous file.
    self._tensorboard = tensorboardX.SummaryWriter(
        logdir=str(workdir), purge_step=start_step + 1 if start_step > 0 else None,
        filename_suffix=f".{time.time_ns()}")
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                          disable=not show_progress)

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    """Logs the scalar `values` of training step `step` (eval values under keys like "eval/accuracy")."""
    if not self.active:
      return
    scalars = {key: _as_float(key, value) for key, value in values.items()}
    if "step" in scalars:
      raise ValueError("'step' is reserved for the step number")
    record = {"step": int(step)}
    record.update({k: v if math.isfinite(v) else None for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in scalars.items():
      self._tensorboard.add_scalar(key, value, global_step=int(step))
    self._tensorboard.flush()
    shown = {k: f"{scalars[k]:.4g}" for k in PROGRESS_KEYS if k in scalars}
    if shown:
      self._bar.set_postfix(shown, refresh=False)
    self.advance(step)

  def advance(self, step: int) -> None:
    """Moves the progress bar (and its ETA) to `step`, for the steps that log nothing."""
    if self.active and step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    """Flushes and closes the files and the progress bar."""
    if not self.active:
      return
    self._jsonl.close()
    self._tensorboard.close()
    self._bar.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
