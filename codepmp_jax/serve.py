"""An HTTP reward server: a checkpoint's rewards for an RLHF loop, batched across concurrent requests.

  python -m codepmp_jax.serve --checkpoint=CKPT --port=8000 [--host=127.0.0.1] [--batch_size=16] \
      [--max_length=1024] [--template=none|code|math|logic|chat] [--mesh=-1,1,1] [--max_batch=64] \
      [--max_queue=4096] [--max_items=256] [--max_chars=50000] [--timeout_s=60] [--normalize] \
      [--aggregate=min|max|sum|mean|last|product] [--step_delimiter=TEXT]

Routes (JSON in and out; every refusal is `{"error": "<message>"}` with a 4xx or 5xx status):
  POST /score       {"items": [{"prompt": str, "response": str}, ...], "normalize": bool (optional),
                    "aggregate": "min|max|sum|mean|last|product" or null (optional)}
                    -> {"rewards": [float, ...], "truncated": [bool, ...]}
      Each item is scored as `score` scores a {"prompt", "response"} line (`score.render_prompt`,
      `RewardScorer.encode`): the prompt rendered with the checkpoint's prompt format (or
      --template; an item may carry the template's other fields, as logic's "context"), then the
      response and the end token, cut to --max_length by the checkpoint's truncation policy;
      `truncated` says which items lost tokens. With an aggregate (the request's,
      else --aggregate) an item's reward is that aggregate of its step rewards (the reward at the
      end of every step, steps split at --step_delimiter: `RewardScorer.encode_steps`, one forward
      pass per item), and the reply adds `"step_rewards": [[float, ...], ...]`.
  POST /get_reward  OpenRLHF's remote reward model protocol (`--remote_rm_url http://HOST:PORT/get_reward`):
                    {"query": [str, ...], ...} -> {"rewards": [float, ...]}. Each query is a whole
      formatted text (prompt + response), scored as `score` scores a {"text"} line: text + end
      token, the reward read at the end token; the other fields OpenRLHF sends ("prompts",
      "labels") are not needed.
  GET /health       the model, the settings and the queue depth.
Rewards are normalized, `(r - mean) / std` by the checkpoint's reward stats (`score --calibrate`),
with --normalize, or per /score request with "normalize" (step rewards are normalized before they
are aggregated, as `eval bon --normalize --aggregate` does).

Batching: request handlers tokenize their items (one encoder thread) and queue them; ONE worker
runs the model (one thread) in rounds, each of the queued items that share the oldest item's
length bucket (`RewardScorer.length_batches`' padded lengths; step items apart from whole ones),
at most --max_batch, scored by one `score_ids` / `score_positions` call. A bucket's batches so
always have the scorer's one shape for it (one compile each), and items that arrive while a round
runs wait for the next. The queue holds at most --max_queue items (a request that would overflow
it is answered 503); a request has at most --max_items items of at most --max_chars characters
each (its string fields together; 413) and is answered within --timeout_s seconds (504; its items still
queued are dropped). SIGTERM (or SIGINT) stops listening, lets the requests in flight finish (up to
--timeout_s more), and exits 0.

The stack is aiohttp: a mature asyncio HTTP server and client (aio-libs) that this environment
already holds as gcsfs's transport, so serving adds no new dependency tree, and its runner drains
in-flight handlers on shutdown by itself; one event loop answers requests while the model runs in
its own thread.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import app, flags
from aiohttp import web

from codepmp_jax import cli, score
from codepmp_jax.data import templates
from codepmp_jax.eval import bon

READY_LINE = "serving on http://"  # the line `serve` prints once it listens: READY_LINE + host:port
# A request body may hold --max_items items of --max_chars characters, each character up to 6
# bytes (a \uXXXX escape), plus this much for the JSON around them; a larger body is refused (413).
BODY_OVERHEAD_BYTES = 1 << 20
ROUTES = ("POST /score", "POST /get_reward", "GET /health")
JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
              float: "number", type(None): "null"}


@dataclasses.dataclass(frozen=True)
class ServeSettings:
  """What `serve` runs: the scorer's settings (as `score`'s flags), where it listens, its limits and
  its defaults for requests (`normalize`, step `aggregate` and `step_delimiter`)."""
  checkpoint: str
  port: int
  host: str = "127.0.0.1"
  batch_size: int = 16
  max_length: int = 1024
  template: str | None = None
  mesh: tuple[int, ...] = (-1, 1, 1)
  max_batch: int = 64
  max_queue: int = 4096
  max_items: int = 256
  max_chars: int = 50_000
  timeout_s: float = 60.0
  normalize: bool = False
  aggregate: str | None = None
  step_delimiter: str = bon.DEFAULT_STEP_DELIMITER

  def __post_init__(self):
    if not 0 <= self.port < 65536:
      raise ValueError(f"--port must be in 0..65535 (0: any free port), got {self.port}")
    for name in ("batch_size", "max_length", "max_batch", "max_queue", "max_items", "max_chars"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
    if self.max_queue < self.max_items:
      raise ValueError(f"--max_queue={self.max_queue} must hold one full request (--max_items={self.max_items})")
    if not self.timeout_s > 0:
      raise ValueError(f"--timeout_s must be positive, got {self.timeout_s}")
    if self.aggregate is not None and self.aggregate not in bon.AGGREGATES:
      raise ValueError(f"--aggregate must be one of {bon.AGGREGATES}, got {self.aggregate!r}")
    if not self.step_delimiter:
      raise ValueError("--step_delimiter must be a non-empty string")

  @property
  def max_body_bytes(self) -> int:
    return self.max_items * self.max_chars * 6 + BODY_OVERHEAD_BYTES


class RequestError(Exception):
  """A request the server refuses: answered `{"error": message}` with `status`."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


@dataclasses.dataclass
class _Queued:
  """One sequence waiting for the model: its token ids, the positions to read (None: its last
  token), its batching key (padded length, whether positions are read) and where its rewards go."""
  ids: Sequence[int]
  positions: Sequence[int] | None
  key: tuple[int, bool]
  rewards: asyncio.Future


class Batcher:
  """Dynamic batching: a bounded queue of sequences from any number of requests, scored in rounds by
  one worker (`run`) on one model thread; each round takes up to `max_batch` queued sequences of
  the oldest one's key (its length bucket, and whether step positions are read), in arrival order."""

  def __init__(self, scorer: score.RewardScorer, max_batch: int, max_queue: int):
    self.scorer, self.max_batch, self.max_queue = scorer, max_batch, max_queue
    self.queued: collections.deque[_Queued] = collections.deque()
    self.scoring = 0  # sequences in the round the model is running
    self.rounds = 0
    self._arrived = asyncio.Event()
    self._model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")

  def _key(self, ids: Sequence[int], positions: Sequence[int] | None) -> tuple[int, bool]:
    ((_, padded_length, _),) = self.scorer.length_batches([len(ids)])
    return padded_length, positions is not None

  async def rewards(self, sequences: Sequence[Sequence[int]],
                    positions: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
    """Each sequence's rewards (float32: one, or one per position) once the worker has scored it;
    raises RequestError(503) when the queue cannot take them all. Cancelling drops those still queued."""
    if len(self.queued) + len(sequences) > self.max_queue:
      raise RequestError(503, f"the queue is full ({len(self.queued)} items waiting, at most {self.max_queue}); "
                              "retry later")
    loop = asyncio.get_running_loop()
    waiting = []
    for i, ids in enumerate(sequences):
      where = None if positions is None else positions[i]
      waiting.append(_Queued(ids, where, self._key(ids, where), loop.create_future()))
    self.queued.extend(waiting)
    self._arrived.set()
    return list(await asyncio.gather(*(w.rewards for w in waiting)))

  def _next_round(self) -> list[_Queued]:
    """The queued sequences of the oldest one's key (at most `max_batch`), taken off the queue;
    sequences whose request gave up are dropped."""
    live = [q for q in self.queued if not q.rewards.done()]
    if not live:
      self.queued.clear()
      return []
    key = live[0].key
    chosen = [q for q in live if q.key == key][:self.max_batch]
    taken = {id(q) for q in chosen}
    self.queued = collections.deque(q for q in live if id(q) not in taken)
    return chosen

  def _forward(self, batch: list[_Queued]) -> list[np.ndarray]:
    ids = [q.ids for q in batch]
    if batch[0].positions is None:
      return [r[None] for r in self.scorer.score_ids(ids)]
    return self.scorer.score_positions(ids, [q.positions for q in batch])

  async def run(self) -> None:
    """The worker: scores rounds until cancelled; a round that fails fails its requests only."""
    loop = asyncio.get_running_loop()
    while True:
      await self._arrived.wait()
      batch = self._next_round()
      if not batch:
        self._arrived.clear()
        continue
      self.scoring = len(batch)
      try:
        rewards = await loop.run_in_executor(self._model_thread, self._forward, batch)
      except Exception as e:  # noqa: BLE001 - handed to each waiting request, answered 500
        for q in batch:
          if not q.rewards.done():
            q.rewards.set_exception(e)
      else:
        for q, r in zip(batch, rewards):
          if not q.rewards.done():
            q.rewards.set_result(r)
      finally:
        self.scoring = 0
        self.rounds += 1

  def close(self) -> None:
    self._model_thread.shutdown(wait=True)


def _json_type(value: Any) -> str:
  return JSON_TYPES.get(type(value), type(value).__name__)


async def _json_object(request: web.Request) -> dict:
  """The request body as a JSON object, or RequestError(400) saying what is wrong with it."""
  body = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge (413)
  if not body.strip():
    raise RequestError(400, "the body is empty; send a JSON object")
  try:
    value = json.loads(body)
  except UnicodeDecodeError as e:
    raise RequestError(400, f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise RequestError(400, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
  except RecursionError:
    raise RequestError(400, "invalid JSON: nested too deeply") from None
  if not isinstance(value, dict):
    raise RequestError(400, f"expected a JSON object, got {_json_type(value)}")
  return value


def _non_empty_list(body: dict, field: str, limit: int) -> list:
  if field not in body:
    raise RequestError(400, f"missing field {field!r}; got fields {sorted(body)}")
  value = body[field]
  if not isinstance(value, list):
    raise RequestError(400, f"field {field!r} must be an array, got {_json_type(value)}")
  if not value:
    raise RequestError(400, f"field {field!r} is empty; send at least one")
  if len(value) > limit:
    raise RequestError(413, f"field {field!r} has {len(value)} entries; at most {limit} per request (--max_items)")
  return value


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
  """A checked /score request: items with string prompt and response, and its options."""
  items: list[dict]
  normalize: bool
  aggregate: str | None


class RewardServer:
  """The routes (see the module docstring) over one `RewardScorer` and its `Batcher`."""

  def __init__(self, settings: ServeSettings, scorer: score.RewardScorer):
    if settings.normalize and scorer.reward_stats is None:
      raise ValueError(f"{settings.checkpoint} has no reward stats to normalize with; measure them: "
                       f"python -m codepmp_jax.score --checkpoint={settings.checkpoint} --calibrate=DATA")
    self.settings, self.scorer = settings, scorer
    self.template = settings.template or scorer.prompt_format or "none"
    self.batcher = Batcher(scorer, settings.max_batch, settings.max_queue)
    self.counts: collections.Counter = collections.Counter()
    self.requests_in_flight = 0
    self._encoder_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode")

  def app(self) -> web.Application:
    application = web.Application(middlewares=[self._answer_errors], client_max_size=self.settings.max_body_bytes)
    application.router.add_post("/score", self.score)
    application.router.add_post("/get_reward", self.get_reward)
    application.router.add_get("/health", self.health)
    return application

  @web.middleware
  async def _answer_errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every refusal as `{"error": message}` (the router's 404 and 405 and the body limit's 413
    too); an unexpected exception is a 500 with its message, and the server goes on."""
    self.requests_in_flight += 1
    self.counts["requests"] += 1
    try:
      return await handler(request)
    except RequestError as e:
      status, message, headers = e.status, e.message, None
    except web.HTTPException as e:
      if e.status < 400:
        raise
      status, message, headers = e.status, e.text or e.reason, None
      if e.status in (404, 405):
        message = f"no route {request.method} {request.path}; the routes are {', '.join(ROUTES)}"
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
    except Exception as e:  # noqa: BLE001 - a bug: answered and printed, never fatal
      traceback.print_exc()
      status, message, headers = 500, f"internal error: {type(e).__name__}: {e}", None
    finally:
      self.requests_in_flight -= 1
    self.counts[f"status_{status}"] += 1
    return web.json_response({"error": message}, status=status, headers=headers)

  async def _within_timeout(self, work):
    try:
      async with asyncio.timeout(self.settings.timeout_s):
        return await work
    except TimeoutError:
      raise RequestError(504, f"not scored within {self.settings.timeout_s:g} s (--timeout_s); "
                              f"{len(self.batcher.queued)} items are waiting") from None

  async def _encoded(self, encode: Callable[[], Any]) -> Any:
    """`encode()` on the encoder thread; its ValueError (a template field missing, text the
    tokenizer refuses) is the client's: 400."""
    try:
      return await asyncio.get_running_loop().run_in_executor(self._encoder_thread, encode)
    except ValueError as e:
      raise RequestError(400, str(e)) from None

  def _checked_text(self, text: Any, where: str) -> str:
    if not isinstance(text, str):
      raise RequestError(400, f"{where} must be a string, got {_json_type(text)}")
    if len(text) > self.settings.max_chars:
      raise RequestError(413, f"{where} has {len(text)} characters; at most {self.settings.max_chars} (--max_chars)")
    try:  # JSON's "\ud800" escapes give strings no tokenizer takes
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise RequestError(400, f"{where} is not Unicode text ({e.reason} at character {e.start})") from None
    return text

  def _normalize_option(self, body: dict) -> bool:
    normalize = body.get("normalize", self.settings.normalize)
    if type(normalize) is not bool:
      raise RequestError(400, f"field 'normalize' must be true or false, got {_json_type(normalize)}")
    if normalize and self.scorer.reward_stats is None:
      raise RequestError(400, "this checkpoint has no reward stats to normalize with (score --calibrate)")
    return normalize

  def parse_score(self, body: dict) -> ScoreRequest:
    """The /score request in `body`, checked; RequestError says what is wrong."""
    items = _non_empty_list(body, "items", self.settings.max_items)
    for i, item in enumerate(items):
      if not isinstance(item, dict):
        raise RequestError(400, f"items[{i}] must be an object {{\"prompt\", \"response\"}}, got {_json_type(item)}")
      for field in ("prompt", "response"):
        if field not in item:
          raise RequestError(400, f"items[{i}] has no field {field!r}")
        self._checked_text(item[field], f"items[{i}].{field}")
      texts = {k: v for k, v in item.items() if isinstance(v, str)}  # the template may use any of them
      for field, text in texts.items():
        self._checked_text(text, f"items[{i}].{field}")
      if sum(map(len, texts.values())) > self.settings.max_chars:
        raise RequestError(413, f"items[{i}] has {sum(map(len, texts.values()))} characters in its string "
                                f"fields; at most {self.settings.max_chars} (--max_chars)")
    aggregate = body.get("aggregate", self.settings.aggregate)
    if aggregate is not None and aggregate not in bon.AGGREGATES:
      got = repr(aggregate) if isinstance(aggregate, str) else _json_type(aggregate)
      raise RequestError(400, f"field 'aggregate' must be one of {list(bon.AGGREGATES)} or null, got {got}")
    return ScoreRequest(items, self._normalize_option(body), aggregate)

  def _normalized(self, rewards: np.ndarray, normalize: bool) -> np.ndarray:
    return self.scorer.normalized(rewards) if normalize else rewards

  async def score(self, request: web.Request) -> web.Response:
    """POST /score: rewards of (prompt, response) items, as `score` scores them."""
    parsed = self.parse_score(await _json_object(request))
    reply = await self._within_timeout(self._score_items(parsed))
    self.counts["items"] += len(parsed.items)
    return web.json_response(reply)

  async def _score_items(self, parsed: ScoreRequest) -> dict:
    prompts = await self._encoded(lambda: [score.render_prompt(item, self.template, f"items[{i}]")
                                           for i, item in enumerate(parsed.items)])
    responses = [item["response"] for item in parsed.items]
    if parsed.aggregate is None:
      sequences = await self._encoded(lambda: self.scorer.encode_texts(prompts, responses))
      rewards = await self.batcher.rewards([s.ids for s in sequences])
      rewards = self._normalized(np.concatenate(rewards), parsed.normalize)
      return {"rewards": rewards.tolist(), "truncated": [bool(s.prompt_cut or s.response_cut) for s in sequences]}
    steps = await self._encoded(lambda: self.scorer.encode_steps(prompts, responses, self.settings.step_delimiter))
    step_rewards = [self._normalized(r, parsed.normalize) for r in
                    await self.batcher.rewards([s.sequence.ids for s in steps], [s.positions for s in steps])]
    return {"rewards": [bon.aggregate_steps(r, parsed.aggregate) for r in step_rewards],
            "truncated": [bool(s.sequence.prompt_cut or s.sequence.response_cut) for s in steps],
            "step_rewards": [r.tolist() for r in step_rewards]}

  async def get_reward(self, request: web.Request) -> web.Response:
    """POST /get_reward: OpenRLHF's remote reward model request; each query is one whole text."""
    body = await _json_object(request)
    queries = _non_empty_list(body, "query", self.settings.max_items)
    for i, text in enumerate(queries):
      self._checked_text(text, f"query[{i}]")
    reply = await self._within_timeout(self._score_queries(queries))
    self.counts["items"] += len(queries)
    return web.json_response(reply)

  async def _score_queries(self, queries: list[str]) -> dict:
    sequences = await self._encoded(lambda: [self.scorer.encode("", text) for text in queries])
    rewards = await self.batcher.rewards([s.ids for s in sequences])
    return {"rewards": self._normalized(np.concatenate(rewards), self.settings.normalize).tolist()}

  async def health(self, request: web.Request) -> web.Response:
    """GET /health: the model and settings, and how busy the server is."""
    del request
    config, stats, settings = self.scorer.config, self.scorer.reward_stats, self.settings
    return web.json_response({
        "status": "ok", "checkpoint": settings.checkpoint,
        "model": {"architecture": config.architecture, "num_layers": config.num_layers,
                  "hidden_size": config.hidden_size, "vocab_size": config.vocab_size},
        "prompt_format": self.template, "truncation": self.scorer.truncation,
        "max_length": self.scorer.max_length, "batch_size": self.scorer.batch_size,
        "reward_stats": None if stats is None else {"mean": stats["mean"], "std": stats["std"]},
        "normalize": settings.normalize, "aggregate": settings.aggregate,
        "step_delimiter": settings.step_delimiter,
        "limits": {"max_batch": settings.max_batch, "max_queue": settings.max_queue,
                   "max_items": settings.max_items, "max_chars": settings.max_chars,
                   "timeout_s": settings.timeout_s},
        "queue_depth": len(self.batcher.queued), "scoring": self.batcher.scoring,
        "requests_in_flight": self.requests_in_flight - 1,  # not counting this one
        "rounds": self.batcher.rounds, "served": dict(self.counts)})

  def close(self) -> None:
    self._encoder_thread.shutdown(wait=True)
    self.batcher.close()


async def serve(settings: ServeSettings, scorer: score.RewardScorer) -> collections.Counter:
  """Answer requests on settings.host:port until SIGTERM or SIGINT, then drain and return the counts."""
  server = RewardServer(settings, scorer)
  runner = web.AppRunner(server.app(), access_log=None, handle_signals=False,
                         shutdown_timeout=settings.timeout_s + 5)
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  await runner.setup()
  try:
    try:
      await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as e:
      raise ValueError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}") from None
    worker = asyncio.create_task(server.batcher.run())
    host, port = runner.addresses[0][:2]  # the port chosen when --port=0
    print(f"{READY_LINE}{host}:{port} ({settings.checkpoint}; prompt format {server.template}, "
          f"truncation {scorer.truncation}, max_length {scorer.max_length}, normalize {settings.normalize}, "
          f"aggregate {settings.aggregate})", flush=True)
    await stop.wait()
    print(f"stopping: no new connections; {server.requests_in_flight} requests in flight finish first", flush=True)
  finally:
    await runner.cleanup()  # stops listening, waits for the handlers in flight (shutdown_timeout)
  worker.cancel()
  with contextlib.suppress(asyncio.CancelledError):
    await worker
  server.close()
  return server.counts


def settings_from_flags(values: flags.FlagValues) -> ServeSettings:
  """The settings the command line gives (ValueError or UsageError for a bad one)."""
  if not values.checkpoint:
    raise app.UsageError("--checkpoint is required")
  return ServeSettings(
      checkpoint=values.checkpoint, port=values.port, host=values.host, batch_size=values.batch_size,
      max_length=values.max_length, template=values.template, mesh=tuple(int(s) for s in values.mesh),
      max_batch=values.max_batch, max_queue=values.max_queue, max_items=values.max_items,
      max_chars=values.max_chars, timeout_s=values.timeout_s, normalize=values.normalize,
      aggregate=values.aggregate, step_delimiter=values.step_delimiter)


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags (defined only when run as a program, so other programs can import this module)."""
  defaults = ServeSettings(checkpoint="", port=0)
  flags.DEFINE_string("checkpoint", None, "Checkpoint directory or training workdir.", flag_values=values)
  flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port; the chosen one is printed).", flag_values=values)
  flags.DEFINE_string("host", defaults.host, "Address to listen on (0.0.0.0: every interface).", flag_values=values)
  flags.DEFINE_integer("batch_size", defaults.batch_size, "Sequences per forward pass (as score's).", flag_values=values)
  flags.DEFINE_integer("max_length", defaults.max_length, "Longest sequence; longer texts are cut as in training.",
                       flag_values=values)
  flags.DEFINE_enum("template", None, list(templates.FORMATS),
                    "Prompt template for /score items (default: the checkpoint's prompt format, else none).",
                    flag_values=values)
  flags.DEFINE_list("mesh", [str(n) for n in defaults.mesh], "Mesh shape (data, fsdp, tensor); -1 = the rest.",
                    flag_values=values)
  flags.DEFINE_integer("max_batch", defaults.max_batch, "Most sequences scored in one round of the worker.",
                       flag_values=values)
  flags.DEFINE_integer("max_queue", defaults.max_queue, "Most sequences waiting; a request beyond it gets 503.",
                       flag_values=values)
  flags.DEFINE_integer("max_items", defaults.max_items, "Most items (or queries) per request; more: 413.",
                       flag_values=values)
  flags.DEFINE_integer("max_chars", defaults.max_chars, "Most characters per item (prompt + response) or "
                       "query; more: 413.", flag_values=values)
  flags.DEFINE_float("timeout_s", defaults.timeout_s, "Seconds a request may take; later: 504.", flag_values=values)
  flags.DEFINE_bool("normalize", defaults.normalize, "Rewards (r - mean) / std by the checkpoint's reward stats "
                    "(/score requests may choose with \"normalize\").", flag_values=values)
  flags.DEFINE_enum("aggregate", None, bon.AGGREGATES, "/score: each item's reward is its step rewards "
                    "aggregated this way (requests may choose with \"aggregate\").", flag_values=values)
  flags.DEFINE_string("step_delimiter", defaults.step_delimiter, "The text between steps (--aggregate).",
                      flag_values=values)


def main(argv: list[str], values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  settings = settings_from_flags(values)
  scorer = score.RewardScorer(settings.checkpoint, settings.batch_size, settings.max_length, settings.mesh,
                              show_progress=False)
  counts = asyncio.run(serve(settings, scorer))
  print(f"stopped after {counts['requests']} requests ({counts['items']} items scored, "
        f"{sum(n for k, n in counts.items() if k.startswith('status_'))} answered with an error)", flush=True)


@dataclasses.dataclass
class ServerProcess:
  """A `serve` subprocess (`subprocess_server`): its process, base URL and output so far."""
  process: subprocess.Popen
  url: str
  output: list[str]


@contextlib.contextmanager
def subprocess_server(args: Sequence[str], startup_timeout_s: float = 300,
                      env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
  """`python -m codepmp_jax.serve --port=0 ARGS` in a subprocess, once it listens (for the load
  benchmark and the tests); on exit it gets SIGTERM (then SIGKILL after 60 s) if still running.
  A server that exits or stays silent past `startup_timeout_s` raises RuntimeError with its output."""
  process = subprocess.Popen([sys.executable, "-m", "codepmp_jax.serve", "--port=0", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env if env is not None else os.environ.copy())
  output: list[str] = []
  lines: queue.Queue = queue.Queue()

  def read() -> None:
    for line in process.stdout:
      output.append(line)
      lines.put(line)
    lines.put(None)

  threading.Thread(target=read, daemon=True).start()
  try:
    deadline = time.monotonic() + startup_timeout_s
    while True:
      try:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        raise RuntimeError(f"the server did not listen within {startup_timeout_s:g} s:\n{''.join(output)}") from None
      if line is None:
        raise RuntimeError(f"the server exited ({process.wait()}) before listening:\n{''.join(output)}")
      if line.startswith(READY_LINE):
        address = line[len(READY_LINE):].split()[0]
        break
    yield ServerProcess(process, f"http://{address}", output)
  finally:
    if process.poll() is None:
      process.send_signal(signal.SIGTERM)
      try:
        process.wait(timeout=60)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


if __name__ == "__main__":
  cli.run(main, define_flags)
