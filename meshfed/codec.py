"""Strict msgpack encoding of frozen dataclasses: the schema language of the wire.

A message body is a msgpack array holding the dataclass fields in declaration order. Each
field's Python annotation is its schema: ``int``, ``float``, ``bool``, ``str``, ``bytes``,
:class:`~meshfed.identity.PeerId` (38 raw bytes), ``list[X]``, ``X | None`` and nested
dataclasses. Sizes are bounded per field with :func:`bounded`; unbounded strings, byte strings
and lists get the defaults below, so nothing a peer sends can make us allocate without limit.

Decoding is strict: a wrong element count, a wrong msgpack type (``True`` is not an ``int``,
an ``int`` is not a ``float``), an out-of-range value, or an over-long field raises
:class:`~meshfed.errors.RemoteProtocolError` with reason ``BAD_FIELD``. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import RemoteProtocolError
from .identity import PeerId
from .stats import RejectReason

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ITEMS",
    "Bounds",
    "Schema",
    "bounded",
    "schema_of",
]

DEFAULT_MAX_BYTES = 64 * 1024
DEFAULT_MAX_ITEMS = 4096
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Bounds:
    """Limits for one field: lengths of str/bytes/lists, range of numbers."""

    max_len: int | None = None
    min_len: int = 0
    ge: float | None = None
    le: float | None = None


def bounded(
    *,
    max_len: int | None = None,
    min_len: int = 0,
    ge: float | None = None,
    le: float | None = None,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with wire bounds.

    Example: ``nonce: bytes = bounded(min_len=16, max_len=16)``.
    """
    bounds = Bounds(max_len=max_len, min_len=min_len, ge=ge, le=le)
    metadata = {"bounds": bounds}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _reject(path: str, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{path}: {message}", reason=RejectReason.BAD_FIELD)


Encoder = Callable[[Any], Any]
Decoder = Callable[[Any, str], Any]


def _scalar(kind: type, bounds: Bounds) -> tuple[Encoder, Decoder]:
    def check_len(value: Any, path: str) -> None:
        limit = bounds.max_len if bounds.max_len is not None else DEFAULT_MAX_BYTES
        if not bounds.min_len <= len(value) <= limit:
            raise _reject(path, f"length {len(value)} outside [{bounds.min_len}, {limit}]")

    def check_range(value: float, path: str) -> None:
        if bounds.ge is not None and value < bounds.ge:
            raise _reject(path, f"{value} < {bounds.ge}")
        if bounds.le is not None and value > bounds.le:
            raise _reject(path, f"{value} > {bounds.le}")

    if kind is bool:

        def decode_bool(value: Any, path: str) -> bool:
            if type(value) is not bool:
                raise _reject(path, f"expected bool, got {type(value).__name__}")
            return value

        return bool, decode_bool
    if kind is int:

        def decode_int(value: Any, path: str) -> int:
            if type(value) is not int or not _INT64_MIN <= value <= _UINT64_MAX:
                raise _reject(path, f"expected int, got {type(value).__name__}")
            check_range(value, path)
            return value

        return int, decode_int
    if kind is float:

        def decode_float(value: Any, path: str) -> float:
            if type(value) is not float:
                raise _reject(path, f"expected float, got {type(value).__name__}")
            if value != value:
                raise _reject(path, "NaN is not allowed")
            check_range(value, path)
            return value

        return float, decode_float
    if kind is str:

        def decode_str(value: Any, path: str) -> str:
            if type(value) is not str:
                raise _reject(path, f"expected str, got {type(value).__name__}")
            check_len(value, path)
            return value

        return str, decode_str
    if kind is bytes:

        def decode_bytes(value: Any, path: str) -> bytes:
            if type(value) is not bytes:
                raise _reject(path, f"expected bytes, got {type(value).__name__}")
            check_len(value, path)
            return value

        return bytes, decode_bytes
    if kind is PeerId:

        def decode_peer(value: Any, path: str) -> PeerId:
            if type(value) is not bytes:
                raise _reject(path, f"expected peer id bytes, got {type(value).__name__}")
            try:
                return PeerId.of(value)
            except ValueError as exc:
                raise _reject(path, str(exc)) from None

        return (lambda peer: peer.raw), decode_peer
    raise TypeError(f"no wire encoding for {kind!r}")


def _field_codec(annotation: Any, bounds: Bounds) -> tuple[Encoder, Decoder]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        encode_inner, decode_inner = _field_codec(inner, bounds)

        def decode_optional(value: Any, path: str) -> Any:
            return None if value is None else decode_inner(value, path)

        return (lambda v: None if v is None else encode_inner(v)), decode_optional
    if origin is list:
        encode_item, decode_item = _field_codec(args[0], Bounds())
        limit = bounds.max_len if bounds.max_len is not None else DEFAULT_MAX_ITEMS

        def decode_list(value: Any, path: str) -> list[Any]:
            if type(value) is not list:
                raise _reject(path, f"expected list, got {type(value).__name__}")
            if not bounds.min_len <= len(value) <= limit:
                raise _reject(path, f"{len(value)} items outside [{bounds.min_len}, {limit}]")
            try:
                return [decode_item(item, path) for item in value]
            except RemoteProtocolError:
                for i, item in enumerate(value):  # again, to name the bad item
                    decode_item(item, f"{path}[{i}]")
                raise

        return (lambda v: [encode_item(item) for item in v]), decode_list
    if annotation is not PeerId and dataclasses.is_dataclass(annotation):
        assert isinstance(annotation, type)
        nested = schema_of(annotation)
        return nested.encode, nested.decode
    return _scalar(annotation, bounds)


class Schema:
    """Encoder/decoder for one dataclass; build it once with :func:`schema_of`."""

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls
        hints = typing.get_type_hints(cls)
        self._names: list[str] = []
        self._codecs: list[tuple[Encoder, Decoder]] = []
        self._fields: list[tuple[str, str, Decoder]] = []  # name, ".name", decoder
        for f in dataclasses.fields(cls):
            bounds = f.metadata.get("bounds", Bounds())
            self._names.append(f.name)
            self._codecs.append(_field_codec(hints[f.name], bounds))
            self._fields.append((f.name, "." + f.name, self._codecs[-1][1]))

    def encode(self, value: Any) -> list[Any]:
        """The msgpack-ready list of ``value``'s fields."""
        return [
            enc(getattr(value, name))
            for name, (enc, _) in zip(self._names, self._codecs, strict=True)
        ]

    def decode(self, value: Any, path: str = "") -> Any:
        """Build the dataclass from a decoded msgpack list.

        Raises:
            RemoteProtocolError: with reason ``BAD_FIELD`` naming the offending field.
        """
        path = path or self.cls.__name__
        if type(value) is not list or len(value) != len(self._names):
            raise _reject(path, f"expected a list of {len(self._names)} fields")
        kwargs = {
            name: dec(item, path + suffix)
            for (name, suffix, dec), item in zip(self._fields, value, strict=True)
        }
        try:
            return self.cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise _reject(path, str(exc)) from None


_SCHEMAS: dict[type[Any], Schema] = {}


def schema_of(cls: type[Any]) -> Schema:
    """The (cached) :class:`Schema` of dataclass ``cls``."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = Schema(cls)
    return schema
