"""Reward server under load: N concurrent clients of `codepmp_jax.serve` for a fixed time, against
sequential `RewardScorer` scoring of the same requests in the same run.

  python -m benchmarks.serve_load                      # tiny, 256 GSM8K items, 8 clients, 10 s
  python -m benchmarks.serve_load --clients=32 --seconds=30 --items_per_request=16 --max_length=512

Items: GSM8K test questions and reference solutions (`../shared/data/gsm8k/test.jsonl`) as
{"prompt", "response"}, scored with the math prompt format by a random model (a sentencepiece
tokenizer trained on them); they are cut into requests of --items_per_request items, the same
requests for both sides.
- sequential: one `RewardScorer` in this process scores the requests one after another (as one
  client without a server would), in passes over the list until --seconds have passed; each
  request's time is its latency. For reference, `offline` scores every item in one call.
- server: `python -m codepmp_jax.serve` in a subprocess with the same batch size and max length;
  --clients clients (one asyncio loop here) each post the requests in turn from their own offset
  to /score until --seconds have passed; a request's latency is from send to reply.
Both sides first score every request once untimed (every length bucket compiles), and the scorer
runs before the server starts, so the two do not share the CPU. Printed: items/s and p50/p99
request latency per side, the throughput ratio (server / sequential), and the largest difference
between the server's and the scorer's rewards of the same items (must be under 1e-5).
"""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import pathlib
import platform
import tempfile
import time

import aiohttp
import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from codepmp_jax import checkpoint, cli, serve
from codepmp_jax.data import registry, templates
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset
from codepmp_jax.score import RewardScorer

REWARD_TOLERANCE = 1e-5
HTTP_TIMEOUT_S = 300

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The benchmark's sizes (defined only when run as a program)."""
  flags.DEFINE_string("shape", "tiny", "Model preset (vocab_size is set to the tokenizer's).")
  flags.DEFINE_integer("num_items", 256, "GSM8K items (prompt, response) in the requests.")
  flags.DEFINE_integer("items_per_request", 8, "Items per request.")
  flags.DEFINE_integer("clients", 8, "Concurrent clients of the server.")
  flags.DEFINE_float("seconds", 10.0, "Timed seconds per side.")
  flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass (both sides).")
  flags.DEFINE_integer("max_length", 256, "Tokens per sequence (both sides).")
  flags.DEFINE_integer("vocab_size", 2000, "Sentencepiece pieces.")


def gsm8k_items(num_items: int) -> list[tuple[str, str]]:
  """(question, reference solution) of the first GSM8K test records."""
  out = []
  with open(registry.path("gsm8k/test"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      out.append((record["question"], record["answer"]))
      if len(out) == num_items:
        break
  return out


def sequential(scorer: RewardScorer, requests: list[list[tuple[str, str]]], seconds: float
               ) -> tuple[list[float], int, float, list[np.ndarray]]:
  """(latencies, items, elapsed s, each request's rewards): the requests scored one after another,
  in turn, until `seconds` have passed (after one untimed pass)."""
  score = lambda request: scorer.score_texts([templates.render("math", question=q) for q, _ in request],  # noqa: E731
                                             [a for _, a in request])
  rewards = [score(request) for request in requests]
  latencies, items, turn = [], 0, 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    request = requests[turn % len(requests)]
    sent = time.perf_counter()
    score(request)
    latencies.append(time.perf_counter() - sent)
    items, turn = items + len(request), turn + 1
  return latencies, items, time.perf_counter() - start, rewards


async def load(url: str, requests: list[list[tuple[str, str]]], clients: int, seconds: float
               ) -> tuple[list[float], int, float, list[np.ndarray], list[str]]:
  """(latencies, items, elapsed s, each request's rewards, errors): `clients` clients posting the
  requests to /score in turn (client c from request c * len / clients) until `seconds` have passed,
  after one untimed pass of every request."""
  bodies = [{"items": [{"prompt": q, "response": a} for q, a in request]} for request in requests]
  timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
  async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

    async def post(body: dict) -> dict:
      async with session.post(url + "/score", json=body) as reply:
        if reply.status != 200:
          raise RuntimeError(f"{reply.status}: {await reply.text()}")
        return await reply.json()

    rewards = [np.asarray((await post(body))["rewards"], np.float32) for body in bodies]
    latencies: list[float] = []
    errors: list[str] = []
    items = 0

    async def client(index: int, deadline: float) -> None:
      nonlocal items
      turn = index * len(bodies) // clients
      while time.perf_counter() < deadline:
        body = bodies[turn % len(bodies)]
        sent = time.perf_counter()
        try:
          await post(body)
        except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
          errors.append(str(e))
        latencies.append(time.perf_counter() - sent)
        items += len(body["items"])
        turn += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(i, start + seconds) for i in range(clients)))
    return latencies, items, time.perf_counter() - start, rewards, errors


def main(argv: list[str]) -> None:
  """Runs both sides and prints the table."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if min(FLAGS.num_items, FLAGS.items_per_request, FLAGS.clients) < 1 or FLAGS.seconds <= 0:
    raise app.UsageError("--num_items, --items_per_request, --clients and --seconds must be positive")
  items = gsm8k_items(FLAGS.num_items)
  size = FLAGS.items_per_request
  requests = [items[s:s + size] for s in range(0, len(items), size)]
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    tokenizer = train_sentencepiece([q + a for q, a in items], FLAGS.vocab_size, root / "spm")
    config = get_preset(FLAGS.shape, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id, param_dtype="float32", dtype="float32")
    params = nn.unbox(transformer.init_params(config, jax.random.key(0)))
    ckpt = checkpoint.save_model(root / "ckpt", params, config, tokenizer, prompt_format="math")
    del params

    scorer = RewardScorer(ckpt, batch_size=FLAGS.batch_size, max_length=FLAGS.max_length, show_progress=False)
    seq_latencies, seq_items, seq_seconds, seq_rewards = sequential(scorer, requests, FLAGS.seconds)
    flat = [pair for request in requests for pair in request]
    start = time.perf_counter()
    scorer.score_texts([templates.render("math", question=q) for q, _ in flat], [a for _, a in flat])
    offline_seconds = time.perf_counter() - start
    lengths = np.array([len(s.ids) for s in scorer.encode_texts(
        [templates.render("math", question=q) for q, _ in flat], [a for _, a in flat])])
    del scorer

    server_flags = [f"--checkpoint={ckpt}", f"--batch_size={FLAGS.batch_size}", f"--max_length={FLAGS.max_length}",
                    f"--max_items={size}", f"--max_queue={max(4096, FLAGS.clients * size)}",
                    f"--timeout_s={HTTP_TIMEOUT_S}"]
    with serve.subprocess_server(server_flags) as server:
      srv_latencies, srv_items, srv_seconds, srv_rewards, errors = asyncio.run(
          load(server.url, requests, FLAGS.clients, FLAGS.seconds))

  difference = max(float(np.abs(a - b).max()) for a, b in zip(srv_rewards, seq_rewards))
  ms = lambda latencies, q: 1000 * float(np.percentile(latencies, q))  # noqa: E731
  rows = [("sequential RewardScorer", len(seq_latencies), seq_items, seq_items / seq_seconds,
           ms(seq_latencies, 50), ms(seq_latencies, 99)),
          (f"server, {FLAGS.clients} clients", len(srv_latencies), srv_items, srv_items / srv_seconds,
           ms(srv_latencies, 50), ms(srv_latencies, 99)),
          ("offline (one call, all items)", 1, len(flat), len(flat) / offline_seconds, 1000 * offline_seconds,
           1000 * offline_seconds)]
  print("\n".join([
      f"serve_load: {datetime.date.today().isoformat()}, {platform.machine()} {os.cpu_count()} CPUs, "
      f"{jax.default_backend()} ({jax.devices()[0].device_kind}); jax {jax.__version__}, aiohttp {aiohttp.__version__}",
      f"{FLAGS.shape} model, {len(flat)} GSM8K items (tokens median {int(np.median(lengths))}, max {lengths.max()}) "
      f"in {len(requests)} requests of {size}; batch {FLAGS.batch_size}, max_length {FLAGS.max_length}; "
      f"{FLAGS.seconds:g} s per side",
      "", common.format_table(("side", "requests", "items", "items/s", "p50 ms", "p99 ms"), rows), "",
      f"throughput ratio (server / sequential): {rows[1][3] / rows[0][3]:.2f}x; error responses: {len(errors)}; "
      f"max |reward difference| server vs RewardScorer: {difference:.2e}"]))
  if errors:
    raise RuntimeError(f"{len(errors)} requests failed; the first: {errors[0]}")
  if difference > REWARD_TOLERANCE:
    raise RuntimeError(f"the server's rewards differ from RewardScorer's by {difference:.2e} > {REWARD_TOLERANCE}")


if __name__ == "__main__":
  cli.run(main, define_flags)
