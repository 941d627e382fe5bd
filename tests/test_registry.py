"""The data registry: resolution order, and downloads from a local HTTP server that are good,
truncated, corrupt, cut off mid-transfer, or not there at all (server down)."""
from __future__ import annotations

import http.server
import pathlib
import socket
import subprocess
import sys

import pytest

from codepmp_jax.data import registry
from tests import local_http

NAME = "gsm8k/test"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
  """No shared data, no CODEPMP_DATA, an empty cache: only the network can provide a file."""
  monkeypatch.setattr(registry, "SHARED_DATA", tmp_path / "no_shared")
  monkeypatch.delenv(registry.DATA_ENV, raising=False)
  monkeypatch.delenv(registry.MIRROR_ENV, raising=False)
  monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
  return tmp_path / "cache"


@pytest.fixture
def server(shared_data):
  """A local mirror: `/good/`, `/truncated/`, `/corrupt/` and `/short/` (Content-Length lies)."""
  data = (shared_data / registry.DATASETS[NAME].file).read_bytes()
  bodies = {"good": (data, len(data)), "truncated": (data[:len(data) // 2], len(data) // 2),
            "corrupt": (data[:-2] + b"!\n", len(data)), "short": (data[:1000], len(data))}

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      kind = self.path.strip("/").split("/")[0]
      if kind not in bodies:
        self.send_error(404)
        return
      body, length = bodies[kind]
      self.send_response(200)
      self.send_header("Content-Length", str(length))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  with local_http.serve(Handler) as url:
    yield url


def test_registered_hashes_are_those_of_the_shared_copies(shared_data):
  for entry in registry.DATASETS.values():
    file = shared_data / entry.file
    assert (file.stat().st_size, registry.sha256_of(file)) == (entry.size, entry.sha256), entry.name


def test_resolution_order(isolated, tmp_path, monkeypatch, shared_data):
  monkeypatch.setattr(registry, "SHARED_DATA", shared_data)
  assert registry.path(NAME) == shared_data / "gsm8k" / "test.jsonl"
  mine = tmp_path / "mine" / "gsm8k" / "test.jsonl"
  mine.parent.mkdir(parents=True)
  mine.write_text("{}\n")
  monkeypatch.setenv(registry.DATA_ENV, str(tmp_path / "mine"))
  assert registry.path(NAME) == mine  # CODEPMP_DATA before ../shared/data
  assert registry.path(NAME, data_dir=shared_data) == shared_data / "gsm8k" / "test.jsonl"
  assert registry.path(NAME, explicit=mine) == mine
  with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
    registry.path(NAME, explicit=tmp_path / "nope.jsonl")
  with pytest.raises(ValueError, match="unknown data set 'gsm8k/dev'"):
    registry.path("gsm8k/dev")


def test_good_download_is_verified_cached_and_reused(isolated, server, shared_data):
  got = registry.path(NAME, mirror=f"{server}/good")
  assert got == isolated / "gsm8k" / "test.jsonl"
  assert got.read_bytes() == (shared_data / "gsm8k" / "test.jsonl").read_bytes()
  assert registry.path(NAME, mirror="http://127.0.0.1:9/unused") == got  # the cache wins now
  assert [p.name for p in got.parent.iterdir()] == ["test.jsonl"]  # no temporary files left


@pytest.mark.parametrize("kind,message", [("truncated", "got 374869 bytes, expected 749738"),
                                          ("corrupt", "does not match the registered"),
                                          ("short", "got 1000 bytes")])
def test_bad_downloads_are_never_used(isolated, server, kind, message):
  with pytest.raises(registry.DataNotFound, match=message):
    registry.path(NAME, mirror=f"{server}/{kind}")
  assert not (isolated / "gsm8k").exists() or not any((isolated / "gsm8k").iterdir())


def test_server_down_is_one_clear_line(isolated):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.raises(registry.DataNotFound) as error:
    registry.path(NAME, mirror=f"http://127.0.0.1:{port}", timeout=5)
  message = str(error.value)
  assert "\n" not in message and message.startswith("data set gsm8k/test not found (looked in ")
  assert "--data_dir=DIR" in message and registry.DATASETS[NAME].url in message
  with pytest.raises(registry.DataNotFound, match="not found"):
    registry.path(NAME, download_missing=False)


def test_cli_prints_paths_or_one_error_line(shared_data):
  root = pathlib.Path(__file__).resolve().parents[1]
  command = [sys.executable, "-m", "codepmp_jax.data.registry", f"--data_dir={shared_data}"]
  ok = subprocess.run(command + [NAME], capture_output=True, text=True, cwd=root, timeout=120)
  assert ok.returncode == 0 and ok.stdout == f"{NAME}\t{shared_data / 'gsm8k' / 'test.jsonl'}\n", ok.stderr
  bad = subprocess.run(command + ["gsm8k/dev"], capture_output=True, text=True, cwd=root, timeout=120)
  assert bad.returncode == 2 and bad.stderr.startswith("error: unknown data set 'gsm8k/dev'")
  assert len(bad.stderr.splitlines()) == 1


def test_resolve_takes_names_or_paths(isolated, monkeypatch, shared_data, tmp_path):
  monkeypatch.setattr(registry, "SHARED_DATA", shared_data)
  assert registry.resolve("logiqa2/test") == shared_data / "logiqa2" / "test.jsonl"
  assert registry.resolve(str(tmp_path / "x.jsonl")) == tmp_path / "x.jsonl"  # a path, as given
  assert str(registry.resolve("gs://bucket/gsm8k/test.jsonl")) == "gs://bucket/gsm8k/test.jsonl"
