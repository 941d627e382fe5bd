"""The preference-pair record and the bookkeeping of bad input.

A record is one JSON line `{"prompt", "chosen", "rejected"}` with optional `"margin"`, `"id"` and
`"meta"`. Every loader reports what it could not use to a `BadRecords` counter, by kind and with the
`file:line` of the first few, so nothing disappears uncounted; in strict mode malformed input is an
error instead.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import io
import json
import math
import os
import zlib
from collections.abc import Iterator
from typing import Any

from etils import epath

# Malformed input: an error under --strict.
MALFORMED_KINDS = ("invalid_json", "invalid_utf8", "missing_field", "non_string_field",
                   "bad_value", "identical_pair", "empty_file", "corrupt_file")
# Well-formed input that a loader cannot turn into a pair (counted, never an error).
UNUSABLE_KINDS = ("empty_response", "no_valid_perturbation", "fewer_rejected_than_asked")
KINDS = MALFORMED_KINDS + UNUSABLE_KINDS
EXAMPLES_KEPT = 5


class BadRecordError(ValueError):
  """Malformed input found in strict mode; the message names file, line and field."""


@dataclasses.dataclass(frozen=True)
class PairRecord:
  """One preference pair: `prompt` followed by a better (`chosen`) and a worse (`rejected`) response."""
  prompt: str
  chosen: str
  rejected: str
  margin: float | None = None
  id: str | None = None
  meta: dict | None = None

  def to_json(self) -> dict[str, Any]:
    """The interchange JSON object (optional fields only when set)."""
    out = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
    for name in ("margin", "id", "meta"):
      if getattr(self, name) is not None:
        out[name] = getattr(self, name)
    return out


@dataclasses.dataclass
class BadRecords:
  """Counts of unusable input by kind, with `file:line: message` of the first few of each kind."""
  strict: bool = False
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  # The field names of records that lacked a field a format reads (how many records had each set):
  # what `loaders.nothing_loaded` reads to suggest the format the records look like.
  field_sets: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, kind: str, where: str, message: str) -> None:
    """Count one unusable input at `where` ("file:line"); raise if strict and it is malformed."""
    if kind not in KINDS:
      raise ValueError(f"unknown bad-record kind {kind!r}")
    if self.strict and kind in MALFORMED_KINDS:
      raise BadRecordError(f"{where}: {kind}: {message}")
    self.counts[kind] += 1
    kept = self.examples.setdefault(kind, [])
    if len(kept) < EXAMPLES_KEPT:
      kept.append(f"{where}: {message}")

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def to_dict(self) -> dict[str, int]:
    """Every known kind with its count (zeros included, so a manifest is explicit)."""
    return {kind: int(self.counts.get(kind, 0)) for kind in KINDS}

  def report(self) -> str:
    """A human-readable summary: counts by kind and the first few locations."""
    if not self.total:
      return "no bad records"
    lines = [f"{self.total} bad records:"]
    for kind in KINDS:
      if self.counts.get(kind):
        lines.append(f"  {kind}: {self.counts[kind]}")
        lines.extend(f"    {example}" for example in self.examples.get(kind, []))
    return "\n".join(lines)


def open_text_lines(path: str | os.PathLike, bad: BadRecords) -> Iterator[tuple[str, str]]:
  """(`file:line`, text) for each non-blank line of a plain or gzipped UTF-8 file.

  Lines that are not valid UTF-8, files without any line and a file that cannot be read to its end
  (a truncated or corrupt gzip: the lines before the damage are kept) are counted in `bad`.
  """
  path = epath.Path(path)
  seen = False
  try:
    for number, raw in _numbered_lines(path, "rb"):
      where = f"{path}:{number}"
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        bad.add("invalid_utf8", where, f"not UTF-8 ({e.reason} at byte {e.start})")
        seen = True
        continue
      if text.strip():
        seen = True
        yield where, text
  except _CorruptFile as e:
    bad.add("corrupt_file", e.where, f"{e.message}; the rest of the file is skipped")
    seen = True
  if not seen:
    bad.add("empty_file", f"{path}:0", "the file holds no records")


class _CorruptFile(Exception):
  def __init__(self, where: str, message: str):
    super().__init__(f"{where}: {message}")
    self.where, self.message = where, message


def _numbered_lines(path: epath.Path, mode: str) -> Iterator[tuple[int, Any]]:
  """(line number, line) of a plain or gzipped file (local or `gs://...`); damage to a gzip stream
  raises _CorruptFile."""
  number = 0
  with path.open("rb") as raw:
    f = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
    if "t" in mode:
      f = io.TextIOWrapper(f, encoding="utf-8")
    try:
      for number, line in enumerate(f, start=1):
        yield number, line
    except (EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError) as e:
      raise _CorruptFile(f"{path}:{number + 1}", f"unreadable from this line on ({e})") from None


def read_json_lines(path: str | os.PathLike, bad: BadRecords) -> Iterator[tuple[str, dict]]:
  """(`file:line`, object) for each JSON-object line; invalid lines are counted in `bad`."""
  for where, text in open_text_lines(path, bad):
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      bad.add("invalid_json", where, f"{e.msg} at column {e.colno}")
      continue
    if not isinstance(obj, dict):
      bad.add("invalid_json", where, f"expected a JSON object, got {type(obj).__name__}")
      continue
    yield where, obj


def read_json_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
  """(line number, object) for each non-blank line of a plain or gzipped JSONL file, for inputs
  where a malformed line is an error (candidates, prompts to generate) rather than counted."""
  path = epath.Path(path)
  try:
    for line_no, line in _numbered_lines(path, "rt"):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
      yield line_no, record
  except _CorruptFile as e:
    raise ValueError(str(e)) from None


def read_parquet_rows(path: str | os.PathLike, bad: BadRecords) -> Iterator[tuple[str, dict]]:
  """(`file:row`, row) for each row of a Parquet file (rows numbered from 1); a file pyarrow
  cannot read (truncated, not Parquet) is counted as `corrupt_file`."""
  import pyarrow  # only Parquet input needs it
  import pyarrow.parquet as pq
  try:
    with epath.Path(path).open("rb") as f:
      table = pq.read_table(f)
  except (pyarrow.ArrowException, OSError, ValueError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    bad.add("corrupt_file", f"{path}:0", f"not a readable Parquet file ({first})")
    return
  if not table.num_rows:
    bad.add("empty_file", f"{path}:0", "the file holds no rows")
  for number, row in enumerate(table.to_pylist(), start=1):
    yield f"{path}:{number}", row


def get_strs(obj: dict, fields: tuple[str, ...] | list[str], where: str, bad: BadRecords) -> list[str] | None:
  """`[obj[f] for f in fields]` if every one is a string, else None after counting the RECORD once
  (missing fields before wrong types), its message naming every field at fault."""
  missing = [f for f in fields if obj.get(f) is None]
  if missing:
    bad.field_sets[tuple(sorted(obj))] += 1
    names = ", ".join(repr(f) for f in missing)
    bad.add("missing_field", where, f"field{'s' if len(missing) > 1 else ''} {names} "
            f"{'are' if len(missing) > 1 else 'is'} missing (the record has: {', '.join(sorted(obj)) or 'nothing'})")
    return None
  wrong = [f for f in fields if not isinstance(obj[f], str)]
  if wrong:
    bad.add("non_string_field", where, ", ".join(f"field {f!r} is {type(obj[f]).__name__}" for f in wrong)
            + ", not a string")
    return None
  return [obj[f] for f in fields]


def get_str(obj: dict, field: str, where: str, bad: BadRecords, *, allow_empty: bool = True) -> str | None:
  """`obj[field]` if it is a string, else None after counting the record as bad."""
  if field not in obj or obj[field] is None:
    bad.field_sets[tuple(sorted(obj))] += 1
    bad.add("missing_field", where, f"field {field!r} is missing")
    return None
  value = obj[field]
  if not isinstance(value, str):
    bad.add("non_string_field", where, f"field {field!r} is {type(value).__name__}, not a string")
    return None
  if not allow_empty and not value.strip():
    bad.add("empty_response", where, f"field {field!r} is empty")
    return None
  return value


def make_pair(prompt: str, chosen: str, rejected: str, where: str, bad: BadRecords, *,
              margin: Any = None, id: Any = None, meta: Any = None) -> PairRecord | None:
  """A validated `PairRecord`, or None after counting why it is unusable."""
  if chosen == rejected:
    bad.add("identical_pair", where, "chosen and rejected are identical")
    return None
  if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                             or not math.isfinite(margin)):
    bad.add("bad_value", where, f"field 'margin' is {margin!r}, not a finite number")
    return None
  if meta is not None and not isinstance(meta, dict):
    bad.add("bad_value", where, f"field 'meta' is {type(meta).__name__}, not an object")
    return None
  return PairRecord(prompt, chosen, rejected, None if margin is None else float(margin),
                    None if id is None else str(id), meta)
