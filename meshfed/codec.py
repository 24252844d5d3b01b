"""Strict msgpack encoding of frozen dataclasses: the schema language of the wire.

A message body is a msgpack array holding the dataclass fields in declaration order. Each
field's Python annotation is its schema: ``int``, ``float``, ``bool``, ``str``, ``bytes``,
:class:`~meshfed.identity.PeerId` (38 raw bytes), ``list[X]``, ``X | None`` and nested
dataclasses. Sizes are bounded per field with :func:`bounded`; unbounded strings, byte strings
and lists get the defaults below, so nothing a peer sends can make us allocate without limit.

Decoding is strict: a wrong element count, a wrong msgpack type (``True`` is not an ``int``,
an ``int`` is not a ``float``), an out-of-range value, or an over-long field raises
:class:`~meshfed.errors.RemoteProtocolError` with reason ``BAD_FIELD``. Nothing is pickled.

Parsing is bounded by the schema before any field is looked at (:meth:`Schema.unpack`): a schema
knows the longest array and the most arrays a valid document holds (:attr:`Schema.max_items`,
:attr:`Schema.max_arrays`), and msgpack stops at the first array over either, so a hostile
document (a megabyte of nested empty arrays) costs a few operations, not a million objects.
String and byte lengths count what Python holds: code points for ``str``, bytes for ``bytes``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from .errors import RemoteProtocolError
from .identity import PeerId
from .stats import RejectReason

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ITEMS",
    "Bounds",
    "ContainerBudget",
    "UNPACK_ERRORS",
    "bounded_reader",
    "bounded_unpack",
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


@dataclass(frozen=True, slots=True)
class _Codec:
    """How one field travels, and the most a valid value of it holds: ``items`` is the longest
    msgpack array in it, ``arrays`` the number of arrays (both 0 for a scalar)."""

    encode: Encoder
    decode: Decoder
    items: int = 0
    arrays: int = 0


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


def _field_codec(annotation: Any, bounds: Bounds) -> _Codec:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _field_codec(args[0] if args[1] is type(None) else args[1], bounds)
        encode_inner, decode_inner = inner.encode, inner.decode

        def decode_optional(value: Any, path: str) -> Any:
            return None if value is None else decode_inner(value, path)

        return _Codec(
            lambda v: None if v is None else encode_inner(v),
            decode_optional,
            inner.items,
            inner.arrays,
        )
    if origin is list:
        item = _field_codec(args[0], Bounds())
        encode_item, decode_item = item.encode, item.decode
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

        return _Codec(
            lambda v: [encode_item(item) for item in v],
            decode_list,
            max(limit, item.items),
            1 + limit * item.arrays,
        )
    if annotation is not PeerId and dataclasses.is_dataclass(annotation):
        assert isinstance(annotation, type)
        nested = schema_of(annotation)
        return _Codec(nested.encode, nested.decode, nested.max_items, nested.max_arrays)
    return _Codec(*_scalar(annotation, bounds))


class Schema:
    """Encoder/decoder for one dataclass; build it once with :func:`schema_of`."""

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls
        hints = typing.get_type_hints(cls)
        self._names: list[str] = []
        self._codecs: list[_Codec] = []
        self._fields: list[tuple[str, str, Decoder]] = []  # name, ".name", decoder
        for f in dataclasses.fields(cls):
            bounds = f.metadata.get("bounds", Bounds())
            self._names.append(f.name)
            self._codecs.append(_field_codec(hints[f.name], bounds))
            self._fields.append((f.name, "." + f.name, self._codecs[-1].decode))
        #: the longest msgpack array a valid encoding holds (this dataclass's own included)
        self.max_items = max([len(self._names), *(codec.items for codec in self._codecs)])
        #: how many msgpack arrays a valid encoding holds at most
        self.max_arrays = 1 + sum(codec.arrays for codec in self._codecs)

    def encode(self, value: Any) -> list[Any]:
        """The msgpack-ready list of ``value``'s fields."""
        return [
            codec.encode(getattr(value, name))
            for name, codec in zip(self._names, self._codecs, strict=True)
        ]

    def unpack(self, data: bytes | memoryview, path: str = "", *, max_bytes: int) -> Any:
        """Parse the msgpack document ``data`` (nothing may follow it) and :meth:`decode` it.

        The parse stops at the first array longer than :attr:`max_items`, at the array after
        the :attr:`max_arrays`-th, at any map or extension type, and at strings or byte
        strings over ``max_bytes``: what it costs is bounded by ``len(data)`` and the schema,
        whatever the bytes.

        Raises:
            RemoteProtocolError: ``MALFORMED`` if ``data`` is not such a document,
                ``BAD_FIELD`` as for :meth:`decode`.
        """
        document = bounded_unpack(
            data, max_items=self.max_items, max_arrays=self.max_arrays, max_bytes=max_bytes
        )
        return self.decode(document, path)

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


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _no_map(pairs: Any) -> Any:
    raise ValueError("msgpack maps are not allowed")  # max_map_len=0 still lets {} through


class ContainerBudget:
    """A msgpack ``list_hook`` (or ``object_hook``) that stops the parse after ``limit``
    containers: msgpack builds them bottom-up, so a hostile document costs at most ``limit``
    of them before it is refused (``ValueError``, one of :data:`UNPACK_ERRORS`)."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def __call__(self, container: T) -> T:
        self.left -= 1
        if self.left < 0:
            raise ValueError("more arrays or maps than any valid document holds")
        return container


@functools.lru_cache(maxsize=256)
def _static_limits(max_items: int, max_bytes: int) -> dict[str, Any]:
    return {
        "raw": False,
        "use_list": True,
        "ext_hook": _no_ext,
        "object_hook": _no_map,
        "max_str_len": max_bytes,
        "max_bin_len": max_bytes,
        "max_array_len": max_items,
        "max_map_len": 0,
        "max_ext_len": 0,
    }


def _limits(max_items: int, max_arrays: int, max_bytes: int) -> dict[str, Any]:
    return {**_static_limits(max_items, max_bytes), "list_hook": ContainerBudget(max_arrays)}


#: what a bounded parse raises on bad input (UnicodeDecodeError and msgpack's ExtraData,
#: FormatError and StackError are ValueErrors; OutOfData is an UnpackException)
UNPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


def bounded_unpack(
    data: bytes | memoryview, *, max_items: int, max_arrays: int, max_bytes: int
) -> Any:
    """The one msgpack document in ``data``, parsed under bounds: no array longer than
    ``max_items``, at most ``max_arrays`` arrays, no map, no extension type, no string or byte
    string over ``max_bytes`` (strings decoded as UTF-8). The parse stops at the first bound
    crossed, so it costs O(len(data)) whatever the bytes.

    Raises:
        RemoteProtocolError: ``MALFORMED`` if ``data`` is anything else or has bytes after the
            document.
    """
    try:
        return msgpack.unpackb(data, **_limits(max_items, max_arrays, max_bytes))
    except UNPACK_ERRORS as exc:
        raise RemoteProtocolError(
            f"not a valid msgpack document: {exc}", reason=RejectReason.MALFORMED
        ) from None


def bounded_reader(
    data: bytes, *, max_items: int, max_arrays: int, max_bytes: int
) -> msgpack.Unpacker:
    """A msgpack reader over ``data`` with the bounds of :func:`bounded_unpack` (the array
    budget shared by every value read); it raises :data:`UNPACK_ERRORS`."""
    reader = msgpack.Unpacker(
        max_buffer_size=max(1, len(data)), **_limits(max_items, max_arrays, max_bytes)
    )
    reader.feed(data)
    return reader


_SCHEMAS: dict[type[Any], Schema] = {}


def schema_of(cls: type[Any]) -> Schema:
    """The (cached) :class:`Schema` of dataclass ``cls``."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = Schema(cls)
    return schema
