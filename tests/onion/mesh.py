"""N onion nodes in one process and a plain-Python router between their relay cores.

Each node has an identity, a key ring with a random key for the epoch under test and a relay
core; ``route`` hands a packet hop to hop as the driver would, optionally letting the test
rewrite the packet on its way into a chosen hop (the attacker on that link), and records
every packet each hop received.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from meshfed.identity import Identity, PeerId
from meshfed.onion import (
    EpochSchedule,
    Forward,
    Hop,
    KeyRing,
    OutgoingPacket,
    Relay,
    ReplayCache,
)
from meshfed.onion.events import RelayAction

SCHEDULE = EpochSchedule(period=3600.0, grace=600.0)
NOW = 1_765_000_000.0  # inside epoch SCHEDULE.epoch_at(NOW), far from its edges
EPOCH = SCHEDULE.epoch_at(NOW)


@dataclass
class Node:
    identity: Identity
    ring: KeyRing
    relay: Relay

    @property
    def peer(self) -> PeerId:
        return self.identity.peer_id

    def hop(self, delay_ms: int = 0, *, epoch: int = EPOCH) -> Hop:
        return Hop(self.peer, self.ring.public_key(epoch), delay_ms)


@dataclass
class Trace:
    """What happened to one packet: the final action, and each hop's received packet."""

    action: RelayAction
    seen: list[tuple[PeerId, bytes]]
    forwards: list[Forward]


class Mesh:
    def __init__(self, n: int, *, epochs: tuple[int, ...] = (EPOCH,)) -> None:
        self.nodes = []
        for _ in range(n):
            ring = KeyRing(SCHEDULE)
            for epoch in epochs:
                ring.install(epoch, os.urandom(32))
            self.nodes.append(Node(Identity.generate(), ring, Relay(ring, ReplayCache())))
        self.by_peer = {node.peer: node for node in self.nodes}

    def path(self, indices: list[int], delay_ms: int = 0, *, epoch: int = EPOCH) -> list[Hop]:
        return [self.nodes[i].hop(delay_ms, epoch=epoch) for i in indices]

    def route(
        self,
        out: OutgoingPacket,
        now: float = NOW,
        *,
        tamper: Callable[[int, bytes], bytes] | None = None,
    ) -> Trace:
        """Carry ``out`` until a hop does anything but forward; ``tamper(hop_number, packet)``
        may rewrite the packet on its way into each hop (hop numbers from 0)."""
        seen: list[tuple[PeerId, bytes]] = []
        forwards: list[Forward] = []
        to, packet = out.first_hop, out.packet
        for hop_number in range(16):
            if tamper is not None:
                packet = tamper(hop_number, packet)
            seen.append((to, packet))
            action = self.by_peer[to].relay.process(packet, now)
            if not isinstance(action, Forward):
                return Trace(action, seen, forwards)
            forwards.append(action)
            to, packet = action.next_hop, action.packet
        raise AssertionError("the packet looped")
