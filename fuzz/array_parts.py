"""Harness: parts frames (:func:`~meshfed.arrays.split_parts_frame`) and the
:class:`~meshfed.arrays.ArrayParts` message in them, as ``Node._serve_parts`` takes them:
split, open the envelope, take this node's part.

The part taken must be the 1-D array of the message's dtype and the part's length, holding
exactly the bytes that came with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from meshfed import wire
from meshfed.arrays import ALLOWED_DTYPES, ArrayParts, parts_frame, split_parts_frame
from meshfed.errors import RemoteProtocolError
from meshfed.wire import SIGNATURE_DOMAIN, ReplayGuard, open_envelope

from ._common import IDENTITIES, NOW_MS, Reader, Writer, loose_unpack, pack

MAX_BYTES = 1 << 17
_DTYPES = sorted(ALLOWED_DTYPES)
_SENDER, _RECEIVER = IDENTITIES[0], IDENTITIES[1]
RAW, SHAPED = range(2)


def _frame(reader: Reader) -> bytes:
    if reader.below(2) == RAW:
        return reader.rest()
    dtype = _DTYPES[reader.below(len(_DTYPES))]
    datas = [reader.sized(512) for _ in range(1 + reader.below(4))]
    parts = []
    for data in datas:
        to = IDENTITIES[reader.below(len(IDENTITIES))].peer_id.raw
        length = reader.uint(2) if reader.flag() else len(data) // np.dtype(dtype).itemsize
        digest = reader.take(32) if reader.flag() else hashlib.sha256(data).digest()
        parts.append([to, length, digest])
    body = [reader.take(8).decode("latin-1"), dtype, parts]
    if reader.flag():
        body = loose_unpack(reader.sized(1024))
    signed = pack([1, ArrayParts.TYPE, _SENDER.peer_id.raw, [b"", 0], bytes(16), NOW_MS, b"", body])
    envelope = pack([signed, _SENDER.sign(SIGNATURE_DOMAIN + signed)])
    mine = datas[reader.below(len(datas))] if not reader.flag() else reader.sized(512)
    return parts_frame(envelope, mine)


def test_one_input(data: bytes) -> None:
    """One parts frame from ``IDENTITIES[0]`` to ``IDENTITIES[1]``."""
    frame = _frame(Reader(data))
    wire.VERIFIED.clear()
    guard = ReplayGuard(window_ms=60_000, max_skew_ms=5_000, started_ms=NOW_MS - 120_000)
    try:
        signed, part = split_parts_frame(frame)
        envelope = open_envelope(
            bytes(signed), peer=_SENDER.peer_id, now_ms=NOW_MS, replay=guard, max_bytes=MAX_BYTES
        )
        body = envelope.body
        if not isinstance(body, ArrayParts):
            return  # Node._serve_parts rejects it [bad_field]
        header, array = body.take(_RECEIVER.peer_id, part, transfer_id=envelope.nonce)
    except RemoteProtocolError:
        return
    if array.dtype != np.dtype(body.dtype) or array.shape != tuple(header.shape):
        raise AssertionError(f"{array.dtype} {array.shape} for the header {header}")
    if array.ndim != 1 or array.tobytes() != bytes(part):
        raise AssertionError("the part's array is not the bytes that came")


def seeds() -> Iterator[bytes]:
    """Three parts of uint32, the receiver's second."""
    datas = [np.arange(n, dtype="<u4").tobytes() for n in (3, 4, 0)]
    w = Writer().below(2, SHAPED).below(len(_DTYPES), _DTYPES.index("<u4")).below(4, 2)
    for data in datas:
        w.sized(data)
    for index in (0, 1, 2):
        w.below(len(IDENTITIES), index).uint(1, 0).uint(1, 0)
    w.raw(b"secagg.i").uint(1, 0).uint(1, 0).below(3, 1)
    yield w.build()
    yield Writer().below(2, RAW).raw(parts_frame(b"\x92\xc4\x00\xc4\x00", b"abc")).build()
