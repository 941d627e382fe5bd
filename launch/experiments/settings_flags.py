"""An experiment's command line from its settings dataclass: one absl flag per field, same default.

  define_flags(DemoSettings, HELP)           # in `if __name__ == "__main__":`, before app.run
  settings = from_flags(DemoSettings)         # in main(): the flags' values as settings

Fields of type str, int, float and bool become flags of that type; tuples become comma-separated
lists (their items typed like the default's first item); dict-valued fields stay at their default
(they are for callers, such as a test's smaller run). Every flag needs a help text in `helps`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from absl import flags

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def _default(field: dataclasses.Field) -> Any:
  if field.default is not dataclasses.MISSING:
    return field.default
  return field.default_factory()  # type: ignore[misc]


def _flag_fields(cls: type) -> list[dataclasses.Field]:
  return [f for f in dataclasses.fields(cls) if not isinstance(_default(f), Mapping)]


def define_flags(cls: type, helps: Mapping[str, str],
                 values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines a flag per field of `cls` (defined only when run as a program, so importing adds none)."""
  for field in _flag_fields(cls):
    default = _default(field)
    if isinstance(default, tuple):
      flags.DEFINE_list(field.name, [str(v) for v in default], helps[field.name],
                        flag_values=values)
    else:
      _DEFINE[type(default)](field.name, default, helps[field.name], flag_values=values)


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
