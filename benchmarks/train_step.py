"""One PMP training step (Bradley-Terry + chosen-response LM loss, AdamW): our jitted step against
the PyTorch peer a researcher would otherwise write, on the same batch, shape, dtype and threads.

  python -m benchmarks.train_step                                  # CPU: tiny, smollm2_135m
  python -m benchmarks.train_step --shapes=qwen2_0_5b,qwen2_1_5b   # GPU: bf16, seq 1024

Ours: `codepmp_jax.step` (one jit, donated state) on a one-device mesh, on the pairs one a row
(`ours`: `data.packing.pair_rows`, the unpacked layout) and on the same pairs packed (`packed`: `data.packing.pack_batch` into rows of up to
2 * seq_len, each pair's shared prompt laid out once, as the paper configs train). Peer: a transformers
`*ForSequenceClassification` of the same shape (random init, SDPA attention) whose backbone hidden
states feed both the `score` head (reward at length - 1) and an LM head (the tied embedding, or an
untied Linear), loss = BT + token-mean cross-entropy on the chosen response (TRL/CodePMP), with
gradient clipping and torch.optim.AdamW without decay on norms and biases, as the HF Trainer does.
Mixed precision is the same on both sides: float32 parameters and optimizer state, `--dtype`
compute (torch.autocast). Data: random full-length pairs (`synthetic_pairs`, no TensorFlow),
each pair's two sequences sharing their first half (the prompt), as real pairs do.
The peer runs first and frees its memory before ours runs (interleaving their steps
lets each runtime's spinning threads slow the other). MFU is against a float32 matmul peak
measured in the same run on CPU, and against the chip's bf16 peak on GPU, of the FLOPs each side
computes (`packed` computes less: `flops.packed_step_flops`).
"""
from __future__ import annotations

import os

# JAX must not take the GPU's memory up front: the PyTorch peer runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app, flags

from benchmarks import common
from codepmp_jax import cli, metrics, optim, sharding, step
from codepmp_jax.data import packing
from codepmp_jax.data.encode import PairArrays
from codepmp_jax.model import flops as flops_lib
from codepmp_jax.model import transformer
from codepmp_jax.model.config import ModelConfig, get_preset, resolve_attention

CPU_SHAPES = ("tiny", "smollm2_135m")
GPU_SHAPES = ("qwen2_0_5b", "qwen2_1_5b")
SIDES = ("peer", "ours", "packed")
LOSS = ml_collections.ConfigDict(dict(
    rm_coef=1.0, lm_coef=1.0, center_coef=0.0, loss_type="sigmoid", use_margin=False))
Batch = dict[str, np.ndarray]


def synthetic_pairs(config: ModelConfig, pairs: int, seq_len: int) -> PairArrays:
  """Random full-length pairs whose two sequences share their first half (the prompt); the
  responses are the second halves."""
  rng = np.random.default_rng(0)
  prompt = seq_len // 2
  chosen = rng.integers(0, config.vocab_size, (pairs, seq_len), dtype=np.int32)
  rejected = np.concatenate([chosen[:, :prompt], rng.integers(
      0, config.vocab_size, (pairs, seq_len - prompt), dtype=np.int32)], axis=1)
  return PairArrays.from_lengths(np.stack([chosen, rejected], axis=1).reshape(-1),
                                 np.full((pairs, 2), seq_len), np.full((pairs, 2), prompt),
                                 np.zeros(pairs, np.float32))


def packed_synthetic_batch(config: ModelConfig, pairs: PairArrays, seq_len: int) -> Batch:
  """`pairs` packed into rows of up to `2 * seq_len`, each shared prompt laid out once."""
  return packing.pack_batch(pairs, row_len=2 * seq_len, max_pairs_per_row=8,
                            pad_id=config.pad_token_id or 0, share_prompt=True).batch


def batch_flops(config: ModelConfig, batch: Batch) -> float:
  """Model FLOPs of one step on `batch` as our step computes it."""
  _, slots, sequence_len = batch["sequence_index"].shape
  rows, row_len = batch["input_ids"].shape
  return flops_lib.packed_step_flops(config, rows, row_len, batch["lm_index"].shape[1], slots,
                                     sequence_len, lm_loss=True)


def _optimizer_config() -> ml_collections.ConfigDict:
  cfg = optim.default_optimizer_config()
  cfg.schedule = "constant"
  cfg.warmup_ratio = 0.0
  return cfg


class Ours:
  """Our jitted train step on one device, on a padded or a packed batch; `step()` runs one step
  and waits for it."""

  def __init__(self, config: ModelConfig, batch: Batch):
    self.mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    optimizer = optim.make_optimizer(_optimizer_config(), total_steps=1000)
    _, state_sharding = step.state_shardings(config, optimizer, self.mesh, rules)
    batch_sharding = step.batch_shardings(self.mesh, rules)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
      params = jax.jit(lambda: nn.unbox(transformer.init_params(config, jax.random.key(0))),
                       out_shardings=state_sharding.params)()
      opt_state = jax.jit(optimizer.init, out_shardings=state_sharding.opt_state)(params)
      self.state = step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
      self.batch = jax.device_put(batch, batch_sharding)
      train_step = step.jit_train_step(step.make_train_step(transformer.RewardModel(config), optimizer, LOSS),
                                       state_sharding, batch_sharding, self.mesh)
      start = time.perf_counter()
      self.compiled = train_step.lower(self.state, self.batch).compile()
      self.compile_seconds = time.perf_counter() - start

  def step(self) -> float:
    self.state, out = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, out))  # the optimizer update too, not just the metrics
    return float(out["loss"])

  def profile(self, trace_dir: str) -> list[tuple[float, float, str]]:
    """Traces one step and returns its per-op breakdown (see `common.op_breakdown`)."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      self.step()
    return common.op_breakdown(trace_dir, self.compiled.as_text())

  def close(self) -> None:
    del self.state, self.batch, self.compiled


class Peer:
  """The transformers + torch.optim.AdamW step; `step()` runs one step and waits for it."""

  def __init__(self, config: ModelConfig, pairs: PairArrays, dtype: str, remat: bool):
    import torch
    import transformers

    self.torch = torch
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model_cls = {"llama": transformers.LlamaForSequenceClassification,
                 "qwen2": transformers.Qwen2ForSequenceClassification,
                 "mistral": transformers.MistralForSequenceClassification}[config.architecture]
    hf = common.hf_config(config)
    hf._attn_implementation = "sdpa"
    with self.device:  # initialised where it runs: a 1.5B model's init on the host takes minutes
      self.model = model_cls(hf).train()
    if remat:
      self.model.gradient_checkpointing_enable()
    if config.tie_word_embeddings:
      self.lm_head = lambda h: torch.nn.functional.linear(h, self.model.model.embed_tokens.weight)
      extra = []
    else:
      head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=self.device)
      torch.nn.init.normal_(head.weight, std=0.02)
      self.lm_head, extra = head, [("lm_head.weight", head.weight)]
    named = list(self.model.named_parameters()) + extra
    self.params = [p for _, p in named]
    no_decay = [p for n, p in named if n.endswith("bias") or "norm" in n]
    decay = [p for n, p in named if not (n.endswith("bias") or "norm" in n)]
    opt = _optimizer_config()
    cuda = self.device.type == "cuda"
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps, fused=cuda, foreach=not cuda)
    self.grad_clip = opt.grad_clip
    self.autocast = dict(device_type=self.device.type, dtype=getattr(torch, dtype),
                         enabled=dtype != "float32")
    self.set_batch(pairs, config.pad_token_id or 0)

  def set_batch(self, pairs: PairArrays, pad_id: int) -> None:
    """The pairs the next steps train on, each sequence right-padded in its own row (chosen,
    rejected, chosen, ...), moved to the device once."""
    torch = self.torch
    length = int(pairs.lengths.max())
    ids, lengths, lm_mask = pairs.sequence_rows(length, pad_id)
    as_tensor = lambda x: torch.from_numpy(x).to(self.device)  # noqa: E731
    self.ids = as_tensor(ids).long()
    self.mask = as_tensor((np.arange(length)[None] < lengths[:, None]).astype(np.int64))
    chosen = self.ids[0::2]
    labels = chosen.masked_fill(as_tensor(lm_mask[0::2]) == 0, -100)
    self.lm_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    self.last = self.mask.sum(-1) - 1

  def step(self) -> float:
    torch, F = self.torch, self.torch.nn.functional
    with torch.autocast(**self.autocast):
      hidden = self.model.model(input_ids=self.ids, attention_mask=self.mask).last_hidden_state
      rewards = self.model.score(hidden[torch.arange(hidden.shape[0], device=self.device), self.last])
      rewards = rewards[:, 0].float()
      bt = -F.logsigmoid(rewards[0::2] - rewards[1::2]).mean()
      logits = self.lm_head(hidden[0::2])
    lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), self.lm_labels, ignore_index=-100)
    loss = bt + lm
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
    self.optimizer.step()
    value = float(loss.detach())  # waits for the device
    return value

  def close(self) -> None:
    del self.model, self.optimizer, self.params, self.lm_head
    if self.device.type == "cuda":
      self.torch.cuda.empty_cache()


def _timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
  import torch
  return (torch.OutOfMemoryError, jax.errors.JaxRuntimeError)


def measure_shape(shape: str, args: flags.FlagValues, platform: str) -> dict[str, Any]:
  """Step times (median) of ours and the peer at one shape, and the peak FLOP/s for MFU (`args`:
  the parsed flags)."""
  overrides = dict(common.parse_overrides(args.model))
  config = resolve_attention(get_preset(shape, dtype=args.dtype, param_dtype="float32",
                                        remat_policy="full" if args.remat else "none", **overrides),
                             platform)
  pairs = synthetic_pairs(config, args.pairs, args.seq_len)
  batch = packing.pair_rows(pairs, args.seq_len, config.pad_token_id or 0)
  packed = packed_synthetic_batch(config, pairs, args.seq_len)
  makers = {"ours": lambda: Ours(config, batch), "packed": lambda: Ours(config, packed),
            "peer": lambda: Peer(config, pairs, args.dtype, args.remat)}
  sides = [s for s in SIDES if s in args.sides]
  times: dict[str, list[float]] = {s: [] for s in sides}
  failed: dict[str, str] = {}
  notes: list[str] = []

  def build(side):
    try:
      runner = makers[side]()
      for _ in range(args.warmup):
        runner.step()
      return runner
    except _out_of_memory_errors() as e:
      failed[side] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
      return None

  def finish(side, runner):
    if side != "peer":
      notes.append(f"{side}: compile {runner.compile_seconds:.1f} s")
      if args.profile:
        breakdown = runner.profile(os.path.join(args.profile, shape))
        notes.append(f"{side}: where one step's op time goes ({shape}):\n" + common.format_table(
            ("ms", "share", "op"), [(ms, f"{share:.1%}", op[:110]) for ms, share, op in breakdown]))
    runner.close()

  # One side at a time, also on CPU: interleaved steps let each runtime's idle-spinning threads
  # slow the other's next step (on 2 cores our step measured 16.5 s interleaved, 12.8 s alone).
  # On GPU this also means both models and optimizers never need to fit at once.
  for side in sides:
    runner = build(side)
    if runner is not None:
      for _ in tqdm.trange(args.steps, desc=f"{shape} {side}", leave=False):
        times[side].append(_timed(runner.step))
      finish(side, runner)
  peak = metrics.measure_cpu_peak_flops(repeats=3) if platform == "cpu" else metrics.device_peak_flops()
  pair_flops = batch_flops(config, batch)  # the peer computes the same per sequence
  flops = {"peer": pair_flops, "ours": pair_flops, "packed": batch_flops(config, packed)}
  notes.append(f"packed: {packed['input_ids'].shape[0]} rows x {packed['input_ids'].shape[1]} "
               f"tokens, {packing.packing_efficiency(packed):.1%} of them real")
  return {"times": {s: statistics.median(t) for s, t in times.items() if t}, "failed": failed,
          "peak": peak, "config": config, "notes": notes, "flops": flops}


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The benchmark's sizes, with this platform's defaults (defined only when run as a program)."""
  on_cpu = jax.default_backend() == "cpu"
  shapes = CPU_SHAPES if on_cpu else GPU_SHAPES
  flags.DEFINE_list("shapes", list(shapes), "Comma-separated model presets (default: "
                    f"{','.join(CPU_SHAPES)} on CPU, {','.join(GPU_SHAPES)} on accelerators).")
  flags.DEFINE_integer("steps", 3, "Timed steps per side (the median is reported).")
  flags.DEFINE_integer("warmup", 1, "Untimed steps per side after compiling.")
  flags.DEFINE_integer("pairs", 4, "Pairs per step (2 sequences each).")
  flags.DEFINE_integer("seq_len", 256 if on_cpu else 1024, "Tokens per sequence (default: 256 on "
                       "CPU, 1024 on accelerators).")
  flags.DEFINE_enum("dtype", "float32" if on_cpu else "bfloat16", ("float32", "bfloat16"),
                    "Compute dtype; parameters stay float32 (default: float32 on CPU, bfloat16 on "
                    "accelerators).")
  flags.DEFINE_bool("remat", False, "Recompute each layer in the backward pass (ours: "
                    "remat_policy=full; peer: gradient checkpointing).")
  flags.DEFINE_list("sides", list(SIDES), f"Which of {','.join(SIDES)} to run.")
  flags.DEFINE_multi_string("model", [], "FIELD=VALUE: a ModelConfig override applied to both "
                            "sides, e.g. --model=num_layers=4 (repeatable).")
  flags.DEFINE_string("profile", "", "DIR: also trace one step of ours into DIR and print its "
                      "per-op breakdown.")
  flags.DEFINE_string("out", "", "Also write the table to this file.")
  flags.DEFINE_bool("dry_run", False, "Print what would be measured (shapes, FLOPs, parameters) "
                    "and stop.")


def check_flags(argv: list[str]) -> list[str]:
  """The shapes to measure, after checking every flag (a bad one is a usage error)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  shapes = [s for s in FLAGS.shapes if s]
  unknown = sorted(set(s for s in FLAGS.sides if s) - set(SIDES))
  if unknown:
    raise app.UsageError(f"--sides: unknown {unknown}; use any of {','.join(SIDES)}")
  for shape in shapes:
    try:
      get_preset(shape)
    except ValueError as e:
      raise app.UsageError(f"--shapes: {e}") from None
  try:
    common.parse_overrides(FLAGS.model)
  except ValueError as e:
    raise app.UsageError(f"--model: {e}") from None
  if FLAGS.steps < 1 or FLAGS.pairs < 1 or FLAGS.seq_len < 2:
    raise app.UsageError("--steps and --pairs must be at least 1, --seq_len at least 2")
  return shapes


def main(argv: list[str]) -> None:
  """Times both sides at every shape (or, with --dry_run, prints what would be) and the table."""
  shapes = check_flags(argv)
  platform = jax.default_backend()
  import torch

  threads = os.cpu_count()
  if platform == "cpu":
    torch.set_num_threads(threads)  # XLA's CPU client uses one thread per core as well
  device = jax.devices()[0].device_kind
  lines = [f"train_step: {platform} ({device}), {FLAGS.dtype}, {FLAGS.pairs} pairs x {FLAGS.seq_len} "
           f"tokens, median of {FLAGS.steps} steps after {FLAGS.warmup} warm-up; threads: torch "
           f"{torch.get_num_threads()}, XLA {threads}; jax {jax.__version__}, torch {torch.__version__}"]
  if FLAGS.dry_run:
    for shape in shapes:
      config = get_preset(shape, **dict(common.parse_overrides(FLAGS.model)))
      lines.append(f"{shape}: {flops_lib.count_params(config) / 1e6:.1f}M parameters, "
                   f"{common.pmp_step_flops(config, FLAGS.pairs, FLAGS.seq_len) / 1e9:.1f} model GFLOP per step")
    print("\n".join(lines))
    return
  rows, ratios = [], []
  for shape in shapes:
    result = measure_shape(shape, FLAGS, platform)
    flops = result["flops"]["peer"]
    tokens = 2 * FLAGS.pairs * FLAGS.seq_len
    for side in SIDES:
      if side in result["failed"]:
        rows.append((shape, side, "failed", "", "", "", result["failed"][side]))
      elif side in result["times"]:
        seconds = result["times"][side]
        mfu = ("n/a" if result["peak"] is None else
               f"{result['flops'][side] / seconds / result['peak']:.1%}")
        rows.append((shape, side, seconds, FLAGS.pairs / seconds, tokens / seconds, mfu, ""))
    lines += result["notes"]
    if result["peak"] is None:
      peak = f"no bf16 peak known for {device!r}, so no MFU"
    else:
      kind = "measured fp32 matmul peak" if platform == "cpu" else "bf16 peak"
      peak = f"{kind} {result['peak'] / 1e12:.3g} TFLOP/s"
    lines.append(f"{shape}: {flops / 1e9:.1f} model GFLOP per step; {peak}")
    for side in ("ours", "packed"):
      if {side, "peer"} <= set(result["times"]):
        ratios.append(f"ratio ({side}/peer) {shape}: "
                      f"{result['times']['peer'] / result['times'][side]:.2f}x")
  table = common.format_table(("shape", "side", "step s", "pairs/s", "tokens/s", "MFU", "note"), rows)
  report = "\n".join(lines + ["", table, ""] + ratios)
  print(report)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(report + "\n")


if __name__ == "__main__":
  cli.run(main, define_flags)
