"""The memory transport: the conformance suite, and what a simulation relies on."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from meshfed.errors import PeerUnreachable, StreamClosed
from meshfed.identity import Identity, PeerId
from meshfed.stats import NodeStats
from meshfed.transport import RequestHandler, Stream, TransportLimits
from meshfed.transports.memory import MemoryNetwork
from tests.transports.conformance import CHECKS, Check, Member, Mesh, running


def memory_mesh(network: MemoryNetwork | None = None):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def make(n: int, limits: TransportLimits) -> AsyncIterator[Mesh]:
        net = network or MemoryNetwork(seed=0, latency=0.001)
        members = []
        for _ in range(n):
            stats = NodeStats()
            members.append(
                Member(net.create_transport(Identity.generate(), stats=stats, limits=limits), stats)
            )
        async with running(members) as mesh:
            yield mesh

    return make


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
async def test_conformance(check: Check) -> None:
    await check(memory_mesh())


async def echo(peer: PeerId, payload: bytes) -> bytes:
    return payload


async def test_latency_and_bandwidth_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(latency=0.05, bandwidth=1_000_000)
    async with memory_mesh(network)(2, TransportLimits()) as [(a, _), (b, _)]:
        b.set_request_handler("/echo", echo)
        started = trio.current_time()
        await a.request(b.local_peer, "/echo", bytes(100_000))
        # 0.1 s serialisation each way + 0.05 s latency each way
        assert trio.current_time() - started == pytest.approx(0.3)


async def test_a_batch_of_requests_shares_the_uplink_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(latency=0.05, bandwidth=1_000_000)
    async with memory_mesh(network)(3, TransportLimits()) as [(a, _), (b, _), (c, _)]:
        served: dict[int, float] = {}

        def noting(size: int) -> RequestHandler:
            async def note(peer: PeerId, payload: bytes) -> bytes:
                served[size] = trio.current_time() - started
                return bytes(1000)

            return note

        b.set_request_handler("/note", noting(100_000))
        c.set_request_handler("/note", noting(50_000))
        started = trio.current_time()
        answers = await a.request_each(
            [(b.local_peer, bytes(100_000)), (c.local_peer, bytes(50_000))],
            "/note",
            deadline=math.inf,
        )
        took = trio.current_time() - started
    assert answers == [bytes(1000)] * 2
    # 0.1 s on a's uplink, then 0.05 s more for c's frame, each + 0.05 s latency; the answers
    # (1 ms on each receiver's uplink, + latency) overlap: the batch ends with the last one
    assert served == {100_000: pytest.approx(0.15), 50_000: pytest.approx(0.2)}
    assert took == pytest.approx(0.2 + 0.001 + 0.05)


async def test_a_handler_that_waits_does_not_hold_up_the_calls_behind_it() -> None:
    released = trio.Event()

    async def wait_or_release(peer: PeerId, payload: bytes) -> bytes:
        if payload == b"wait":
            await released.wait()  # only the call behind it can release it
        else:
            released.set()
        return payload

    async with memory_mesh()(2, TransportLimits()) as [(a, _), (b, _)]:
        b.set_request_handler("/x", wait_or_release)
        with trio.fail_after(5):
            answers = await a.request_each(
                [(b.local_peer, b"wait"), (b.local_peer, b"release")], "/x", deadline=math.inf
            )
        assert answers == [b"wait", b"release"]


async def test_closed_streams_are_forgotten_on_both_sides() -> None:
    async def sink(stream: Stream) -> None:
        async with stream:
            await stream.receive()

    async with memory_mesh()(2, TransportLimits()) as [(a, _), (b, _)]:
        b.set_stream_handler("/sink", sink)
        for _ in range(50):
            stream = await a.open_stream(b.local_peer, "/sink")
            async with stream:
                await stream.send(b"x")
        await trio.sleep(0.1)
        # a long-running node (or a 200-peer simulation) must not keep every stream it dialled
        assert not a._streams and not b._streams


async def test_loss_delays_like_tcp_and_is_seeded(autojump_clock: trio.testing.MockClock) -> None:
    async def schedule(seed: int) -> list[float]:
        network = MemoryNetwork(seed=seed, latency=0.01, loss=0.3)
        times = []
        async with memory_mesh(network)(2, TransportLimits()) as [(a, _), (b, _)]:
            b.set_request_handler("/echo", echo)
            for _ in range(20):
                started = trio.current_time()
                assert await a.request(b.local_peer, "/echo", b"x") == b"x"  # late, never lost
                times.append(round(trio.current_time() - started, 6))
        return times

    first, again, other = await schedule(1), await schedule(1), await schedule(2)
    assert first == again
    assert first != other
    assert max(first) >= 0.02 + 0.2  # at least one retransmission
    assert min(first) == pytest.approx(0.02)


async def test_partition_and_heal(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork(latency=0.01)
    async with memory_mesh(network)(3, TransportLimits()) as [(a, _), (b, _), (c, _)]:
        for t in (a, b, c):
            t.set_request_handler("/echo", echo)
        network.partition([a.local_peer], [b.local_peer, c.local_peer])
        with pytest.raises(PeerUnreachable):
            await a.request(b.local_peer, "/echo", b"x")
        assert await b.request(c.local_peer, "/echo", b"x") == b"x"
        network.heal()
        assert await a.request(b.local_peer, "/echo", b"x") == b"x"


async def test_crash_resets_streams_and_fails_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(latency=0.01)

    async def hang(peer: PeerId, payload: bytes) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def idle(stream: Stream) -> None:
        await trio.sleep_forever()

    async with memory_mesh(network)(2, TransportLimits()) as [(a, _), (b, _)]:
        b.set_request_handler("/hang", hang)
        b.set_stream_handler("/idle", idle)
        stream = await a.open_stream(b.local_peer, "/idle")
        async with trio.open_nursery() as nursery:

            async def crash_soon() -> None:
                await trio.sleep(1)
                network.crash(b.local_peer)

            nursery.start_soon(crash_soon)
            with pytest.raises(PeerUnreachable):
                await a.request(b.local_peer, "/hang", b"")
            assert trio.current_time() < 2
        with pytest.raises(StreamClosed):
            await stream.receive()
        with pytest.raises(PeerUnreachable):
            await a.request(b.local_peer, "/hang", b"")


async def test_a_thousand_transports_deliver_everything() -> None:
    network = MemoryNetwork(seed=5, latency=0.001)
    delivered = 0

    async def count(peer: PeerId, payload: bytes) -> bytes:
        nonlocal delivered
        delivered += 1
        return b""

    members = []
    for _ in range(1000):
        stats = NodeStats()
        transport = network.create_transport(Identity.generate(), stats=stats)
        transport.set_request_handler("/count", count)
        members.append(Member(transport, stats))
    rng = random.Random(5)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for member in members:
                nursery.start_soon(member.transport.run)
            await trio.sleep(0.01)
            async with trio.open_nursery() as senders:
                for member in members:
                    for target in rng.sample(members, 10):
                        if target is not member:
                            senders.start_soon(
                                member.transport.request,
                                target.transport.local_peer,
                                "/count",
                                b"hi",
                            )
            nursery.cancel_scope.cancel()
    assert delivered >= 9_900
