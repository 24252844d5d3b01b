"""Harness: :func:`meshfed.wire.open_envelope` (outer and inner shape, header fields, every
registered body schema, sender, signature, clock and replay checks).

Three kinds of frame: raw bytes; an arbitrary signed part under a valid signature (so the
inner checks are reached); and a well-formed header around a fuzzed type and body. An
accepted envelope must be refused as a replay, and seal again and open to the same message.
"""

from __future__ import annotations

from collections.abc import Iterator

from meshfed import wire
from meshfed.codec import schema_of
from meshfed.control import Ping, Text
from meshfed.errors import RemoteProtocolError
from meshfed.wire import SIGNATURE_DOMAIN, ReplayGuard, Scope, open_envelope, seal

from ._common import (
    IDENTITIES,
    NOW_MS,
    WIRE_TYPES,
    Reader,
    Writer,
    loose_unpack,
    pack,
    sample_messages,
)

MAX_BYTES = 1 << 16
_TYPES = [name for name, _ in WIRE_TYPES]
_SENDER = IDENTITIES[0]
RAW, SIGNED, SHAPED = range(3)


def _frame(reader: Reader) -> bytes:
    mode = reader.below(3)
    if mode == RAW:
        return reader.rest()
    if mode == SIGNED:
        signed = reader.rest()
    else:
        type_name = _TYPES[reader.below(len(_TYPES))]
        round_ = reader.uint(1)
        skew_ms = reader.uint(3) - (1 << 23)
        nonce = reader.take(16)
        reply_to = reader.take(16) if reader.flag() else b""
        body = loose_unpack(reader.rest())
        signed = pack(
            [1, type_name, _SENDER.peer_id.raw, [b"", round_], nonce, NOW_MS + skew_ms,
             reply_to, body]
        )  # fmt: skip
    return pack([signed, _SENDER.sign(SIGNATURE_DOMAIN + signed)])


def test_one_input(data: bytes) -> None:
    """One frame from ``IDENTITIES[0]``, opened twice."""
    frame = _frame(Reader(data))
    wire.VERIFIED.clear()  # each input on its own: no cache across inputs
    guard = ReplayGuard(window_ms=60_000, max_skew_ms=5_000, started_ms=NOW_MS - 120_000)
    try:
        envelope = open_envelope(
            frame, peer=_SENDER.peer_id, now_ms=NOW_MS, replay=guard, max_bytes=MAX_BYTES
        )
    except RemoteProtocolError:
        return
    try:
        open_envelope(frame, peer=_SENDER.peer_id, now_ms=NOW_MS, replay=guard, max_bytes=MAX_BYTES)
    except RemoteProtocolError:
        pass
    else:
        raise AssertionError("an envelope was accepted twice")
    again, _ = seal(_SENDER, envelope.body, now_ms=NOW_MS, scope=Scope(round=1))
    reopened = open_envelope(
        again, peer=_SENDER.peer_id, now_ms=NOW_MS, replay=guard, max_bytes=1 << 20
    )
    if reopened.body != envelope.body:
        raise AssertionError("a message did not survive sealing again")


def seeds() -> Iterator[bytes]:
    """Valid frames of a few kinds, and one valid body of every type's shape."""
    for first in (Ping(sent_ms=NOW_MS), Text(text="hello")):
        frame, _ = seal(_SENDER, first, now_ms=NOW_MS)
        yield Writer().below(3, RAW).raw(frame).build()
        yield Writer().below(3, SIGNED).raw(loose_unpack(frame)[0]).build()
    for body in sample_messages():
        yield (
            Writer().below(3, SHAPED).below(len(_TYPES), _TYPES.index(body.TYPE)).uint(1, 0)
            .uint(3, 1 << 23).raw(bytes(range(16))).uint(1, 0)
            .raw(pack(schema_of(type(body)).encode(body))).build()
        )  # fmt: skip
