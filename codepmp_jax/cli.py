"""One way to run a command-line program: quiet start-up, one-line errors, `--verbose` for the rest.

Adopting it in a CLI module (absl flags) takes two lines:

    from codepmp_jax import cli
    ...
    if __name__ == "__main__":
      cli.run(main, define_flags)   # instead of `define_flags(); app.run(main)`

What it does:
- library noise off by default: TensorFlow/XLA C++ logs (`TF_CPP_MIN_LOG_LEVEL`, set by
  `codepmp_jax/__init__.py` before anything heavy is imported), oneDNN notices, and absl INFO
  chatter (orbax checkpointing); `--verbose` keeps all of it;
- expected errors (`EXPECTED`: a bad path, an unreadable or corrupt file, a bad value, a bad flag or
  config override, a `--config` file that does not load) end the program with ONE line `error: <message>` on stderr and exit code 2; with
  `--verbose`, or for any other exception (a bug), the traceback is shown.
A program whose `main(argv, values=flags.FLAGS)` takes its flag values can also be called in this
process (tests, other programs) with `call(main, define_flags, [...])`: fresh flag values, the same
parsing and the same one-line errors, main's return value back.
"""
from __future__ import annotations

import contextlib
import logging as logging_std
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

EXIT_USAGE = 2
# What a user can cause: wrong paths, unreadable/corrupt inputs, bad values (ConversionError,
# BadRecordError and JSON/Unicode errors are ValueErrors), bad flags.
EXPECTED: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                             PermissionError, ValueError, app.UsageError, flags.Error)


def fail(error: BaseException | str) -> NoReturn:
  """Print `error: <message>` on stderr (no traceback) and exit with code 2."""
  print(f"error: {error}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


class _Quiet(logging_std.Filter):
  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING


def quiet_logs(verbose: bool) -> None:
  """absl / Python logging at WARNING (our progress is printed, not logged) unless `verbose`."""
  if verbose:
    logging.set_verbosity(logging.INFO)
    return
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_Quiet())
  for name in ("orbax", "jax", "absl", "etils", "transformers"):
    logging_std.getLogger(name).setLevel(logging_std.WARNING)


@contextlib.contextmanager
def expected_errors(verbose: bool) -> Iterator[None]:
  """Turn an expected error raised inside into `fail(...)`; re-raise it when `verbose`."""
  try:
    yield
  except EXPECTED as e:
    if verbose:
      raise
    fail(e)


def _override_error(error: KeyError | AttributeError, argv: list[str]) -> str | None:
  """A `--config.a.b=v` override naming a field the config lacks, as one line naming the flag
  (ml_collections raises a bare KeyError / AttributeError); None if no override matches."""
  detail = error.args[0] if error.args else error
  key, _, hint = str(detail.args[0] if isinstance(detail, KeyError) else detail).partition("\n")
  key = key.strip("'\"")
  for arg in argv[1:]:
    name = arg.split("=", 1)[0]
    if arg.startswith("--") and key in name.split(".")[1:]:
      return f"{arg}: the config has no field {key!r}" + (f" ({hint.strip()})" if hint else "")
  return None


def _check_config_flags() -> None:
  """A config file that failed to load (missing, unreadable) ends here, not at its first use."""
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    try:
      filename = config_flags.get_config_filename(flag)
    except TypeError:  # not a config flag
      continue
    try:
      getattr(flag.value, "_cli_probe", None)  # a config that failed to load raises OSError on any access
    except OSError as e:
      cause = str(e.__cause__ or e).strip().splitlines()
      fail(f"--{name}={filename}: cannot load the config file ({cause[-1].strip() if cause else e})")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, ValueError) as e:  # ValueError: a config file's get_config(arg) refused arg
    if "--verbose" in argv:
      raise
    lines = str(e).strip().splitlines()  # a config file's error comes with its traceback as text
    fail(f"{lines[0]} {lines[-1]}" if len(lines) > 1 else e)
  except (KeyError, AttributeError) as e:
    message = _override_error(e, argv)
    if message is None or "--verbose" in argv:
      raise
    fail(message)
  if "--verbose" not in argv:
    _check_config_flags()
  return rest


def call(main: Callable[[list[str], flags.FlagValues], Any],
         define_flags: Callable[[flags.FlagValues], None], argv: Sequence[str]) -> Any:
  """`main(rest, values)` on `argv` (no program name) parsed into fresh flag values; see the docstring."""
  values = flags.FlagValues()
  define_flags(values)
  try:
    rest = values([main.__module__, *argv])
  except flags.Error as e:
    fail(e)
  with expected_errors(verbose=False):
    return main(rest, values)


def run(main: Callable[[list[str]], int | None], define_flags: Callable[[], None] | None = None) -> None:
  """`app.run(main)` with `--verbose`, quiet logs and one-line errors (see the module docstring); an
  int that `main` returns is the exit code."""
  if define_flags is not None:
    define_flags()
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show library logs and full tracebacks.")

  def wrapped(argv: list[str]) -> int | None:
    verbose = flags.FLAGS.verbose
    quiet_logs(verbose)
    with expected_errors(verbose):
      return main(argv)

  app.run(wrapped, flags_parser=_parse_flags)
