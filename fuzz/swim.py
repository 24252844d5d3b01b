"""Harness: the SWIM failure detector (:class:`meshfed.membership.swim.Swim`) fed the updates
of decoded ``meshfed.swim.*`` messages from peers, between its own ticks and probe results.

After every step the updates it would piggyback must travel: ``seal`` must sign them and a
peer must decode them (``Membership._probe`` sends them in a :class:`SwimPing`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from meshfed.codec import schema_of
from meshfed.errors import RemoteProtocolError
from meshfed.membership.service import SwimAck, SwimPing, SwimPingReq
from meshfed.membership.swim import IndirectProbe, Probe, Swim, SwimConfig
from meshfed.wire import seal

from ._common import IDENTITIES, NOW_MS, Reader, Writer, loose_unpack, pack, through_wire

_PEERS = [identity.peer_id for identity in IDENTITIES]
_ME = _PEERS[0]
_MESSAGES: list[type[SwimPing] | type[SwimPingReq] | type[SwimAck]] = [
    SwimPing,
    SwimPingReq,
    SwimAck,
]
RECEIVE, TICK, PROBED, FORGET, ADD = range(5)


def _incarnation(reader: Reader) -> int:
    kind = reader.below(4)
    if kind == 0:
        return reader.uint(1)
    if kind == 1:
        return NOW_MS + reader.uint(2) - (1 << 15)  # near the start incarnation (a wall clock)
    if kind == 2:
        return (1 << 64) - 1 - reader.uint(1)  # the top of the wire's range
    return reader.uint(8)


def _body(reader: Reader) -> tuple[type[Any], list[Any]]:
    """A message's fields: fuzzed msgpack, or well-formed with fuzzed updates."""
    cls = _MESSAGES[reader.below(3)]
    if reader.flag():
        value = loose_unpack(reader.sized(512))
        return cls, value if isinstance(value, list) else [value]
    updates = [
        [_PEERS[reader.below(len(_PEERS))].raw, reader.below(3), _incarnation(reader)]
        for _ in range(reader.below(6))
    ]
    if cls is SwimPing:
        return cls, [updates]
    if cls is SwimPingReq:
        return cls, [_PEERS[reader.below(len(_PEERS))].raw, 1 + reader.uint(1), updates]
    return cls, [reader.flag(), updates]


def test_one_input(data: bytes) -> None:
    """A detector with three members, then a sequence of events."""
    reader = Reader(data)
    swim = Swim(_ME, SwimConfig(), random.Random(0), incarnation=NOW_MS)
    for peer in _PEERS[1:]:
        swim.add(peer)
    now = 0.0
    for _ in range(1 + reader.below(12)):
        step = reader.below(5)
        if step == RECEIVE:
            cls, fields = _body(reader)
            try:
                message = through_wire(cls, fields)
            except RemoteProtocolError:
                continue
            swim.receive(message.updates, now)
        elif step == TICK:
            now = max(now, swim.wake_at()) if reader.flag() else now + reader.uint(2) / 1000
            for action in swim.tick(now):
                if isinstance(action, Probe | IndirectProbe) and reader.flag():
                    swim.probe_result(action.target, reader.flag(), now)
        elif step == PROBED:
            swim.probe_result(_PEERS[reader.below(len(_PEERS))], reader.flag(), now)
        elif step == FORGET:
            swim.forget(_PEERS[reader.below(len(_PEERS))])
        else:
            swim.add(_PEERS[reader.below(len(_PEERS))], incarnation=reader.uint(2))
        frame, _ = seal(IDENTITIES[0], SwimPing(updates=swim.piggyback()), now_ms=NOW_MS)
        if swim.wake_at() != swim.wake_at():  # NaN: the driver would spin or never wake
            raise AssertionError("wake_at is not a time")
        del frame


def seeds() -> Iterator[bytes]:
    """A ping suspecting a member, probes timing out, a refutation of ourselves."""
    w = Writer().below(12, 5)
    w.below(5, RECEIVE).below(3, 0).uint(1, 0).below(6, 1).below(4, 1).below(3, 1)
    w.below(4, 1).uint(2, 1 << 15)
    w.below(5, TICK).uint(1, 1).uint(1, 1).uint(1, 0)
    w.below(5, TICK).uint(1, 0).uint(2, 600)
    w.below(5, RECEIVE).below(3, 2).uint(1, 0).uint(1, 1).below(6, 1).below(4, 0).below(3, 2)
    w.below(4, 0).uint(1, 3)
    w.below(5, TICK).uint(1, 1)
    yield w.build()
    yield (
        Writer()
        .below(12, 1)
        .below(5, RECEIVE)
        .below(3, 1)
        .uint(1, 1)
        .sized(
            pack(
                schema_of(SwimPingReq).encode(
                    SwimPingReq(target=_PEERS[1], timeout_ms=5, updates=[])
                )
            )
        )
        .build()
    )
