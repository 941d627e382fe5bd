"""metrics.jsonl and TensorBoard contents, resume behaviour, and the peak-FLOP/s table."""
from __future__ import annotations

import json
import math
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from codepmp_jax import metrics


def _lines(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _events(workdir: pathlib.Path) -> list[event_pb2.Event]:
  """Every event in the workdir's event files, read as TFRecords (TensorBoard's on-disk format)."""
  events = []
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      start = offset + 12  # length, then its masked crc32c
      event = event_pb2.Event()
      event.ParseFromString(data[start:start + length])
      events.append(event)
      offset = start + length + 4  # then the data's masked crc32c
  return events


def _scalars(workdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """tag -> {step: value}, later events overriding earlier ones, and steps purged as TensorBoard does."""
  out: dict[str, dict[int, float]] = {}
  for event in _events(workdir):
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      for series in out.values():
        for step in [s for s in series if s >= event.step]:
          del series[step]
    for value in event.summary.value:
      scalar = value.simple_value if value.HasField("simple_value") else value.tensor.float_val[0]
      out.setdefault(value.tag, {})[event.step] = scalar
  return out


def test_writes_jsonl_and_tensorboard(tmp_path):
  with metrics.MetricWriter(tmp_path, total_steps=10, show_progress=False) as writer:
    writer.write(1, {"loss": 0.5, "accuracy": np.float32(0.25)})
    writer.write(2, {"loss": jnp.asarray(0.4), "eval/accuracy": 0.75, "lr": float("nan")})
  assert _lines(tmp_path) == [
      {"step": 1, "loss": 0.5, "accuracy": 0.25},
      {"step": 2, "loss": pytest.approx(0.4), "eval/accuracy": 0.75, "lr": None}]
  scalars = _scalars(tmp_path)
  assert scalars["loss"] == {1: 0.5, 2: pytest.approx(0.4)}
  assert scalars["eval/accuracy"] == {2: 0.75}
  assert math.isnan(scalars["lr"][2])


def test_rejects_non_scalars(tmp_path):
  with metrics.MetricWriter(tmp_path, total_steps=2, show_progress=False) as writer:
    with pytest.raises(ValueError, match="'loss' must be a real scalar"):
      writer.write(1, {"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(1, {"step": 1.0})


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
  with metrics.MetricWriter(tmp_path, total_steps=6, show_progress=False) as writer:
    for step in range(1, 6):
      writer.write(step, {"loss": float(step)})
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 6, "lo')  # torn by a kill -9
  # Resumed from the checkpoint of step 3: steps 4 and 5 are redone with new values.
  with metrics.MetricWriter(tmp_path, total_steps=6, start_step=3, show_progress=False) as writer:
    for step in range(4, 7):
      writer.write(step, {"loss": 10.0 * step})
  assert _lines(tmp_path) == [{"step": s, "loss": v} for s, v in
                              [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]]
  assert _scalars(tmp_path)["loss"] == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0, 6: 60.0}


def test_broken_line_in_the_middle_is_an_error(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2:"):
    metrics.MetricWriter(tmp_path, total_steps=2, start_step=2, show_progress=False)


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metrics.MetricWriter(tmp_path / "w", total_steps=2)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("NVIDIA GeForce RTX 3090", None), ("cpu", None)])
def test_device_peak_flops_table(kind, peak):
  assert metrics.device_peak_flops(kind) == peak


def test_cpu_has_no_listed_peak_and_a_measured_one():
  assert metrics.device_peak_flops() is None  # tests run on CPU devices
  assert metrics.measure_cpu_peak_flops(sizes=(64, 128), repeats=2) > 0
