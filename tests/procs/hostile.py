"""A hostile peer in its own OS process (for tests): attacks each target node, then exits.

Usage: ``python tests/procs/hostile.py ADDR [ADDR ...]``. For each target it dials over libp2p
with its own valid identity (so it gets past Noise) and sends frames that must each be rejected
with a counted reason. Prints one JSON line: ``{"attacks": {reason: count}, "answers": {...}}``
where answers are the error reasons the target gave back.

``python tests/procs/hostile.py ADDR --flood SECONDS [--only KIND ...] [--mix SEED]`` floods
one target instead, every kind of :data:`FLOODS` at once (or those named), or with ``--mix``
random steps of every kind :class:`Flood` knows (the one-shot attacks too): prints
``{"event": "flooding"}`` once it has begun, then ``{"flood": {kind: {outcome: count}}}``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import time
from collections.abc import Awaitable, Callable

import msgpack
import numpy as np
import trio

from meshfed.arrays import ArrayPart, ArrayParts, parts_frame
from meshfed.control import Ping, Text
from meshfed.errors import MeshfedError, RequestFailed
from meshfed.identity import Identity, PeerId
from meshfed.membership.gossip import Delta
from meshfed.membership.records import Capabilities, sign_record
from meshfed.membership.service import SwimPing
from meshfed.membership.swim import Incarnation, Update
from meshfed.node import ARRAY_PROTOCOL as ARRAY
from meshfed.node import PARTS_PROTOCOL as PARTS
from meshfed.node import RPC_PROTOCOL as RPC
from meshfed.stats import NodeStats
from meshfed.transports._sealed import HEADER, NONCE_BYTES
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
    sealed_port = (await transport._session(peer)).sealed_port  # test-only peek at the session
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


# -- flooding ------------------------------------------------------------------------------------

Outcomes = collections.Counter[str]


class Flood:
    """Every kind of hostile traffic at one target. Each kind is a step (one hostile action,
    its outcome counted); :meth:`repeat` runs one kind over and over, :meth:`mix` random
    steps of every kind."""

    def __init__(self, transport: Libp2pTransport, me: Identity, peer: PeerId, addr: str) -> None:
        self.transport, self.me, self.peer, self.addr = transport, me, peer, addr
        self.host = addr.split("/")[2]
        self.session = transport._sessions[peer]  # test-only peek: sealed port and session id
        self.outcomes: dict[str, Outcomes] = collections.defaultdict(collections.Counter)
        self.strangers = [Identity.generate() for _ in range(64)]
        self.held: collections.deque[trio.SocketStream] = collections.deque()
        self.opened = 0
        self.steps: dict[str, Callable[[], Awaitable[None]]] = {
            "unauthenticated": self.unauthenticated,
            "oversized_headers": self.oversized_headers,
            "junk_envelopes": self.junk_envelopes,
            "swim": self.swim,
            "records": self.records,
            "attacks": self.attacks,
        }

    async def repeat(self, kind: str) -> None:
        step = self.steps[kind]
        while True:
            await step()
            if kind == "unauthenticated":
                await trio.sleep(0.002)

    async def mix(self, rng: random.Random) -> None:
        kinds = sorted(self.steps)
        while True:
            await self.steps[rng.choice(kinds)]()
            await trio.sleep(rng.random() * 0.01)

    async def unauthenticated(self) -> None:
        """Open one more connection to the sealed port and send it a 13-byte header claiming
        2 GiB (every fourth after our own session id, replayed); hold the newest 200."""
        try:
            stream = await trio.open_tcp_stream(self.host, self.session.sealed_port)
            if self.opened % 4 == 0:
                hello = self.session.session_id + os.urandom(NONCE_BYTES) + b"\x00"
                await stream.send_all(hello)
            await stream.send_all(HEADER.pack(2**31 - 1, 0, self.opened))
            self.held.append(stream)
            self.opened += 1
            self.outcomes["unauthenticated"]["opened"] += 1
        except (OSError, trio.BrokenResourceError) as exc:
            self.outcomes["unauthenticated"][type(exc).__name__] += 1
        while len(self.held) > 200:
            await self.held.popleft().aclose()

    async def oversized_headers(self) -> None:
        """An authenticated stream connection whose first frame claims 1 GiB."""
        await self._count("oversized_headers", self._oversized_once)

    async def _oversized_once(self) -> None:
        stream = await self.transport.open_stream(self.peer, ARRAY)
        raw = stream._channel.sock  # type: ignore[attr-defined]  # test-only raw socket
        await raw.send(HEADER.pack(2**30, 3, 0))
        raw.close()

    async def junk_envelopes(self) -> None:
        """One malformed, forged, stale, replayed or oversized request frame."""
        _, frame = random.choice(frames(self.me))
        await self._count("junk_envelopes", self._rpc, frame)

    async def swim(self) -> None:
        """A SWIM ping carrying 64 updates about strangers, each statement signed by its
        stranger (so the target verifies every one)."""
        updates = [
            Update(Incarnation.sign(s, random.randrange(99)), random.randrange(3))
            for s in self.strangers
        ]
        await self._count("swim", self._message, SwimPing(updates=updates))

    async def records(self) -> None:
        """An anti-entropy delta of 16 fresh, validly signed records of strangers."""
        records = [
            sign_record(
                s,
                seq=now_ms(),
                expires_ms=now_ms() + 600_000,
                addrs=[f"/ip4/10.{i % 250}.0.1/tcp/4001/p2p/{s.peer_id}"],
                capabilities=Capabilities(),
            )
            for i, s in enumerate(random.sample(self.strangers, 16))
        ]
        await self._count("records", self._message, Delta(records=records, wants=[]))

    async def attacks(self) -> None:
        """The whole one-shot attack suite (:func:`attack`): envelopes, parts, streams, raw."""
        try:
            with trio.fail_after(60):
                answers = await attack(self.transport, self.me, self.addr)
            self.outcomes["attacks"].update(answers.values())
        except (MeshfedError, trio.TooSlowError) as exc:
            self.outcomes["attacks"][type(exc).__name__] += 1

    async def _message(self, body: object) -> None:
        await self._rpc(seal(self.me, body, now_ms=now_ms())[0])  # type: ignore[arg-type]

    async def _rpc(self, frame: bytes) -> None:
        await self.transport.request(self.peer, RPC, frame)

    async def _count(
        self, kind: str, action: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        try:
            with trio.fail_after(5):
                await action(*args)
            self.outcomes[kind]["accepted"] += 1
        except RequestFailed as exc:
            self.outcomes[kind][exc.reason] += 1
        except (MeshfedError, trio.TooSlowError) as exc:
            self.outcomes[kind][type(exc).__name__] += 1
            await trio.sleep(0.05)


FLOODS = ("unauthenticated", "oversized_headers", "junk_envelopes", "swim", "records")


async def flood(addr: str, seconds: float, kinds: list[str], mix_seed: int | None) -> None:
    """Flood ``addr`` for ``seconds``: two tasks per kind (one for unauthenticated
    connections), or with ``mix_seed``, six tasks of random steps of every kind."""
    me = Identity.generate()
    transport = Libp2pTransport(me, stats=NodeStats())
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        peer = await transport.connect(addr)
        attack_ = Flood(transport, me, peer, addr)
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as floods:
                if mix_seed is None:
                    for kind in kinds:
                        for _ in range(1 if kind == "unauthenticated" else 2):
                            floods.start_soon(attack_.repeat, kind)
                else:
                    for n in range(6):
                        floods.start_soon(attack_.mix, random.Random(mix_seed + n))
                print(json.dumps({"event": "flooding"}), flush=True)
        nursery.cancel_scope.cancel()
    print(json.dumps({"flood": attack_.outcomes}), flush=True)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("addrs", nargs="+")
    parser.add_argument("--flood", type=float, help="flood the one target for this many seconds")
    parser.add_argument("--only", nargs="*", choices=FLOODS, default=list(FLOODS))
    parser.add_argument("--mix", type=int, help="random steps of every kind, from this seed")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        if args.flood is None:
            trio.run(main, args.addrs)
        else:
            trio.run(flood, args.addrs[0], args.flood, args.only, args.mix)
