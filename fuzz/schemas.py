"""Harness: every wire schema's decoder (:meth:`meshfed.codec.Schema.decode`) on any msgpack
value: each registered message type, with every nested dataclass, bound and ``__post_init__``.

A decoded message must encode, pack and decode back to itself (the codec's round trip).
"""

from __future__ import annotations

from collections.abc import Iterator

import msgpack

from meshfed.codec import schema_of
from meshfed.errors import RemoteProtocolError

from ._common import WIRE_TYPES, Reader, Writer, pack, sample_messages

_NAMES = [name for name, _ in WIRE_TYPES]


def test_one_input(data: bytes) -> None:
    """One message type (first byte) and a msgpack body (the rest)."""
    reader = Reader(data)
    name, cls = WIRE_TYPES[reader.below(len(WIRE_TYPES))]
    try:
        value = msgpack.unpackb(reader.rest(), raw=False, strict_map_key=False)
    except (ValueError, TypeError):  # not msgpack: open_envelope rejects it before any schema
        return
    schema = schema_of(cls)
    try:
        decoded = schema.decode(value, name)
    except RemoteProtocolError:
        return
    again = schema.decode(msgpack.unpackb(pack(schema.encode(decoded)), raw=False), name)
    if again != decoded:
        raise AssertionError(f"{name} did not survive encode and decode")


def seeds() -> Iterator[bytes]:
    """One valid body of every type."""
    for body in sample_messages():
        encoded = pack(schema_of(type(body)).encode(body))
        yield Writer().below(len(WIRE_TYPES), _NAMES.index(body.TYPE)).raw(encoded).build()
