"""Job descriptions, checked field by field: keys, required fields and types.

A job file (JSON, or TOML by its ``.toml`` suffix) is one table of
:class:`~meshfed.training.spec.JobSpec` fields, a nested table for a field that is a
dataclass (a group of the spec, ``own_data``). :func:`from_mapping` refuses, before anything
runs, an unknown key (with the closest known one: ``epoch: unknown job field; did you mean
'epochs'?``), a missing required field (``job_id``, ``roster``) and a value of the wrong type
(``rounds: expected an integer, got '3'``); :func:`check_types` makes the same type check on a
``JobSpec`` built in Python. The rules that relate fields come after, in ``JobSpec`` itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..errors import ConfigError

__all__ = ["check_types", "from_mapping", "read_document"]

T = TypeVar("T")

_KINDS: dict[object, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    Any: "any value",
}


def read_document(path: Path) -> dict[str, Any]:
    """The table in a job file: TOML if its name ends in ``.toml``, else JSON.

    Raises:
        ConfigError: the file cannot be read or parsed, or is not one table.
    """
    try:
        text = path.read_text()
        document = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSON and TOML errors
        raise ConfigError(f"cannot read job file {path}: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"job file {path}: expected one table of job fields")
    return document


def from_mapping(cls: type[T], document: Mapping[str, Any]) -> T:
    """An instance of the dataclass ``cls`` from ``document``: every key a field, every
    field without a default present, every value of its field's type (JSON lists become
    tuples where the field is a tuple).

    Raises:
        ConfigError: naming the field, and the closest known key or the expected type.
    """
    if not isinstance(document, Mapping):
        raise ConfigError(f"expected a table of job fields, got {type(document).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in document:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(fields)}"
            raise ConfigError(f"{key}: unknown job field; {hint}")
    missing = [
        name
        for name, f in fields.items()
        if name not in document
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required (every job names these fields)")
    hints = _type_hints(cls)
    values = {key: _checked(key, hints[key], value) for key, value in document.items()}
    return cls(**values)


def check_types(instance: object) -> None:
    """Check every field of the dataclass ``instance`` against its annotation, in place:
    ints become floats where a float is declared, lists become tuples where a tuple is.

    Raises:
        ConfigError: ``<field>: expected <type>, got <value>``.
    """
    hints = _type_hints(type(instance))
    for f in dataclasses.fields(instance):  # type: ignore[arg-type]
        value = getattr(instance, f.name)
        checked = _checked(f.name, hints[f.name], value)
        if checked is not value:
            object.__setattr__(instance, f.name, checked)  # frozen: only in __post_init__


#: each job dataclass's resolved annotations (resolving evaluates every string annotation:
#: a job is checked field by field at every submission, order and RFQ)
_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _checked(key: str, hint: Any, value: Any) -> Any:
    """``value`` as of type ``hint`` (ints widened to float, lists to tuples, a table to the
    dataclass ``hint``), or a ConfigError naming ``key`` (``key.field`` inside a table)."""
    if _is_table(hint) and isinstance(value, Mapping):
        try:
            return from_mapping(hint, value)
        except ConfigError as exc:
            raise ConfigError(f"{key}.{exc}") from None
    result = _convert(hint, value)
    if result is _WRONG:
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
    return result


_WRONG = object()


def _is_table(hint: Any) -> bool:
    """Whether ``hint`` is a dataclass, which a job document gives as a table."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _convert(hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if _is_table(hint):
        return value if isinstance(value, hint) else _WRONG
    if hint is float:
        if type(value) is int:
            return float(value)
        return value if type(value) is float else _WRONG
    if hint in (int, str, bool):
        return value if type(value) is hint else _WRONG
    if origin is Literal:
        return value if value in args else _WRONG
    if origin in (types.UnionType, typing.Union):
        for option in args:
            result = _convert(option, value)
            if result is not _WRONG:
                return result
        return _WRONG
    if hint is type(None):
        return value if value is None else _WRONG
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list | tuple):
            return _WRONG
        items = tuple(_convert(args[0], item) for item in value)
        if any(item is _WRONG for item in items):
            return _WRONG
        return value if items == tuple(value) and isinstance(value, tuple) else items
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return _WRONG
        return value
    return value  # an annotation this checker does not know: the field checks itself


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _KINDS:
        return _KINDS[hint]
    if _is_table(hint):
        return "a table"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a table (string keys)"
    return getattr(hint, "__name__", str(hint))
