"""Text-generation backends for the LLM strategies, behind one small interface.

`Backend.generate(prompts, *, temperature, top_p, max_tokens)` returns one completion per prompt,
in order. `OpenAIBackend` talks to any OpenAI-compatible server (vLLM, SGLang, TGI) over HTTP with
bounded concurrency, timeouts and retries with exponential backoff; the API key comes from an
environment variable and is never logged or stored in the manifest.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Protocol

RETRIABLE_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


class Backend(Protocol):
  """Anything that turns prompts into completions (HTTP server, local JAX generator)."""
  name: str

  def generate(self, prompts: list[str], *, temperature: float, top_p: float,
               max_tokens: int) -> list[str]:
    """One completion per prompt, in the prompts' order."""


class BackendError(RuntimeError):
  """A request failed for good (after retries, or with a non-retriable answer)."""


@dataclasses.dataclass
class OpenAIBackend:
  """An OpenAI-compatible `/v1/completions` (`api="completions"`) or `/v1/chat/completions` client.

  In chat mode each prompt is sent as one user message, verbatim.
  """
  base_url: str
  model: str
  api: str = "completions"
  api_key_env: str = "OPENAI_API_KEY"
  concurrency: int = 8
  timeout_s: float = 120.0
  max_retries: int = 5
  backoff_s: float = 1.0
  stats: collections.Counter = dataclasses.field(default_factory=collections.Counter, repr=False)

  def __post_init__(self):
    if self.api not in ("completions", "chat"):
      raise ValueError(f"--api must be 'completions' or 'chat', got {self.api!r}")
    base = self.base_url.rstrip("/")
    self._root = base if base.endswith("/v1") else base + "/v1"
    self._lock = threading.Lock()

  @property
  def name(self) -> str:
    return f"{self.model}@{self._root}"

  def _headers(self) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(self.api_key_env) if self.api_key_env else None
    if key:
      headers["Authorization"] = f"Bearer {key}"
    return headers

  def check(self) -> None:
    """Fail fast with a clear message when the server cannot be reached."""
    request = urllib.request.Request(f"{self._root}/models", headers=self._headers())
    try:
      with urllib.request.urlopen(request, timeout=min(self.timeout_s, 10.0)):
        pass
    except urllib.error.HTTPError:
      pass  # Reachable; some servers do not list models.
    except (urllib.error.URLError, OSError) as e:
      raise BackendError(f"cannot reach the generation server at {self._root} ({e}); is it "
                         "running, and is --base_url right?") from None

  def generate(self, prompts: list[str], *, temperature: float, top_p: float,
               max_tokens: int) -> list[str]:
    """Completions for `prompts`, at most `concurrency` requests in flight."""
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      return list(pool.map(lambda p: self._complete(p, sampling), prompts))

  def _count(self, key: str) -> None:
    with self._lock:
      self.stats[key] += 1

  def _complete(self, prompt: str, sampling: dict) -> str:
    if self.api == "chat":
      url = f"{self._root}/chat/completions"
      payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}], **sampling}
    else:
      url = f"{self._root}/completions"
      payload = {"model": self.model, "prompt": prompt, **sampling}
    data = json.dumps(payload).encode()
    last = ""
    for attempt in range(self.max_retries + 1):
      if attempt:
        self._count("retries")
        time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
      self._count("requests")
      request = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          body = json.loads(response.read())
      except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        if e.code not in RETRIABLE_STATUS:
          raise BackendError(f"{url} answered HTTP {e.code}: {detail}") from None
        last = f"HTTP {e.code}: {detail}"
        continue
      except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
        last = f"{type(e).__name__}: {e}"
        continue
      return self._text(body, url)
    self._count("failures")
    logging.error("%s: giving up after %d attempts: %s", url, self.max_retries + 1, last)
    raise BackendError(f"{url}: no answer after {self.max_retries + 1} attempts (last: {last}); "
                       "is the server up and --base_url right?")

  def _text(self, body: dict, url: str) -> str:
    try:
      choice = body["choices"][0]
      text = choice["message"]["content"] if self.api == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError):
      raise BackendError(f"{url}: response has no choices[0]."
                         f"{'message.content' if self.api == 'chat' else 'text'}: {str(body)[:300]}") from None
    return text or ""
