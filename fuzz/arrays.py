"""Harness: array headers and their payloads: :class:`~meshfed.arrays.ArrayHeader` and
:class:`~meshfed.arrays.InlineArray` as decoded from the wire, then
:class:`~meshfed.arrays.ArrayAssembler` fed chunks (as ``Node._serve_array`` does) and
:meth:`InlineArray.array` (as ``Node._serve_message`` does).

What comes out must be the array the header announced (its dtype, shape and bytes).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from meshfed.arrays import ALLOWED_DTYPES, ArrayAssembler, ArrayHeader, InlineArray
from meshfed.codec import schema_of
from meshfed.errors import RemoteProtocolError

from ._common import Reader, Writer, loose_unpack, pack

MAX_ARRAY_BYTES = 1 << 16
_DTYPES = sorted(ALLOWED_DTYPES)
RAW, SHAPED = range(2)


def _fields(reader: Reader) -> list[Any]:
    """The header's fields: fuzzed msgpack, or a well-formed header with fuzzed values."""
    if reader.below(2) == RAW:
        value = loose_unpack(reader.sized(1024))
        return value if isinstance(value, list) else [value]
    dtype = _DTYPES[reader.below(len(_DTYPES))]
    shape = [reader.uint(1) if reader.flag() else reader.uint(8) for _ in range(reader.below(5))]
    chunk_bytes = 1 + reader.uint(2)
    return [bytes(16), "a", dtype, shape, chunk_bytes, None]  # crc32 filled in below


def _check(header: ArrayHeader, array: np.ndarray[Any, Any], data: bytes) -> None:
    if array.dtype != np.dtype(header.dtype) or list(array.shape) != header.shape:
        raise AssertionError(f"{array.dtype} {array.shape} for the header {header}")
    if array.tobytes() != data:
        raise AssertionError("the array's bytes are not the ones sent")


def test_one_input(data: bytes) -> None:
    """A header, then its chunks (streamed) or its bytes (inline)."""
    reader = Reader(data)
    fields = _fields(reader)
    inline = reader.flag()
    payload = reader.sized(MAX_ARRAY_BYTES)
    if len(fields) == 6 and fields[5] is None:
        fields[5] = reader.uint(4) if reader.flag() else zlib.crc32(payload)
    try:
        if inline:
            message = schema_of(InlineArray).decode([fields, payload], "InlineArray")
            header = message.header
            if header.nbytes > MAX_ARRAY_BYTES:  # Node._check_array_size
                return
            _check(header, message.array(), payload)
            return
        header = schema_of(ArrayHeader).decode(fields, "ArrayHeader")
        assembler = ArrayAssembler(header, max_bytes=MAX_ARRAY_BYTES)
        sent = bytearray()  # what the stream delivered, as receive_into writes it
        while not assembler.complete:
            buffer = assembler.next_chunk_buffer()
            length = reader.uint(2) if reader.flag() else len(buffer)
            chunk = payload[len(sent) : len(sent) + min(length, len(buffer))]
            chunk = chunk.ljust(min(length, len(buffer)), b"\0")
            buffer[: len(chunk)] = chunk
            sent += chunk
            assembler.chunk_received(length)
        array = assembler.finish()
    except RemoteProtocolError:
        return
    _check(header, array, bytes(sent))


def seeds() -> Iterator[bytes]:
    """A small float array streamed in chunks and sent inline; a raw header."""
    shaped = Writer().below(2, SHAPED).below(len(_DTYPES), _DTYPES.index("<f4"))
    shaped.uint(1, 2).uint(1, 1).uint(1, 3).uint(1, 1).uint(1, 4).uint(2, 7)
    values = np.arange(12, dtype="<f4").tobytes()
    for inline in (0, 1):
        yield Writer().raw(shaped.build()).uint(1, inline).sized(values).build()
    header = ArrayHeader(
        transfer_id=bytes(16), name="w", dtype="<u2", shape=[3], chunk_bytes=4, crc32=0
    )
    raw = pack(schema_of(ArrayHeader).encode(header))
    yield Writer().below(2, RAW).sized(raw).uint(1, 0).sized(bytes(6)).build()
