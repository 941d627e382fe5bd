"""The public data sets the project reads, found wherever they are (or downloaded and checked).

  registry.path("gsm8k/test")            # -> a local file, or DataNotFound (one clear line)
  registry.resolve(arg)                  # a CLI argument: a registered name or a path
  python -m codepmp_jax.data.registry [--data_dir=DIR] [NAME ...]   # find or fetch, print paths

Each data set has its official download URL and the sha256 of that file. `path(name)` resolves in
this order, the first hit winning:
1. an explicit path (`explicit=`), used as given;
2. `data_dir` (a `--data_dir` flag) or else the `CODEPMP_DATA` environment variable: `DIR/<file>`;
3. `../shared/data` beside the checkout (this project's machines and CI);
4. the user's cache, `$CODEPMP_CACHE` or `~/.cache/codepmp_jax` (files there were verified);
5. a download into the cache from the official URL (or from `mirror`/`$CODEPMP_DATA_MIRROR`,
   a base URL serving the same layout), streamed to a temporary file beside the target, checked
   against the size and sha256, and only then renamed into place: a partial or corrupt download is
   never used. `<file>` is the layout of `../shared/data` (e.g. `gsm8k/test.jsonl`).
With no copy and no network, `DataNotFound` (a FileNotFoundError) says in one line which data set,
where it looked and how to provide it.

ReClor is not registered: its licence requires a request form and forbids redistribution (give
its files by path). LogiQA 2.0 ships `.txt` files of JSON lines; they are stored here under the
name `.jsonl`, unchanged. The registered sizes and sha256 are those of the official files (checked
against openai/grade-school-math at 3101c7d and csitfun/LogiQA2.0 at 955e1d3, Dec 2026), which are
also byte-identical to the copies in `../shared/data`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import re
import tempfile
import urllib.request

from etils import epath

CACHE_ENV, DATA_ENV, MIRROR_ENV = "CODEPMP_CACHE", "CODEPMP_DATA", "CODEPMP_DATA_MIRROR"
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class DataFile:
  """One registered file: where it lives in a data directory, where it comes from, its checksum."""
  name: str
  file: str
  url: str
  sha256: str
  size: int
  license: str


_GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
_LOGIQA2 = "https://raw.githubusercontent.com/csitfun/LogiQA2.0/main/logiqa/DATA/LOGIQA"
DATASETS: dict[str, DataFile] = {d.name: d for d in (
    DataFile("gsm8k/train", "gsm8k/train.jsonl", f"{_GSM8K}/train.jsonl",
             "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 4166206, "MIT"),
    DataFile("gsm8k/test", "gsm8k/test.jsonl", f"{_GSM8K}/test.jsonl",
             "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 749738, "MIT"),
    DataFile("logiqa2/dev", "logiqa2/dev.jsonl", f"{_LOGIQA2}/dev.txt",
             "bbefb563b7ddc02640ccdc314c1315d5727dba48539d0ecdd126fa351e511b09", 1770764, "CC BY-NC-SA 4.0"),
    DataFile("logiqa2/test", "logiqa2/test.jsonl", f"{_LOGIQA2}/test.txt",
             "71940b37ae0184b677c253a148d57ad4e75d6113447b1563c2ca82483e4e4f8d", 1740565, "CC BY-NC-SA 4.0"),
)}


class _BadDownload(OSError):
  """A download that cannot be used (its message names the URL)."""


class DataNotFound(FileNotFoundError):
  """A registered data set has no local copy and could not be downloaded (the message says why)."""


def cache_dir() -> pathlib.Path:
  """Where downloads go: `$CODEPMP_CACHE`, else `~/.cache/codepmp_jax`."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "codepmp_jax")


def _entry(name: str) -> DataFile:
  if name not in DATASETS:
    raise ValueError(f"unknown data set {name!r}; registered: {sorted(DATASETS)}")
  return DATASETS[name]


def sha256_of(path: str | os.PathLike) -> str:
  """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def download(entry: DataFile, dest: pathlib.Path, url: str | None = None, timeout: float = 60) -> pathlib.Path:
  """Fetch `entry` to `dest` via a temporary file, renamed only after the size and sha256 match.

  Raises OSError (the URL and what went wrong) on a network error, a short read or a bad checksum;
  nothing is left at `dest` then.
  """
  url = url or entry.url
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
  try:
    digest, size = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
      for block in iter(lambda: response.read(1 << 20), b""):
        digest.update(block)
        out.write(block)
        size += len(block)
    if size != entry.size:
      raise _BadDownload(f"{url}: got {size} bytes, expected {entry.size} (truncated or changed download)")
    if digest.hexdigest() != entry.sha256:
      raise _BadDownload(f"{url}: sha256 {digest.hexdigest()} does not match the registered {entry.sha256}")
    os.replace(tmp, dest)
  except BaseException as e:
    pathlib.Path(tmp).unlink(missing_ok=True)
    if isinstance(e, (OSError, ValueError, http.client.HTTPException)) and not isinstance(e, _BadDownload):
      raise _BadDownload(f"{url}: {type(e).__name__}: {e}") from e  # refused, timeout, short read, bad URL
    raise
  return dest


def path(name: str, explicit: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
         download_missing: bool = True, mirror: str | None = None, timeout: float = 60) -> epath.Path:
  """The local file of data set `name` (see the module docstring for the order searched)."""
  entry = _entry(name)
  if explicit:
    explicit = epath.Path(explicit)
    if not explicit.exists():
      raise FileNotFoundError(f"{explicit}: no such file (given for data set {name})")
    return explicit
  data_dir = data_dir or os.environ.get(DATA_ENV)
  places = ([epath.Path(data_dir) / entry.file] if data_dir else []) + [epath.Path(SHARED_DATA / entry.file)]
  for place in places:
    if place.exists():
      return place
  cached = cache_dir() / entry.file
  if cached.exists() and cached.stat().st_size == entry.size:
    return epath.Path(cached)
  places.append(epath.Path(cached))
  looked = ", ".join(str(p) for p in places)
  how = (f"give --data_dir=DIR (or CODEPMP_DATA=DIR) with {entry.file} inside, or download {entry.url} "
         f"to {cached}")
  if not download_missing:
    raise DataNotFound(f"data set {name} not found (looked in {looked}); {how}")
  mirror = mirror or os.environ.get(MIRROR_ENV)
  url = f"{mirror.rstrip('/')}/{entry.file}" if mirror else entry.url
  try:
    return epath.Path(download(entry, cached, url, timeout))
  except OSError as e:
    raise DataNotFound(f"data set {name} not found (looked in {looked}) and the download failed "
                       f"({e}); {how}") from None


_NAME_LIKE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_-]+$")  # `family/split`: a mistyped name, not a file


def resolve(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> epath.Path:
  """A command line's data argument: a registered name (`gsm8k/test`) is found by `path`, anything
  else is a path, used as given."""
  if isinstance(spec, str) and spec in DATASETS:
    return path(spec, data_dir=data_dir)
  if isinstance(spec, str) and _NAME_LIKE.match(spec) and not os.path.exists(spec):
    raise FileNotFoundError(f"{spec}: not a registered data set and no such file; registered: "
                            f"{', '.join(sorted(DATASETS))} (or give a file's path)")
  return epath.Path(spec)


def main(argv: list[str]) -> None:
  """Resolve (fetching where needed) the named data sets, or all of them, and print their paths."""
  from absl import flags
  names = argv[1:] or sorted(DATASETS)
  for name in names:
    print(f"{name}\t{path(name, data_dir=flags.FLAGS.data_dir)}")


if __name__ == "__main__":
  from absl import flags

  from codepmp_jax import cli
  flags.DEFINE_string("data_dir", None, f"Directory holding the data sets (default: ${DATA_ENV}, ../shared/data, the cache).")
  cli.run(main)
