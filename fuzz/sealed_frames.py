"""Harness: the sealed channel's receive side (:class:`meshfed.transports._sealed.SealedSocket`)
under an on-path attacker, reading frames as a control connection does
(``Libp2pTransport._run_control``: an oversized REQUEST is skipped, anything else opened).

The honest peer seals frames in order; the attacker delivers them, drops, alters or reorders
them, and inserts forged frames and junk. The promise under test (SPEC, "libp2p transport,
sealed channel"): what the receiver accepts is always a prefix of what the honest peer sent
(less the REQUESTs over the receiver's limit, which it refuses), in order; anything else ends
the connection with our own error.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar, cast

import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshfed.errors import RemoteProtocolError, StreamClosed
from meshfed.stats import NodeStats
from meshfed.transports._sealed import HEADER, TAG_BYTES, SealedSocket

from ._common import Reader, Writer

T = TypeVar("T")

MAX_FRAME = 1024
REQUEST = 0
_KEY = bytes(range(32))
_AEAD = AESGCM(_KEY)
HONEST, DROP, TAMPER, FORGE, JUNK, REPLAY = range(6)


class _Socket:
    """The receiving end of a TCP connection that delivers ``data`` in reads of at most
    ``chunk`` bytes, then the end of the stream."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._data = data
        self._at = 0
        self._chunk = chunk

    async def recv_into(self, view: memoryview, n: int) -> int:
        k = min(n, self._chunk, len(self._data) - self._at)
        view[:k] = self._data[self._at : self._at + k]
        self._at += k
        return k

    def close(self) -> None:
        pass


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (the socket above answers at once)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return cast(T, stop.value)
    coro.close()
    raise AssertionError("the receive side waited on a socket that never blocks")


def _channel(data: bytes, chunk: int) -> SealedSocket:
    sock = cast(trio.socket.SocketType, _Socket(data, chunk))
    return SealedSocket(sock, _KEY, _KEY, MAX_FRAME, NodeStats())


def _seal(frame_type: int, frame_id: int, body: bytes, counter: int) -> bytes:
    """The honest sender's ``counter``-th frame, as SPEC writes it (header as AAD)."""
    header = HEADER.pack(len(body), frame_type, frame_id)
    nonce = bytes(4) + counter.to_bytes(8, "big")
    return header + _AEAD.encrypt(nonce, body, header)


def test_one_input(data: bytes) -> None:
    """A scenario: the honest frames, what the attacker does to each step, and the reads."""
    reader = Reader(data)
    chunk = 1 << reader.below(13)  # the size of the socket's reads
    honest: list[tuple[int, int, bytes]] = []
    sealed_frames: list[bytes] = []
    wire = bytearray()
    for _ in range(reader.below(8)):
        action = reader.below(6)
        frame_type, frame_id = reader.below(6), reader.uint(1)
        if action in (HONEST, DROP, TAMPER):
            body = reader.sized(MAX_FRAME + 64)
            sealed = _seal(frame_type, frame_id, body, len(honest))
            honest.append((frame_type, frame_id, body))
            sealed_frames.append(sealed)
            if action == TAMPER:
                at = reader.below(len(sealed))
                flip = 1 + reader.uint(1) % 255
                sealed = sealed[:at] + bytes([sealed[at] ^ flip]) + sealed[at + 1 :]
            if action != DROP:
                wire += sealed
        elif action == REPLAY:  # an honest frame sent before, again
            if sealed_frames:
                wire += sealed_frames[reader.below(len(sealed_frames))]
        elif action == FORGE:  # a well-framed frame the attacker made up (it holds no key)
            length = reader.uint(2) % 4096
            wire += HEADER.pack(length, frame_type, frame_id) + bytes(length + TAG_BYTES)
        else:
            wire += reader.sized(64)
    channel = _channel(bytes(wire), chunk)
    accepted: list[tuple[int, int, bytes]] = []
    try:
        while True:
            length, frame_type, frame_id = _run(channel.receive_header())
            if frame_type == REQUEST and length > MAX_FRAME:
                _run(channel.discard_body(length))
                continue
            opened = _run(channel.receive_body(length))
            assert isinstance(opened, bytes)
            accepted.append((frame_type, frame_id, opened))
    except (StreamClosed, RemoteProtocolError):
        pass
    # An honest REQUEST over the limit is refused by design (skipped, answered `oversized`).
    due = [frame for frame in honest if not (frame[0] == REQUEST and len(frame[2]) > MAX_FRAME)]
    if accepted != due[: len(accepted)]:
        raise AssertionError(
            f"the receiver accepted {len(accepted)} frames that are not the honest prefix"
        )


def seeds() -> Iterator[bytes]:
    """Honest frames (one oversized), and each kind of attack once."""
    w = Writer().below(13, 12).below(8, 3)
    w.below(6, HONEST).below(6, 0).uint(1, 1).sized(b"request")
    w.below(6, HONEST).below(6, 1).uint(1, 1).sized(bytes(MAX_FRAME + 10))
    w.below(6, HONEST).below(6, 2).uint(1, 2).sized(b"")
    yield w.build()
    for action in (DROP, TAMPER, FORGE, JUNK, REPLAY):
        w = Writer().below(13, 6).below(8, 3)
        w.below(6, HONEST).below(6, 0).uint(1, 1).sized(b"first")
        w.below(6, action).below(6, 0).uint(1, 2)
        if action == FORGE:
            w.uint(2, MAX_FRAME + 1)
        elif action == REPLAY:
            w.below(1, 0)
        else:
            w.sized(b"second")
        if action == TAMPER:
            w.uint(1, 20).uint(1, 1)
        w.below(6, HONEST).below(6, 1).uint(1, 3).sized(b"third")
        yield w.build()
