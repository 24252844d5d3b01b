"""A hostile peer in its own OS process (for tests): attacks each target node, then exits.

Usage: ``python tests/procs/hostile.py ADDR [ADDR ...]``. For each target it dials over libp2p
with its own valid identity (so it gets past Noise) and sends frames that must each be rejected
with a counted reason. Prints one JSON line: ``{"attacks": {reason: count}, "answers": {...}}``
where answers are the error reasons the target gave back.
"""

from __future__ import annotations

import collections
import json
import sys
import time

import msgpack
import numpy as np
import trio

from meshfed.arrays import ArrayPart, ArrayParts, parts_frame
from meshfed.control import Ping, Text
from meshfed.errors import MeshfedError, RequestFailed
from meshfed.identity import Identity, PeerId
from meshfed.node import ARRAY_PROTOCOL as ARRAY
from meshfed.node import PARTS_PROTOCOL as PARTS
from meshfed.node import RPC_PROTOCOL as RPC
from meshfed.stats import NodeStats
from meshfed.transports._sealed import HEADER
from meshfed.transports.libp2p import Libp2pTransport
from meshfed.wire import SIGNATURE_DOMAIN, seal


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def resign(identity: Identity, fields: list[object]) -> bytes:
    signed = msgpack.packb(fields, use_bin_type=True)
    return msgpack.packb([signed, identity.sign(SIGNATURE_DOMAIN + signed)], use_bin_type=True)


def frames(me: Identity) -> list[tuple[str, bytes]]:
    """(expected reject reason, frame) pairs for the request path."""
    valid, _ = seal(me, Ping(sent_ms=1), now_ms=now_ms())
    fields = msgpack.unpackb(msgpack.unpackb(valid)[0])
    signed, signature = msgpack.unpackb(valid)
    flipped = bytearray(signature)
    flipped[5] ^= 0x40
    other = Identity.generate()
    wrong_type = list(fields)
    wrong_type[7] = ["not an int"]
    replayed, _ = seal(me, Ping(sent_ms=2), now_ms=now_ms())
    unknown = list(fields)
    unknown[1] = "no.such.message"
    return [
        ("malformed", b"\x00garbage\xff" * 10),
        ("malformed", valid[: len(valid) // 2]),
        ("bad_field", resign(me, wrong_type)),
        ("bad_signature", msgpack.packb([signed, bytes(flipped)])),
        ("sender_mismatch", resign(other, [fields[0], fields[1], other.peer_id.raw, *fields[3:]])),
        ("future", seal(me, Text(text="from the future"), now_ms=now_ms() + 3_600_000)[0]),
        ("stale", seal(me, Text(text="from the past"), now_ms=now_ms() - 3_600_000)[0]),
        ("unknown_type", resign(me, unknown)),
        ("accepted", replayed),
        ("replayed", replayed),
        ("oversized", b"\x00" * (5 * 1024 * 1024)),
    ]


async def answer(transport: Libp2pTransport, peer: PeerId, protocol: str, frame: bytes) -> str:
    """``accepted``, or the reason the peer rejected ``frame``."""
    try:
        with trio.fail_after(10):
            await transport.request(peer, protocol, frame)
        return "accepted"
    except RequestFailed as exc:
        return exc.reason


async def attack(transport: Libp2pTransport, me: Identity, addr: str) -> dict[str, str]:
    peer: PeerId = await transport.connect(addr)
    answers: dict[str, str] = {}
    for expected, frame in frames(me):
        answers[expected] = await answer(transport, peer, RPC, frame)
    # Parts frames (several receivers' arrays under one signature): one shorter than the
    # envelope length it announces, then a part whose bytes do not match the signed digest.
    parts = ArrayParts(name="evil", dtype="|u1", parts=[ArrayPart(peer, 4, bytes(32))])
    envelope, _ = seal(me, parts, now_ms=now_ms())
    for label, frame in (
        ("parts_malformed", b"\x00\x00\x10\x00" + envelope[:100]),
        ("parts_bad_array", parts_frame(envelope, b"evil")),
    ):
        answers[label] = await answer(transport, peer, PARTS, frame)
    # An array stream whose chunk is shorter than announced, then one cut off mid-transfer.
    for label, cut_short in (("bad_array", True), ("truncated", False)):
        header = _array_header(me)
        try:
            with trio.fail_after(10):
                stream = await transport.open_stream(peer, ARRAY)
                async with stream:
                    await stream.send(header)
                    await stream.send(np.zeros(10 if cut_short else 256, np.uint8).tobytes())
            answers[label] = "sent"
        except MeshfedError as exc:
            answers[label] = type(exc).__name__
    answers.update(await attack_raw(transport, peer, addr))
    return answers


async def attack_raw(transport: Libp2pTransport, peer: PeerId, addr: str) -> dict[str, str]:
    """Byte-level attacks below the envelope: on the sealed port and inside sealed frames."""
    answers: dict[str, str] = {}
    host = addr.split("/")[2]
    libp2p_port = int(addr.split("/")[4])
    sealed_port = transport._sessions[peer].sealed_port  # test-only peek at the session
    for label, port in (("handshake_failed", sealed_port), ("libp2p_garbage", libp2p_port)):
        try:
            with trio.move_on_after(5):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(np.random.default_rng(1).bytes(200))
                    with trio.move_on_after(1):
                        await stream.receive_some()
            answers[label] = "sent"
        except (OSError, trio.BrokenResourceError):
            answers[label] = "reset"  # the node hung up on us: also fine
    # Inside an authenticated sealed stream: a frame header announcing 1 GiB, then a frame cut off.
    for label, length, body in (
        ("oversized_frame", 2**30, b""),
        ("truncated_frame", 1000, b"x" * 10),
    ):
        with trio.fail_after(10):
            stream = await transport.open_stream(peer, ARRAY)
            raw = stream._channel.sock  # type: ignore[attr-defined]  # test-only raw socket
            await raw.send(HEADER.pack(length, 3, 0) + body)
            raw.close()
        answers[label] = "sent"
    return answers


def _array_header(me: Identity) -> bytes:
    from meshfed.arrays import ArrayHeader

    header = ArrayHeader(
        transfer_id=np.random.bytes(16),
        name="evil",
        dtype="|u1",
        shape=[1024],
        chunk_bytes=256,
        crc32=0,
    )
    return seal(me, header, now_ms=now_ms())[0]


async def main(addrs: list[str]) -> None:
    me = Identity.generate()
    transport = Libp2pTransport(me, stats=NodeStats())
    results: dict[str, dict[str, str]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        for addr in addrs:
            results[addr] = await attack(transport, me, addr)
        nursery.cancel_scope.cancel()
    tally = collections.Counter(reason for answers in results.values() for reason in answers)
    print(json.dumps({"attacks": tally, "answers": results}), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
