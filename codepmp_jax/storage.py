"""Files that may be remote (`gs://...`): local copies for the readers that need a local file, and
JSONL outputs that grow line by line.

Every path a user gives goes through `etils.epath`, so `gs://` works wherever a file is read or
written as a stream. Three readers need a file on local disk instead: ArrayRecord's reader of
prepared shards (its C++ reader opens local paths only), and the memory-mapped safetensors and GGUF
files that `convert` reads. They read `local_copy(path, directory)`: the path itself when it is
local, else a copy made once below `directory`. Object stores cannot append, so an output that
grows line by line (`LineWriter`) is rewritten whole at each flush when it is remote.
"""
from __future__ import annotations

import hashlib
import os
import pathlib

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URI (`gs://bucket/x`) rather than a local path."""
  return "://" in os.fspath(path)


def local_copy(path: PathLike, directory: PathLike, key: str = "") -> pathlib.Path:
  """`path` itself when it is local; else its copy at `directory/<key>/<name>`, made on the first
  call (through a temporary name, so a copy cut short is never found) and found there by later
  ones. `key` names the content (a digest the caller knows), so that a remote file that changed is
  copied anew; without one it is a hash of the URI, size and modification time."""
  text = os.fspath(path)
  if not is_remote(text):
    return pathlib.Path(text)
  source = epath.Path(text)
  if not key:
    stat = source.stat()
    key = hashlib.sha256(f"{text}\0{stat.length}\0{stat.mtime}".encode()).hexdigest()[:16]
  target = pathlib.Path(directory) / key / source.name
  if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    source.copy(epath.Path(partial), overwrite=True)
    os.replace(partial, target)  # another process copying the same file writes the same bytes
  return target


class LineWriter:
  """Lines appended to a text file that may already hold some (a resumed output); `flush` makes
  those written so far durable. A local file is appended to; a remote one (object stores cannot
  append) is rewritten whole at each flush, its earlier content kept."""

  def __init__(self, path: PathLike):
    self.path = epath.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._remote = is_remote(path)
    if self._remote:
      self._lines = [self.path.read_text()] if self.path.exists() else []
    else:
      self._file = self.path.open("a")

  def write(self, line: str) -> None:
    if self._remote:
      self._lines.append(line)
    else:
      self._file.write(line)

  def flush(self) -> None:
    if self._remote:
      self.path.write_text("".join(self._lines))
    else:
      self._file.flush()

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._file.close()

  def __enter__(self) -> "LineWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
