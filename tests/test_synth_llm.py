"""The LLM strategies end to end against a real OpenAI-compatible HTTP server on localhost.

The server answers from a small deterministic program, refuses some first attempts (HTTP 503 and
429, dropped connections) and delays others. Checked: the prompts sent are exactly the paper's, the
retries recover, the API key is sent but never logged or stored, the manifest counts match, and a
run killed half-way then rerun gives the same records as an uninterrupted run.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import http.server
import inspect
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import bisect
import colorsys
import heapq
import textwrap

import pytest

from codepmp_jax import cli
from codepmp_jax.synth import __main__ as synth_main
from codepmp_jax.synth import backends
from codepmp_jax.synth.synthesize import SynthSettings, synthesize

# The paper's prompts, written out here independently of the package.
DESCRIBE = ("Please generate a corresponding instruction based on this code snippet. In the "
            "instruction you need to analyze the intent and function of this code snippet (describe "
            "the operation the code performs and how it achieves its function).\n\n#### Code "
            "snippet:\n```{code}```\n\n#### Instructions:\n")
CODE = ("### Instruction: Please read the following code description carefully and generate the "
        "actual code implementation based on this description. Please make sure the code is logical "
        "and readable.\n\n### Code Description:\n{query}\n\n### Response:")
KEY = "sk-test-9f8e7d6c5b4a"
STRONG, WEAK, DESCRIBER = "strong-coder", "weak-coder", "describer"


def _digest(text: str) -> str:
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def answer(model: str, prompt: str) -> str:
  """The server's deterministic program."""
  head, sep, _ = DESCRIBE.partition("{code}")
  if prompt.startswith(head):
    code = prompt[len(head):-len(DESCRIBE.partition("{code}")[2])]
    if "NO_DESCRIPTION" in code:
      return "  "
    marker = "SAME " if "SAME_ANSWERS" in code else "FENCE " if "EMPTY_FENCE" in code else ""
    return f"{marker}Write the function in snippet {_digest(code)}."
  head = CODE.partition("{query}")[0]
  assert prompt.startswith(head) and prompt.endswith("\n\n### Response:"), prompt[:200]
  query = prompt[len(head):-len("\n\n### Response:")]
  if query.startswith("SAME"):
    return "```python\ndef same():\n  return 1\n```"
  if query.startswith("FENCE") and model == WEAK:
    return "```python\n```"
  return f"```python\ndef solution():\n  return '{model} {_digest(query)}'\n```\nExplanation."


class Server:
  """An OpenAI-compatible server in a thread, with injected failures and delays."""

  def __init__(self, delay_s: float = 0.0):
    self.requests: list[tuple[str, dict]] = []
    self.seen: set[str] = set()
    self.failures = 0
    self.delay_s = delay_s
    self.lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def do_GET(self):
        self._send(200, {"data": [{"id": m} for m in (STRONG, WEAK, DESCRIBER)]})

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != f"Bearer {KEY}":
          return self._send(401, {"error": "bad key"})
        chat = self.path == "/v1/chat/completions"
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        key = f"{body['model']}|{prompt}"
        with server.lock:
          server.requests.append((self.path, body))
          first = key not in server.seen
          server.seen.add(key)
        kind = int(_digest(key), 16) % 5
        if first and kind in (0, 1, 2):
          with server.lock:
            server.failures += 1
          if kind == 0:
            return self._send(503, {"error": "overloaded"})
          if kind == 1:
            return self._send(429, {"error": "rate limited"})
          self.close_connection = True  # Drop the connection without an answer.
          return
        time.sleep(server.delay_s + (0.02 if kind == 3 else 0.0))
        text = answer(body["model"], prompt)
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        self._send(200, {"choices": [choice], "model": body["model"]})

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = Server()
  yield s
  s.close()


def _source(module, name: str) -> str:
  """The source of a top-level function, read from the module file (heapq's are C builtins)."""
  text = inspect.getsource(module)
  node = next(n for n in ast.parse(text).body if getattr(n, "name", None) == name)
  return ast.get_source_segment(text, node) + "\n"


def _corpus(tmp_path: pathlib.Path) -> pathlib.Path:
  root = tmp_path / "snippets"
  root.mkdir()
  functions = [(heapq, "heappush"), (heapq, "heappop"), (bisect, "insort_right"),
               (colorsys, "rgb_to_hsv"), (colorsys, "hls_to_rgb"), (textwrap, "dedent"),
               (textwrap, "indent"), (heapq, "nlargest")]
  for i, (module, name) in enumerate(functions):
    (root / f"f{i}.py").write_text(_source(module, name))
  (root / "g0.py").write_text("# NO_DESCRIPTION\n" + _source(heapq, "heapify"))
  (root / "g1.py").write_text("# SAME_ANSWERS\n" + _source(heapq, "heapreplace"))
  (root / "g2.py").write_text("# EMPTY_FENCE\n" + _source(heapq, "heappushpop"))
  return root


def _flags(corpus: pathlib.Path, out: pathlib.Path, url: str, *extra: str) -> list[str]:
  return [f"--source={corpus}", "--strategy=llm", f"--out={out}", f"--base_url={url}",
          f"--strong_model={STRONG}", f"--weak_model={WEAK}", f"--describe_model={DESCRIBER}",
          "--api_key_env=SYNTH_TEST_KEY", "--backoff_s=0.01", "--max_retries=3", "--concurrency=4",
          "--docs_per_shard=3", "--decontam_sets=", "--workers=1", "--min_bytes=50", *extra]


def _settings(corpus: pathlib.Path, out: pathlib.Path, url: str, **overrides) -> SynthSettings:
  """The settings `_flags` describes, for calling `synthesize` directly."""
  return SynthSettings(**{
      "source": (str(corpus),), "strategy": "llm", "out": str(out), "base_url": url,
      "strong_model": STRONG, "weak_model": WEAK, "describe_model": DESCRIBER,
      "api_key_env": "SYNTH_TEST_KEY", "backoff_s": 0.01, "max_retries": 3, "concurrency": 4,
      "docs_per_shard": 3, "decontam_sets": (), "workers": 1, "min_bytes": 50, **overrides})


def _records(out: pathlib.Path) -> list[dict]:
  return [json.loads(line) for p in sorted(out.glob("pairs-*.jsonl.gz"))
          for line in gzip.open(p, "rt")]


def test_llm_strategy_end_to_end(server, tmp_path, monkeypatch, caplog, capsys):
  monkeypatch.setenv("SYNTH_TEST_KEY", KEY)
  corpus = _corpus(tmp_path)
  out = tmp_path / "out"
  with caplog.at_level(logging.DEBUG):
    synthesize(_settings(corpus, out, server.url))
  manifest = json.loads((out / "manifest.json").read_text())
  assert KEY not in (out / "manifest.json").read_text()
  assert KEY not in caplog.text and KEY not in "".join(capsys.readouterr())

  codes = {p.name: p.read_text() for p in corpus.iterdir()}
  describe_sent = [b for _, b in server.requests if b["model"] == DESCRIBER]
  assert {b["prompt"] for b in describe_sent} == {DESCRIBE.replace("{code}", c) for c in codes.values()}
  assert all((b["temperature"], b["top_p"], b["max_tokens"]) == (0.7, 1.0, 1024) for b in describe_sent)
  descriptions = {answer(DESCRIBER, DESCRIBE.replace("{code}", c)).strip() for c in codes.values()}
  descriptions.discard("")
  for model in (STRONG, WEAK):
    sent = {b["prompt"] for _, b in server.requests if b["model"] == model}
    assert sent == {CODE.replace("{query}", d) for d in descriptions}
  assert server.failures > 0

  records = _records(out)
  assert len(records) == len(codes) - 3
  for r in records:
    query = r["prompt"][len(CODE.partition("{query}")[0]):-len("\n\n### Response:")]
    assert r["prompt"] == CODE.replace("{query}", query)
    assert r["chosen"] == answer(STRONG, r["prompt"]) and r["rejected"] == answer(WEAK, r["prompt"])
  counts = manifest["counts"]
  assert counts["pairs_written"] == len(records) == 8
  assert counts["corpus"]["kept"] == len(codes) == counts["strategy"]["documents"]
  assert (counts["strategy"]["empty_description"], counts["strategy"]["identical"],
          counts["strategy"]["empty_rejected"]) == (1, 1, 1)
  assert sum(s["records"] for s in manifest["shards"]) == len(records)
  stats = manifest["backend_requests"]
  assert sum(s.get("retries", 0) for s in stats.values()) == server.failures
  assert sum(s["requests"] for s in stats.values()) == len(server.requests)
  assert manifest["models"]["strong"].startswith(STRONG)
  assert manifest["prompts"] == {"describe": DESCRIBE, "code": CODE}


def test_chat_api_and_human_vs_weak(server, tmp_path, monkeypatch):
  monkeypatch.setenv("SYNTH_TEST_KEY", KEY)
  corpus = _corpus(tmp_path)
  out = tmp_path / "hvw"
  synthesize(_settings(corpus, out, server.url + "/v1/", api="chat", strategy="human_vs_weak",
                       max_pairs=4))
  paths = {p for p, _ in server.requests}
  assert paths == {"/v1/chat/completions"}
  assert all(len(b["messages"]) == 1 and b["messages"][0]["role"] == "user" for _, b in server.requests)
  assert {b["model"] for _, b in server.requests} == {DESCRIBER, WEAK}
  records = _records(out)
  assert len(records) == 4
  sources = {p.name: p.read_text() for p in corpus.iterdir()}
  for r in records:
    assert r["chosen"] == sources[r["meta"]["source"].split("/")[-1]]
    weak = answer(WEAK, r["prompt"])
    assert r["rejected"] == weak.split("```python\n")[1].split("```")[0].rstrip("\n")


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
  corpus = _corpus(tmp_path)
  with pytest.raises(backends.BackendError, match="cannot reach the generation server at http://127.0.0.1:9/v1"):
    synthesize(_settings(corpus, tmp_path / "o", "http://127.0.0.1:9"))
  with pytest.raises(SystemExit) as exit_:  # the CLI: one error line, exit status 2
    cli.call(synth_main.main, synth_main.define_flags, _flags(corpus, tmp_path / "o", "http://127.0.0.1:9"))
  assert exit_.value.code == 2
  err = capsys.readouterr().err.splitlines()
  assert err[-1].startswith("error: cannot reach the generation server at http://127.0.0.1:9/v1")
  assert "Traceback" not in "\n".join(err)


@pytest.mark.slow
def test_kill_and_rerun_gives_the_uninterrupted_records(tmp_path, monkeypatch):
  monkeypatch.setenv("SYNTH_TEST_KEY", KEY)
  corpus = _corpus(tmp_path)
  slow = Server(delay_s=0.15)
  try:
    killed = tmp_path / "killed"
    flags = _flags(corpus, killed, slow.url, "--docs_per_shard=1")
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "codepmp_jax.synth", *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(killed.glob("pairs-*.jsonl.gz"))) < 3 and time.time() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    written = len(list(killed.glob("pairs-*.jsonl.gz")))
    assert 3 <= written < 11
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    slow.delay_s = 0.0
    synthesize(_settings(corpus, killed, slow.url, docs_per_shard=1))  # resumes the killed CLI run
    whole = tmp_path / "whole"
    synthesize(_settings(corpus, whole, slow.url, docs_per_shard=1))
  finally:
    slow.close()
  a, b = _records(killed), _records(whole)
  assert a == b and len(a) == 8 and len({r["id"] for r in a}) == 8
  ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (killed, whole))
  assert ma["counts"] == mb["counts"] and ma["shards"] == mb["shards"]
