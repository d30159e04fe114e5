"""Typed settings: one frozen dataclass per concept; CLI flags and YAML / `--set` checks follow from it.

As LitGPT derives its command line from dataclasses, each settings class here is the one
place that names a setting, its type, default and help: `add_arguments` turns the fields
into argparse flags, `from_mapping` checks a YAML block or `--set` overrides against the
real type hints (unknown keys get a "did you mean"), and the class's own `validate`
checks values that depend on each other. Field metadata:

    help      the flag's help text
    positive  numbers must be >= 1
    flag      False: not offered on the command line (set in YAML or by code only)
and whatever a class adds for its own use (e.g. `family` in `PruneSettings`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from harness.errors import HarnessError

T = TypeVar("T")
COMMAND_LINE = "command line"


def setting(default: Any, help: str = "", *, positive: bool = False, flag: bool = True, **meta: Any) -> Any:
    """A dataclass field with the metadata `add_arguments` and `from_mapping` read (plus the class's own, `meta`)."""
    return dataclasses.field(default=default, metadata={"help": help, "positive": positive, "flag": flag, **meta})


def names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def fits(value: Any, tp: Any) -> bool:
    """Whether a value read from YAML or `--set` fits a type hint (bools are not numbers; ints are floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in typing.get_args(tp))
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return not args or all(fits(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # a type this checker does not know is left to the class's validate()


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_mapping(cls, mapping: Mapping, where: str) -> None:
    """Refuse unknown keys, values of the wrong type and non-positive sizes, each as one error naming the key.

    `where` names the block (`spec.yaml: prune.settings`); `COMMAND_LINE` names keys as flags.
    """
    if not isinstance(mapping, Mapping):
        raise HarnessError(f"{where} must be a mapping, got {mapping!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if where == COMMAND_LINE else f"{where}.{key}"

    for key, value in mapping.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), 1)
            hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(fields)}"
            raise HarnessError(f"{where} has unknown setting {key!r}{hint}")
        if not fits(value, hints[key]):
            raise HarnessError(f"{name(key)} must be {_describe(hints[key])}, got {value!r}")
        if fields[key].metadata.get("positive") and value is not None and value < 1:
            raise HarnessError(f"{name(key)} must be >= 1, got {value!r}")


def from_mapping(cls: type[T], mapping: Mapping | None, where: str, base: T | None = None) -> T:
    """`base` (or the defaults) with `mapping` applied, checked field by field and then by `validate()`."""
    mapping = dict(mapping or {})
    check_mapping(cls, mapping, where)
    made = dataclasses.replace(base, **mapping) if base is not None else cls(**mapping)
    return made.validate() if hasattr(made, "validate") else made


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--kebab-case` flag per field whose metadata allows it; defaults from the class."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        help_ = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=help_)
            continue
        kinds = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        convert = _number if {int, float} <= set(kinds) else next((k for k in (int, float) if k in kinds), str)
        parser.add_argument(flag, dest=f.name, type=convert, default=f.default,
                            help=f"{help_} (default: {f.default})" if f.default is not None else help_)


def _number(text: str) -> int | float:
    """'200' -> 200, '0.5' -> 0.5 (a count or a fraction)."""
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


_number.__name__ = "number"  # argparse names the type in its error message


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The settings the parsed flags describe (fields without a flag keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return from_mapping(cls, given, COMMAND_LINE)


def parse_overrides(pairs: list[str] | None, flag: str = "--set") -> dict:
    """`--set lr=1e-4 --set language_model=full` -> typed dict (each value read as a YAML scalar)."""
    import yaml

    from harness.io import load_yaml

    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise HarnessError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = load_yaml(value)
        except yaml.YAMLError:
            raise HarnessError(f"{flag} {key}: {value!r} is not a YAML value") from None
    return out
