"""Memory and FLOPs of a training config on N devices, before renting them.

  python -m codepmp_jax.plan --config=configs/pmp_qwen2_7b.py --devices=64 --device_memory=80GiB
  python -m codepmp_jax.plan --config=configs/pmp_qwen2_7b.py --hardware=v5p-64

Lowers and compiles the real train step and eval step for N fake CPU devices with the config's
mesh (with `data.pack`, the packed steps on the one shape the run packs into, derived from the
data's pair sizes as the input pipeline derives it),
from abstract shapes only (nothing the size of the model is allocated), and prints
per-device memory: parameters and optimizer state (from their shardings), and each compiled
program's arguments, outputs and temporaries (XLA's memory analysis), plus FLOPs per step.
`--hardware` names a machine (`HARDWARE`: chips and memory per chip). Try
`--config.model.remat_policy`, `--config.mesh_shape`, `--config.train.microbatches` and
`--config.train.lm_chunk=0` (full LM logits), and for parameter-efficient training
`--config.train.trainable=top:2` or `--config.model.lora.rank=8` (frozen parameters have no
optimizer state), to see what each does to the numbers. XLA's CPU
memory analysis stands in for the accelerator's: the sizes of arguments are exact, temporaries
are what the CPU compiler schedules (a guide, not a promise).
"""
from __future__ import annotations

import os
import sys

# Machines to plan for: name -> (chips, memory per chip). A TPU slice's suffix counts
# TensorCores (v4 and v5p chips have two), so v4-32 is 16 chips and v5p-64 32 chips.
HARDWARE = {
    "v4-32": (16, "32GiB"),
    "v5p-64": (32, "95GiB"),
    "v5p-128": (64, "95GiB"),
    "8xh100": (8, "80GB"),
}

if __name__ == "__main__":  # fake devices must be requested before jax is imported
  _hw = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--hardware=")), "")
  _n = str(HARDWARE[_hw][0]) if _hw in HARDWARE else next(
      (a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_n}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from codepmp_jax import cli, optim, sharding, step
from codepmp_jax.data import packing, pipeline
from codepmp_jax.model import flops, transformer
from codepmp_jax.model.config import ModelConfig

_UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
          "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


@dataclasses.dataclass
class Plan:
  devices: int
  mesh_shape: tuple[int, ...]
  params_bytes: float  # per device
  optimizer_bytes: float  # per device
  argument_bytes: float  # per device, from the compiled program
  output_bytes: float
  temp_bytes: float
  eval_argument_bytes: float  # the eval step's (params + one eval batch)
  eval_temp_bytes: float
  flops_per_step: float  # model FLOPs (6N + attention), whole step, all devices
  compiled_flops: float | None  # XLA's count for one device's program
  trainable_params: int = 0  # parameters that train (`train.trainable`, LoRA), whole model
  total_params: int = 0  # all parameters, LoRA adapters included

  @property
  def peak_bytes(self) -> float:
    """State lives across steps; the donated outputs alias it, temporaries come on top."""
    return self.argument_bytes + self.temp_bytes

  @property
  def eval_peak_bytes(self) -> float:
    """Evaluation runs beside the train state (optimizer state included), which stays resident."""
    return self.argument_bytes + self.eval_temp_bytes + (self.eval_argument_bytes - self.params_bytes)


def parse_bytes(text: str) -> float:
  """'16GiB' -> 17179869184.0; '80GB' -> 8e10."""
  match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B|)\s*", text)
  if not match:
    raise ValueError(f"cannot read a memory size from {text!r} (examples: 16GiB, 80GB)")
  return float(match.group(1)) * _UNITS[match.group(2)]


def _format_bytes(n: float) -> str:
  for unit in ("TiB", "GiB", "MiB", "KiB"):
    if n >= _UNITS[unit]:
      return f"{n / _UNITS[unit]:.2f} {unit}"
  return f"{n:.0f} B"


def _per_device_bytes(abstract: Any, shardings: Any) -> float:
  total = 0.0
  for leaf, shard in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += math.prod(shard.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def plan(config: ml_collections.ConfigDict, model_config: ModelConfig) -> Plan:
  """Compiles the config's train step on the current (fake) devices and reads off its costs."""
  mesh = sharding.make_mesh(config.mesh_shape)
  rules = sharding.rules_from_config(config.logical_rules)
  tc = config.train
  optimizer = optim.make_optimizer(config.optimizer, tc.total_steps or 1000, tc.trainable)
  abstract, state_sharding = step.state_shardings(model_config, optimizer, mesh, rules)
  batch_sharding = step.batch_shardings(mesh, rules)

  def batch_of(split, pairs, microbatches):
    if config.data.pack:  # the shape the run packs every step into (`pipeline.packed_shape`)
      shapes = pipeline.packed_shape(
          config.data, split=split, global_batch=pairs, seq_len=tc.seq_len, seed=config.seed,
          row_multiple=microbatches, sharding=batch_sharding["input_ids"]
      ).array_shapes(config.data.pack_pairs_per_row)
    else:  # one pair a row, at the longest bucket
      shapes = packing.PackedShape.pair_rows(pairs, tc.seq_len).array_shapes(1)
    floats = ("margin", "pair_valid")
    return {k: jax.ShapeDtypeStruct(s, jnp.float32 if k in floats else jnp.int32,
                                    sharding=batch_sharding[k]) for k, s in shapes.items()}

  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, state_sharding)
  model = transformer.RewardModel(model_config)
  eval_microbatches = tc.eval_microbatches or tc.microbatches
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = step.jit_train_step(
        step.make_train_step(model, optimizer, config.loss, tc.microbatches, tc.lm_chunk,
                             tc.trainable),
        state_sharding, batch_sharding, mesh)
    compiled = train_step.lower(state, batch_of("train", tc.global_batch, tc.microbatches)).compile()
    eval_step = step.jit_eval_step(
        step.make_eval_step(model, config.loss, eval_microbatches, tc.lm_chunk),
        state_sharding.params, batch_sharding, mesh)
    eval_memory = eval_step.lower(state.params, batch_of("eval", tc.eval_batch or tc.global_batch,
                                                         eval_microbatches)
                                  ).compile().memory_analysis()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  sizes = [math.prod(a.shape) for a in jax.tree.leaves(abstract.params)]
  trains = jax.tree.leaves(optim.trainable_mask(abstract.params, tc.trainable))
  return Plan(
      devices=jax.device_count(), mesh_shape=tuple(mesh.devices.shape),
      params_bytes=_per_device_bytes(abstract.params, state_sharding.params),
      optimizer_bytes=_per_device_bytes(abstract.opt_state, state_sharding.opt_state),
      argument_bytes=float(memory.argument_size_in_bytes),
      output_bytes=float(memory.output_size_in_bytes),
      temp_bytes=float(memory.temp_size_in_bytes),
      eval_argument_bytes=float(eval_memory.argument_size_in_bytes),
      eval_temp_bytes=float(eval_memory.temp_size_in_bytes),
      flops_per_step=flops.pair_step_flops(model_config, tc.global_batch, tc.seq_len,
                                           lm_loss=config.loss.lm_coef != 0),
      compiled_flops=(cost or {}).get("flops"),
      trainable_params=sum(n for n, t in zip(sizes, trains) if t), total_params=sum(sizes))


def format_plan(p: Plan, device_memory: float | None) -> str:
  rows = [
      ("devices / mesh (data, fsdp, tensor)", f"{p.devices} / {p.mesh_shape}"),
      ("parameters per device", _format_bytes(p.params_bytes)),
      ("trainable parameters", f"{p.trainable_params:,} of {p.total_params:,}"
                               f" ({p.trainable_params / max(1, p.total_params):.2%})"),
      ("optimizer state per device", _format_bytes(p.optimizer_bytes)),
      ("program arguments per device", _format_bytes(p.argument_bytes)),
      ("program outputs per device (donated)", _format_bytes(p.output_bytes)),
      ("temporaries per device", _format_bytes(p.temp_bytes)),
      ("peak per device (arguments + temporaries)", _format_bytes(p.peak_bytes)),
      ("eval step temporaries per device", _format_bytes(p.eval_temp_bytes)),
      ("eval peak per device (train state + eval batch + temporaries)", _format_bytes(p.eval_peak_bytes)),
      ("model FLOPs per step", f"{p.flops_per_step:.3e}"),
      ("compiled FLOPs per device (XLA counts a loop body once)", "n/a" if p.compiled_flops is None else f"{p.compiled_flops:.3e}"),
  ]
  if device_memory:
    for name, peak in (("train", p.peak_bytes), ("eval", p.eval_peak_bytes)):
      verdict = "fits" if peak <= device_memory else "does NOT fit"
      rows.append((f"{name} step in device memory {_format_bytes(device_memory)}", verdict))
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing adds none)."""
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_integer("devices", 8, "Number of (fake) devices to plan for.")
  flags.DEFINE_string("device_memory", "", "Memory of one device, e.g. 16GiB or 80GB.")
  flags.DEFINE_enum("hardware", "", [""] + list(HARDWARE),
                    "A machine from HARDWARE: sets --devices and --device_memory.")
  flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size when the config takes it from the tokenizer.")
  flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  del argv
  config = FLAGS.config
  fields = config.model.to_dict()
  fields["vocab_size"] = fields["vocab_size"] or FLAGS.vocab_size
  devices, device_memory = HARDWARE.get(FLAGS.hardware, (FLAGS.devices, FLAGS.device_memory))
  if jax.device_count() != devices:
    raise SystemExit(f"planning for {devices} devices but jax sees {jax.device_count()}; "
                     "run as `python -m codepmp_jax.plan` so the fake devices are set up first")
  result = plan(config, ModelConfig.from_dict(fields))
  print(format_plan(result, parse_bytes(device_memory) if device_memory else None))


if __name__ == "__main__":
  cli.run(main, define_flags)
