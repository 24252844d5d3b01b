"""A peer whose requests are expensive gets no more of a node's CPU than a busy honest peer
(libp2p on 127.0.0.1, three transports in one process). CPU is measured on the target's own
thread clock, so the machine's load does not change the outcome: no timing thresholds."""

from __future__ import annotations

import time

import trio

from meshfed.identity import Identity, PeerId
from meshfed.stats import NodeStats
from meshfed.transport import TransportLimits
from meshfed.transports.libp2p import Libp2pTransport
from tests.transports.conformance import Member, running

HONEST_COST_S = 0.004  # CPU an honest request costs the target
FLOOD_COST_S = 0.02  # CPU each of the flooder's requests costs it


def burn(seconds: float) -> None:
    """Use ``seconds`` of this thread's CPU."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


async def expensive(peer: PeerId, payload: bytes) -> bytes:
    burn(float(payload.decode()))
    return b"done"


async def test_a_flooding_peer_gets_no_more_cpu_than_a_busy_honest_peer() -> None:
    limits = TransportLimits(max_streams_per_peer=16)
    members = [
        Member(Libp2pTransport(Identity.generate(), stats=stats, limits=limits), stats)
        for stats in (NodeStats(), NodeStats(), NodeStats())
    ]
    async with running(members) as mesh:
        [(target, _), (honest, _), (flooder, _)] = mesh
        target.set_request_handler("/work", expensive)
        assert isinstance(target, Libp2pTransport)
        peer = target.local_peer
        answered = 0

        async def flood() -> None:
            while True:
                await flooder.request(peer, "/work", str(FLOOD_COST_S).encode())

        async def serve_honestly() -> None:
            nonlocal answered
            while answered < 60:
                assert await honest.request(peer, "/work", str(HONEST_COST_S).encode()) == b"done"
                answered += 1

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(16):  # the flooder keeps its 16 request slots busy
                    nursery.start_soon(flood)
                async with trio.open_nursery() as honest_side:
                    for _ in range(2):
                        honest_side.start_soon(serve_honestly)
                nursery.cancel_scope.cancel()
        shares = target.cpu.shares
        honest_s = shares.spent_s(honest.local_peer)
        flooder_s = shares.spent_s(flooder.local_peer)
        # Both wanted more than half the target's CPU; each got about half. Without fair
        # turns the flooder's 16 requests in flight, each 5 times as long, ran beside the
        # honest peer's 2: it got ~10 times the honest peer's CPU (2.5 s against 0.26 s).
        assert answered >= 60
        in_flight = limits.max_streams_per_peer * FLOOD_COST_S  # read before the debt showed
        assert flooder_s <= 2 * honest_s + in_flight, (flooder_s, honest_s)
