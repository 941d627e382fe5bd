"""An experiment's command line from its settings dataclass: one absl flag per field, same default.

  @dataclasses.dataclass(frozen=True)
  class DemoSettings:
    out: str = setting("demo_out", "Directory for every stage's output.")
  if __name__ == "__main__":
    settings_flags.run_program(DemoSettings, run)     # flags -> DemoSettings -> run(settings)

Fields of type str, int, float and bool become flags of that type; tuples become comma-separated
lists (their items typed like the default's first item); dict-valued fields stay at their default
(they are for callers, such as a test's smaller run). Every flag's help is its `setting` help.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from absl import app, flags

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def setting(default: Any, help: str) -> Any:
  """A settings field with its command-line help (a dict default is copied per instance)."""
  if isinstance(default, dict):
    return dataclasses.field(default_factory=lambda: dict(default), metadata={"help": help})
  return dataclasses.field(default=default, metadata={"help": help})


def _default(field: dataclasses.Field) -> Any:
  if field.default is not dataclasses.MISSING:
    return field.default
  return field.default_factory()  # type: ignore[misc]


def _flag_fields(cls: type) -> list[dataclasses.Field]:
  return [f for f in dataclasses.fields(cls) if not isinstance(_default(f), Mapping)]


def define_flags(cls: type, values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines a flag per field of `cls` (defined only when run as a program, so importing adds none)."""
  for field in _flag_fields(cls):
    default = _default(field)
    if isinstance(default, tuple):
      flags.DEFINE_list(field.name, [str(v) for v in default], field.metadata["help"],
                        flag_values=values)
    else:
      _DEFINE[type(default)](field.name, default, field.metadata["help"], flag_values=values)


def from_flags(cls: type, values: flags.FlagValues = flags.FLAGS) -> Any:
  """The settings the parsed flags give (fields without a flag keep their defaults)."""
  kwargs = {}
  for field in _flag_fields(cls):
    default, value = _default(field), values[field.name].value
    if isinstance(default, tuple):
      kind = type(default[0]) if default else str
      value = tuple(kind(v) for v in value)
    kwargs[field.name] = value
  return cls(**kwargs)


def run_program(cls: type, run: Callable[[Any], Any]) -> None:
  """The program: flags from `cls`, then `run(settings)`; a ValueError is a one-line usage error."""
  define_flags(cls)

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from codepmp_jax import train
    train.quiet_library_logs()
    try:
      run(from_flags(cls))
    except ValueError as e:
      raise app.UsageError(str(e)) from e

  app.run(main)
