"""Code corpus sources: directories and git checkouts, JSONL(.gz) / Parquet dumps, and the stdlib.

Every document gets a stable `source_id` (its path relative to the source root, or `dump:line`) so
that record ids, worker splits (`--shard_index/--num_shards`) and resumption do not depend on where
the corpus lives or on the order a file system lists it. Unreadable input is yielded as a document
with an `error` (file:line and why) so the caller counts and reports it.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import pathlib
import sysconfig
from collections.abc import Iterator
from typing import Any

EXTENSIONS = {
    ".py": "python", ".ipynb": "python", ".js": "javascript", ".mjs": "javascript",
    ".ts": "typescript", ".java": "java", ".c": "c", ".h": "c", ".cc": "c++", ".cpp": "c++",
    ".hpp": "c++", ".cs": "c#", ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php",
    ".scala": "scala", ".kt": "kotlin", ".swift": "swift", ".sh": "shell", ".lua": "lua",
    ".jl": "julia", ".r": "r", ".sql": "sql", ".hs": "haskell", ".pl": "perl",
}
SKIPPED_DIRS = {".git", ".hg", ".svn", "node_modules", "__pycache__", "site-packages", ".venv"}
DUMP_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


@dataclasses.dataclass(frozen=True)
class Document:
  """One source file. `extra` carries optional fields such as HumanEval-style `test`/`entry_point`."""
  source_id: str
  content: str
  lang: str
  licenses: tuple[str, ...] | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  error: str | None = None

  @property
  def sha256(self) -> str:
    """Content hash, used for exact deduplication and the source hashes in the manifest."""
    return hashlib.sha256(self.content.encode("utf-8", "surrogatepass")).hexdigest()


def in_split(source_id: str, shard_index: int, num_shards: int) -> bool:
  """Whether this worker owns `source_id`: a hash split, stable across machines and runs."""
  if num_shards == 1:
    return True
  digest = hashlib.sha1(source_id.encode("utf-8", "surrogatepass")).digest()
  return int.from_bytes(digest[:8], "big") % num_shards == shard_index


def iter_documents(spec: str, shard_index: int = 0, num_shards: int = 1) -> Iterator[Document]:
  """Documents of one source spec (`stdlib`, a directory, or a dump file) owned by this worker."""
  if spec == "stdlib":
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    yield from _iter_directory(root, "stdlib", shard_index, num_shards)
    return
  path = pathlib.Path(spec)
  if path.is_dir():
    yield from _iter_directory(path, path.resolve().name, shard_index, num_shards)
  elif path.name.endswith((".jsonl", ".jsonl.gz")):
    yield from _iter_jsonl(path, shard_index, num_shards)
  elif path.name.endswith(".parquet"):
    yield from _iter_parquet(path, shard_index, num_shards)
  elif path.exists():
    raise ValueError(f"--source={spec}: not a directory and not one of {DUMP_SUFFIXES}")
  else:
    raise FileNotFoundError(f"--source={spec}: no such file or directory")


def _iter_directory(root: pathlib.Path, label: str, shard_index: int,
                    num_shards: int) -> Iterator[Document]:
  """Code files under `root` in sorted order, skipping VCS, cache and vendored package folders."""
  for path in _walk(root):
    lang = EXTENSIONS.get(path.suffix.lower())
    if lang is None:
      continue
    source_id = f"{label}/{path.relative_to(root).as_posix()}"
    if not in_split(source_id, shard_index, num_shards):
      continue
    try:
      text = path.read_bytes().decode("utf-8")
      if path.suffix == ".ipynb":
        text = _notebook_code(text)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
      yield Document(source_id, "", lang, error=f"{path}: unreadable: {type(e).__name__}: {e}")
      continue
    yield Document(source_id, text, lang)


def _walk(root: pathlib.Path) -> Iterator[pathlib.Path]:
  """Files under `root` depth-first in sorted name order, not following directory symlinks."""
  entries = sorted(root.iterdir(), key=lambda p: p.name)
  for entry in entries:
    if entry.is_dir():
      if not entry.is_symlink() and entry.name not in SKIPPED_DIRS and not entry.name.startswith("."):
        yield from _walk(entry)
    elif entry.is_file():
      yield entry


def _notebook_code(text: str) -> str:
  """The code cells of a Jupyter notebook, joined by blank lines."""
  cells = json.loads(text).get("cells", [])
  sources = ["".join(c.get("source", [])) if isinstance(c.get("source"), list) else c.get("source", "")
             for c in cells if c.get("cell_type") == "code"]
  return "\n\n".join(s for s in sources if s.strip()) + "\n"


def _document_from_row(row: dict[str, Any], source_id: str, where: str) -> Document:
  """A document from one dump row (The Stack fields, or HumanEval-style prompt + solution)."""
  if isinstance(row.get("content"), str):
    content = row["content"]
  elif isinstance(row.get("prompt"), str) and isinstance(row.get("canonical_solution"), str):
    content = row["prompt"] + row["canonical_solution"]
  else:
    return Document(source_id, "", "", error=f"{where}: field 'content' missing or not a string")
  try:
    content.encode("utf-8")
  except UnicodeEncodeError:
    return Document(source_id, "", "", error=f"{where}: field 'content' is not valid Unicode")
  path = row.get("path") or row.get("max_stars_repo_path") or ""
  lang = row.get("lang") or row.get("language") or EXTENSIONS.get(pathlib.PurePath(path).suffix.lower(), "")
  if not lang and "entry_point" in row:
    lang = "python"
  licenses = row.get("license", row.get("licenses", row.get("max_stars_repo_licenses")))
  if isinstance(licenses, str):
    licenses = (licenses,)
  elif licenses is not None:
    licenses = tuple(str(x) for x in licenses)
  extra = {k: row[k] for k in ("test", "entry_point") if isinstance(row.get(k), str)}
  return Document(source_id, content, str(lang).lower(), licenses, extra)


def _iter_jsonl(path: pathlib.Path, shard_index: int, num_shards: int) -> Iterator[Document]:
  """Rows of a JSONL(.gz) dump; bad lines become error documents naming file and line."""
  opener = gzip.open if path.name.endswith(".gz") else open
  with opener(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      source_id = f"{path.name}:{lineno}"
      if not raw.strip() or not in_split(source_id, shard_index, num_shards):
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        yield Document(source_id, "", "", error=f"{where}: invalid JSON: {e}")
        continue
      if not isinstance(row, dict):
        yield Document(source_id, "", "", error=f"{where}: expected a JSON object")
        continue
      yield _document_from_row(row, source_id, where)


def _iter_parquet(path: pathlib.Path, shard_index: int, num_shards: int) -> Iterator[Document]:
  """Rows of a Parquet dump, read one record batch at a time."""
  import pyarrow.parquet as pq
  row_index = 0
  for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
    for row in batch.to_pylist():
      row_index += 1
      source_id = f"{path.name}:{row_index}"
      if in_split(source_id, shard_index, num_shards):
        yield _document_from_row(row, source_id, f"{path}:row {row_index}")
