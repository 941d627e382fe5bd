"""The reward server (`codepmp_jax.serve`), run as a subprocess on a tiny random checkpoint: its
rewards equal `RewardScorer`'s (whole, normalized, step-aggregated), OpenRLHF's remote reward
client is answered as it reads, malformed requests get a 4xx with a message and the server goes
on, concurrent clients are batched together without errors, and SIGTERM drains requests in flight.
The queue limit, the request timeout and a failing forward pass are checked in-process, with a
scorer whose forward passes wait for the test."""
from __future__ import annotations

import asyncio
import json
import pathlib
import random
import re
import signal
import sysconfig
import threading
import time

import aiohttp
import flax.linen as nn
import jax
import numpy as np
import pytest
import requests
from aiohttp import test_utils

from codepmp_jax import checkpoint, score, serve
from codepmp_jax.data import templates
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.eval import bon
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset

MAX_LENGTH = 64
MAX_ITEMS = 16
MAX_CHARS = 2000
SERVER_FLAGS = [f"--max_length={MAX_LENGTH}", "--batch_size=4", f"--max_items={MAX_ITEMS}",
                f"--max_chars={MAX_CHARS}", "--max_queue=256", "--timeout_s=120"]
STATS = {"mean": 0.25, "std": 1.5}
HTTP_TIMEOUT_S = 120  # every request a test sends gives up after this
ITEMS = [
    ("What is 3 + 4?", "3 + 4 = 7.\n\nThe answer is 7."),
    ("Add 2 and 2.", "4"),
    ("Count to five.", "1, 2, 3,\n\n4,\n\n5."),
    ("", "an empty prompt"),
    ("Explain.", ""),
    ("Sum 1..8.", "\n\n".join(f"Step {i}: the running total is now {i * (i + 1) // 2}." for i in range(1, 9))),
    ("Long question " * 30, "short answer"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("serve")
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
  tokenizer = train_sentencepiece(files, vocab_size=400, out_prefix=root / "sp")
  config = get_preset("tiny", vocab_size=400, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
  params = nn.unbox(transformer.init_params(config, jax.random.key(3)))
  path = checkpoint.save_model(root / "ckpt", params, config, tokenizer, prompt_format="math")
  checkpoint.save_reward_stats(path, **STATS, source="test")
  return path


@pytest.fixture(scope="module")
def scorer(ckpt) -> score.RewardScorer:
  return score.RewardScorer(ckpt, batch_size=4, max_length=MAX_LENGTH, show_progress=False)


@pytest.fixture(scope="module")
def server(ckpt):
  with serve.subprocess_server([f"--checkpoint={ckpt}", *SERVER_FLAGS]) as running:
    yield running
  assert running.process.returncode == 0, "".join(running.output)


def post(url: str, body, timeout: float = HTTP_TIMEOUT_S) -> requests.Response:
  """POST `body` (an object as JSON, or bytes / str as they are) to `url`."""
  data = body if isinstance(body, (bytes, str)) else json.dumps(body)
  return requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=timeout)


def rendered(prompt: str) -> str:
  return templates.render("math", question=prompt)


def whole_rewards(scorer: score.RewardScorer, items) -> np.ndarray:
  return scorer.score_texts([rendered(p) for p, _ in items], [r for _, r in items])


@pytest.mark.slow
def test_score_equals_reward_scorer(server, scorer):
  reply = post(server.url + "/score", {"items": [{"prompt": p, "response": r} for p, r in ITEMS]})
  assert reply.status_code == 200, reply.text
  got = reply.json()
  expected = whole_rewards(scorer, ITEMS)
  np.testing.assert_allclose(got["rewards"], expected, rtol=1e-5, atol=1e-5)
  encoded = scorer.encode_texts([rendered(p) for p, _ in ITEMS], [r for _, r in ITEMS])
  assert got["truncated"] == [bool(s.prompt_cut or s.response_cut) for s in encoded]
  assert got["truncated"][-1] and got["truncated"][-2] and not got["truncated"][0]
  # normalize per request: (r - mean) / std by the checkpoint's stats.
  normalized = post(server.url + "/score", {"items": [{"prompt": p, "response": r} for p, r in ITEMS],
                                            "normalize": True}).json()
  np.testing.assert_allclose(normalized["rewards"], (expected - STATS["mean"]) / STATS["std"], rtol=1e-5, atol=1e-5)
  health = requests.get(server.url + "/health", timeout=HTTP_TIMEOUT_S).json()
  assert health["prompt_format"] == "math" and health["reward_stats"] == STATS
  assert health["queue_depth"] == 0 and health["max_length"] == MAX_LENGTH


@pytest.mark.slow
def test_step_aggregates_equal_reward_scorer_steps(server, scorer):
  """Every aggregate, raw and normalized (normalized step rewards, then aggregated, as `eval bon`)."""
  prompts, responses = [rendered(p) for p, _ in ITEMS], [r for _, r in ITEMS]
  steps = scorer.score_steps(prompts, responses)
  body = {"items": [{"prompt": p, "response": r} for p, r in ITEMS]}
  for i, how in enumerate(bon.AGGREGATES):
    normalize = bool(i % 2)
    reply = post(server.url + "/score", {**body, "aggregate": how, "normalize": normalize})
    assert reply.status_code == 200, reply.text
    step_rewards = [scorer.normalized(r) if normalize else r for r in steps]
    np.testing.assert_allclose(reply.json()["rewards"], [bon.aggregate_steps(r, how) for r in step_rewards],
                               rtol=1e-5, atol=1e-5)
    for got, want in zip(reply.json()["step_rewards"], step_rewards):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The last step's reward is the whole response's; `"aggregate": null` asks for the whole reward.
  whole = post(server.url + "/score", {**body, "aggregate": None}).json()
  assert "step_rewards" not in whole
  np.testing.assert_allclose(whole["rewards"], [r[-1] for r in steps], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_openrlhf_remote_reward_clients(server, scorer):
  """Posts exactly what OpenRLHF's remote reward model clients send and reads the reply as they do:

  - OpenRLHF/OpenRLHF openrlhf/utils/remote_rm_utils.py, `remote_rm_fn` (commit 14fe44c6, kept until
    62987083): `requests.post(url, json={"query": queries, "prompts": prompts, "labels": labels},
    headers={"Content-Type": "application/json"}, timeout=180)`, `raise_for_status()`,
    `assert "rewards" in response.json()`, then `torch.tensor(response.get("rewards"))`;
  - OpenRLHF/OpenRLHF openrlhf/utils/agent.py, `_fetch_rewards_via_http` (commit 3c3be62): one
    `aiohttp` session per request (`ClientTimeout(total=180)`), `session.post(url, json=payload)` with
    the same three fields for one query, `raise_for_status()`, `await response.json()`, then
    `rewards_info.get("rewards")` (and `"scores"`, falling back to the rewards).
  Each query is the whole text (prompt + response) and is scored as one sequence.
  """
  import torch
  queries = [rendered(p) + r for p, r in ITEMS]
  prompts = [rendered(p) for p, _ in ITEMS]
  labels = ["7", None, "5", "", None, "36", None]
  expected = scorer.score_ids([scorer.encode("", q).ids for q in queries])
  url = server.url + "/get_reward"

  response = requests.post(url=url, json={"query": queries, "prompts": prompts, "labels": labels},
                           headers={"Content-Type": "application/json"}, timeout=180)
  response.raise_for_status()
  response = response.json()
  assert "rewards" in response, f"rewards not in {response}"
  scores = torch.tensor(response.get("rewards"))
  assert scores.shape == (len(queries),)
  np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-5)

  async def fetch_one(query: str, prompt: str, label):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
      async with session.post(url, json={"query": [query], "prompts": [prompt], "labels": [label]}) as reply:
        reply.raise_for_status()
        return await reply.json()

  async def fetch_all():
    return await asyncio.gather(*(fetch_one(q, p, label) for q, p, label in zip(queries, prompts, labels)))

  for info, want in zip(asyncio.run(fetch_all()), expected):
    score_value = info.get("scores")
    if score_value is None:
      score_value = info.get("rewards")
    assert info.get("rewards") == score_value and len(score_value) == 1
    np.testing.assert_allclose(score_value[0], want, rtol=1e-5, atol=1e-5)


def _malformed_requests(rng: random.Random) -> list[tuple[str, str, bytes]]:
  """(method, path, body) of requests the server must refuse with a 4xx: broken JSON, wrong types,
  missing fields, empty lists, too many items, too long texts, bad options, wrong routes."""
  good_item = {"prompt": "What is 1 + 1?", "response": "2"}
  junk_values = [None, True, 0, -1.5, "text", [], {}, [1, 2], {"prompt": 1}]

  def text(n: int) -> str:
    return "".join(rng.choice("ab c\n\n{}[]\"\\é") for _ in range(n))

  def score_body() -> dict:
    kind = rng.randrange(12)
    if kind == 0:
      return {"itemz": [good_item]}
    if kind == 1:
      return {"items": rng.choice([v for v in junk_values if not isinstance(v, list)])}
    if kind == 2:
      return {"items": []}
    if kind == 3:
      return {"items": [good_item] * (MAX_ITEMS + 1 + rng.randrange(5))}
    if kind == 4:
      return {"items": [good_item, rng.choice([v for v in junk_values if not isinstance(v, dict)])]}
    if kind == 5:
      field = rng.choice(["prompt", "response"])
      return {"items": [{k: v for k, v in good_item.items() if k != field}]}
    if kind == 6:
      field = rng.choice(["prompt", "response"])
      return {"items": [{**good_item, field: rng.choice([v for v in junk_values if not isinstance(v, str)])}]}
    if kind == 7:
      return {"items": [{"prompt": text(MAX_CHARS // 2), "response": text(MAX_CHARS // 2 + 1)}]}
    if kind == 8:
      return {"items": [good_item], "normalize": rng.choice(["yes", 1, 0, None, [], {}])}
    if kind == 9:
      return {"items": [good_item], "aggregate": rng.choice(["median", "MIN", "", 3, [], {}, True])}
    if kind == 10:
      return {"items": [{**good_item, "prompt": "x\ud800y"}]}  # a lone surrogate: no text
    return {"items": [{**good_item, "question": text(MAX_CHARS + 1)}]}  # a template field too long

  def get_reward_body() -> dict:
    kind = rng.randrange(6)
    if kind == 0:
      return {"queries": ["text"], "prompts": ["t"], "labels": [None]}
    if kind == 1:
      return {"query": rng.choice([v for v in junk_values if not isinstance(v, list)])}
    if kind == 2:
      return {"query": []}
    if kind == 3:
      return {"query": ["text", rng.choice([v for v in junk_values if not isinstance(v, str)])]}
    if kind == 4:
      return {"query": ["text"] * (MAX_ITEMS + 1)}
    return {"query": [text(MAX_CHARS + 1)]}

  def broken_json() -> bytes:
    kind = rng.randrange(7)
    whole = json.dumps({"items": [good_item] * 3}, separators=(",", ":")).encode()
    if kind == 0:
      return whole[:rng.randrange(1, len(whole))]  # a strict prefix of an object is never JSON
    if kind == 1:
      return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if kind == 2:
      return b'{"items": [{"prompt": "\xff\xfe", "response": "x"}]}'  # not UTF-8
    if kind == 3:
      return b"[" * 100_000  # nested past the parser's recursion limit
    if kind == 4:
      return rng.choice([b"", b"   ", b"null", b"[]", b"17", b'"items"', b"true", b"NaN"])
    if kind == 5:
      return b"{'items': []}"
    return json.dumps({"items": [good_item]}).encode() + b" trailing"

  out = []
  for _ in range(120):
    kind = rng.randrange(10)
    if kind < 4:
      out.append(("POST", "/score", json.dumps(score_body()).encode()))
    elif kind < 6:
      out.append(("POST", "/get_reward", json.dumps(get_reward_body()).encode()))
    elif kind < 9:
      out.append(("POST", rng.choice(["/score", "/get_reward"]), broken_json()))
    else:
      method, path = rng.choice([("GET", "/score"), ("PUT", "/get_reward"), ("POST", "/health"),
                                 ("POST", "/"), ("GET", "/rewards"), ("DELETE", "/score")])
      out.append((method, path, b"{}"))
  return out


def test_malformed_requests_get_4xx_with_a_message_and_the_server_goes_on(server):
  rng = random.Random(33)
  requests_sent = _malformed_requests(rng)
  # A body over the size limit (max_items x max_chars x 6 bytes + 1 MiB) is refused unread.
  too_big = b'{"items": "' + b"x" * (MAX_ITEMS * MAX_CHARS * 6 + (1 << 20)) + b'"}'
  statuses = set()
  for method, path, body in [*requests_sent, ("POST", "/score", too_big)]:
    reply = requests.request(method, server.url + path, data=body, headers={"Content-Type": "application/json"},
                             timeout=HTTP_TIMEOUT_S)
    assert 400 <= reply.status_code < 500, (method, path, body[:200], reply.status_code, reply.text[:500])
    error = reply.json()["error"]
    assert isinstance(error, str) and error, (method, path, body[:200])
    statuses.add(reply.status_code)
  assert statuses == {400, 404, 405, 413}
  health = requests.get(server.url + "/health", timeout=HTTP_TIMEOUT_S)
  assert health.status_code == 200 and health.json()["status"] == "ok"
  reply = post(server.url + "/score", {"items": [{"prompt": "What is 1 + 1?", "response": "2"}]})
  assert reply.status_code == 200 and len(reply.json()["rewards"]) == 1


class GatedScorer:
  """A RewardScorer whose forward passes wait until `gate` is set, then raise `failure` if one is
  given, else score as the scorer does."""

  def __init__(self, scorer: score.RewardScorer):
    self.scorer, self.gate, self.failure = scorer, threading.Event(), None

  def __getattr__(self, name):
    return getattr(self.scorer, name)

  def score_ids(self, sequences):
    assert self.gate.wait(timeout=HTTP_TIMEOUT_S), "the test never opened the gate"
    if self.failure is not None:
      raise self.failure
    return self.scorer.score_ids(sequences)


def test_queue_limit_timeout_and_a_failing_forward_pass(ckpt, scorer):
  """In-process, with forward passes held back: a request that would overflow the queue gets 503,
  requests not scored in time get 504 (their queued items dropped), a forward pass that raises fails
  its requests with 500, and the server goes on."""
  settings = serve.ServeSettings(checkpoint=str(ckpt), port=0, max_length=MAX_LENGTH, batch_size=4,
                                 max_items=4, max_queue=4, timeout_s=1.5)
  gated = GatedScorer(scorer)
  pairs = [ITEMS[1]] * 4  # one length bucket: one round takes all four
  items = [{"prompt": p, "response": r} for p, r in pairs]

  async def wait_until(condition, what: str):
    deadline = time.monotonic() + 30
    while not condition():
      assert time.monotonic() < deadline, f"timed out waiting for {what}"
      await asyncio.sleep(0.01)

  async def scenario():
    server = serve.RewardServer(settings, gated)
    worker = asyncio.create_task(server.batcher.run())
    try:
      async with test_utils.TestServer(server.app()) as http, aiohttp.ClientSession() as session:
        async def post_items(body):
          async with session.post(http.make_url("/score"), json=body) as reply:
            return reply.status, await reply.json()

        first = asyncio.create_task(post_items({"items": items}))
        await wait_until(lambda: server.batcher.scoring == 4, "the first round")
        second = asyncio.create_task(post_items({"items": items}))
        await wait_until(lambda: len(server.batcher.queued) == 4, "the second request to queue")
        status, reply = await post_items({"items": items[:1]})
        assert status == 503 and "queue is full" in reply["error"]
        for task in (first, second):
          status, reply = await task
          assert status == 504 and "not scored within 1.5 s" in reply["error"]
        gated.gate.set()
        await wait_until(lambda: server.batcher.scoring == 0, "the held round to end")
        status, reply = await post_items({"items": items[:2]})
        assert status == 200
        np.testing.assert_allclose(reply["rewards"], whole_rewards(scorer, pairs[:2]), rtol=1e-5, atol=1e-5)
        # The second request's items were dropped when it timed out: 2 rounds ran, the held one and this.
        assert server.batcher.rounds == 2 and not server.batcher.queued
        gated.failure = RuntimeError("the device fell over")
        status, reply = await post_items({"items": items[:1]})
        assert status == 500 and "the device fell over" in reply["error"]
        gated.failure = None
        status, reply = await post_items({"items": items[:1]})
        assert status == 200 and len(reply["rewards"]) == 1
    finally:
      gated.gate.set()
      worker.cancel()
      server.close()

  asyncio.run(scenario())


@pytest.mark.slow
def test_concurrent_clients_are_batched_without_errors(server, scorer):
  """8 clients for 3 s (each at most 200 requests), random requests of 1-6 items of a pool, on
  both routes: every reply is 200 with the pool's rewards (1e-5), and the worker ran fewer rounds
  than the requests' (request, length bucket) pairs: rounds held items of several requests."""
  rng = np.random.default_rng(0)
  pool = [(f"Question {i}: what is {i} + {i * 3}?",
           "\n\n".join(f"Step {s}: {i} + {s} = {i + s}." for s in range(int(rng.integers(0, 6)))) or "No steps.")
          for i in range(24)]
  items = scorer.encode_texts([rendered(p) for p, _ in pool], [r for _, r in pool])
  queries = [scorer.encode("", rendered(p) + r) for p, r in pool]
  expected, expected_queries = scorer.score_ids([s.ids for s in items]), scorer.score_ids([s.ids for s in queries])
  bucket = lambda sequence: scorer.length_batches([len(sequence.ids)])[0][1]  # noqa: E731
  item_buckets, query_buckets = [bucket(s) for s in items], [bucket(s) for s in queries]
  assert post(server.url + "/score", {"items": [{"prompt": p, "response": r} for p, r in pool[:MAX_ITEMS]]}).ok
  before = requests.get(server.url + "/health", timeout=HTTP_TIMEOUT_S).json()

  async def client(index: int, session: aiohttp.ClientSession, deadline: float) -> tuple[int, int, list[str]]:
    picks = np.random.default_rng(index + 1)
    sent = request_buckets = 0
    errors = []
    while time.monotonic() < deadline and sent < 200:
      chosen = picks.choice(len(pool), size=int(picks.integers(1, 7)), replace=False)
      if index % 2:
        body, path = {"query": [rendered(pool[i][0]) + pool[i][1] for i in chosen]}, "/get_reward"
        want, buckets = expected_queries[chosen], {query_buckets[i] for i in chosen}
      else:
        body, path = {"items": [{"prompt": pool[i][0], "response": pool[i][1]} for i in chosen]}, "/score"
        want, buckets = expected[chosen], {item_buckets[i] for i in chosen}
      async with session.post(server.url + path, json=body) as reply:
        if reply.status != 200:
          errors.append(f"{path}: {reply.status} {await reply.text()}")
        elif not np.allclose((await reply.json())["rewards"], want, rtol=1e-5, atol=1e-5):
          errors.append(f"{path}: rewards differ for items {chosen.tolist()}")
      sent, request_buckets = sent + 1, request_buckets + len(buckets)
    return sent, request_buckets, errors

  async def load():
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
      deadline = time.monotonic() + 3
      return await asyncio.wait_for(asyncio.gather(*(client(i, session, deadline) for i in range(8))),
                                    timeout=HTTP_TIMEOUT_S)

  results = asyncio.run(load())
  errors = [e for _, _, errs in results for e in errs]
  assert not errors, errors[:5]
  assert all(sent > 0 for sent, _, _ in results)
  request_buckets = sum(n for _, n, _ in results)
  after = requests.get(server.url + "/health", timeout=HTTP_TIMEOUT_S).json()
  rounds = after["rounds"] - before["rounds"]
  assert 0 < rounds < request_buckets, (rounds, request_buckets)
  assert after["queue_depth"] == 0


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_and_exits_0(ckpt, scorer):
  """A fresh server (nothing compiled: the first rounds are slow) gets 4 requests spanning several
  length buckets, then SIGTERM while they are in flight: all 4 are answered in full, and it exits 0."""
  bodies = [{"items": [{"prompt": p, "response": r} for p, r in ITEMS]},
            {"items": [{"prompt": p, "response": r} for p, r in ITEMS], "aggregate": "min"},
            {"query": [rendered(p) + r for p, r in ITEMS]},
            {"items": [{"prompt": p * 2, "response": r} for p, r in ITEMS], "normalize": True}]
  paths = ["/score", "/score", "/get_reward", "/score"]
  with serve.subprocess_server([f"--checkpoint={ckpt}", *SERVER_FLAGS]) as running:
    replies: list = [None] * len(bodies)

    def send(i: int) -> None:
      replies[i] = post(running.url + paths[i], bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
      thread.start()
    deadline = time.monotonic() + 60
    while True:  # until every request is in flight (or, were one quick, answered)
      in_flight = requests.get(running.url + "/health", timeout=HTTP_TIMEOUT_S).json()["requests_in_flight"]
      if in_flight + sum(reply is not None for reply in replies) >= len(bodies):
        break
      assert time.monotonic() < deadline, "the requests never reached the server"
      time.sleep(0.005)
    running.process.send_signal(signal.SIGTERM)
    for thread in threads:
      thread.join(timeout=HTTP_TIMEOUT_S)
    assert running.process.wait(timeout=HTTP_TIMEOUT_S) == 0, "".join(running.output)
  output = "".join(running.output)
  in_flight = int(re.search(r"stopping: no new connections; (\d+) requests in flight", output).group(1))
  assert in_flight >= 1, output  # the signal came while requests were being scored
  assert all(reply is not None and reply.status_code == 200 for reply in replies), \
      [(r.status_code, r.text[:300]) if r is not None else None for r in replies]
  np.testing.assert_allclose(replies[0].json()["rewards"], whole_rewards(scorer, ITEMS), rtol=1e-5, atol=1e-5)
  assert [len(r.json()["rewards"]) for r in replies] == [len(ITEMS)] * 4
  assert "stopped after" in output
