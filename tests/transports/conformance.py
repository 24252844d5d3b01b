"""One conformance suite for every Transport: run against memory and libp2p.

Each check is ``async def check_x(make_mesh)``; ``make_mesh(n, limits)`` is an async context
manager yielding ``n`` running transports, each with its stats, all connected to each other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import trio

from meshfed.errors import (
    PeerUnreachable,
    RemoteProtocolError,
    RequestFailed,
    StreamClosed,
)
from meshfed.identity import PeerId
from meshfed.stats import NodeStats, RejectReason
from meshfed.transport import Stream, Transport, TransportLimits


@dataclass
class Member:
    """One running transport of a test mesh."""

    transport: Transport
    stats: NodeStats
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: trio.Event = field(default_factory=trio.Event)

    def __iter__(self) -> Iterator[Any]:  # so tests can write ``[(a, a_stats), ...] = mesh``
        return iter((self.transport, self.stats))

    async def stop(self) -> None:
        """Cancel this transport's ``run`` and wait until it returned."""
        self.scope.cancel()
        await self.stopped.wait()


Mesh = list[Member]
MeshFactory = Callable[[int, TransportLimits], AbstractAsyncContextManager[Mesh]]
Check = Callable[[MeshFactory], Awaitable[None]]


@asynccontextmanager
async def running(members: list[Member]) -> AsyncIterator[Mesh]:
    """Run every member's transport in its own cancel scope and connect them all pairwise."""

    async def run(member: Member, task_status: trio.TaskStatus[None]) -> None:
        with member.scope:
            await member.transport.run(task_status=task_status)
        member.stopped.set()

    async with trio.open_nursery() as nursery:
        for member in members:
            await nursery.start(run, member)
        with trio.fail_after(30):
            for i, member in enumerate(members):
                for other in members[i + 1 :]:
                    await member.transport.connect(other.transport.listen_addrs[0])
        yield members
        nursery.cancel_scope.cancel()


LIMITS = TransportLimits(max_frame_bytes=1 << 20, max_streams_per_peer=8)


async def echo(peer: PeerId, payload: bytes) -> bytes:
    return peer.raw + payload


async def check_requests_both_ways_and_concurrently(make_mesh: MeshFactory) -> None:
    async with make_mesh(2, TransportLimits(max_streams_per_peer=128)) as [(a, _), (b, _)]:
        a.set_request_handler("/echo", echo)
        b.set_request_handler("/echo", echo)
        with trio.fail_after(20):
            assert await a.request(b.local_peer, "/echo", b"x") == a.local_peer.raw + b"x"
            assert await b.request(a.local_peer, "/echo", b"y") == b.local_peer.raw + b"y"
            answers: dict[int, bytes] = {}

            async def ask(i: int) -> None:
                answers[i] = await a.request(b.local_peer, "/echo", str(i).encode())

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(ask, i)
        assert answers == {i: a.local_peer.raw + str(i).encode() for i in range(100)}


async def check_empty_and_largest_payloads(make_mesh: MeshFactory) -> None:
    async with make_mesh(2, LIMITS) as [(a, _), (b, _)]:
        b.set_request_handler("/len", lambda peer, p: _const(len(p).to_bytes(4, "big")))
        with trio.fail_after(20):
            assert await a.request(b.local_peer, "/len", b"") == bytes(4)
            largest = LIMITS.max_frame_bytes
            assert await a.request(b.local_peer, "/len", bytes(largest)) == largest.to_bytes(
                4, "big"
            )


async def check_bytes_are_counted_once(make_mesh: MeshFactory) -> None:
    async with make_mesh(2, LIMITS) as [(a, a_stats), (b, b_stats)]:
        b.set_request_handler("/len", lambda peer, p: _const(b"ok"))
        before_out, before_in = a_stats.bytes_out, b_stats.bytes_in
        with trio.fail_after(20):
            await a.request(b.local_peer, "/len", bytes(100_000))
        for counted in (a_stats.bytes_out - before_out, b_stats.bytes_in - before_in):
            assert 100_000 <= counted <= 100_000 + 1024  # the payload plus framing, once


async def _const(value: bytes) -> bytes:
    return value


async def check_refusals_are_answered_and_counted(make_mesh: MeshFactory) -> None:
    async def picky(peer: PeerId, payload: bytes) -> bytes:
        raise RemoteProtocolError("no thanks", reason=RejectReason.BAD_FIELD)

    async def buggy(peer: PeerId, payload: bytes) -> bytes:
        raise ZeroDivisionError("a bug in the handler")

    async with make_mesh(2, LIMITS) as [(a, _), (b, b_stats)]:
        b.set_request_handler("/picky", picky)
        b.set_request_handler("/buggy", buggy)
        b.set_request_handler("/echo", echo)
        with trio.fail_after(20):
            for protocol, reason in (
                ("/nobody", "unknown_protocol"),
                ("/picky", "bad_field"),
                ("/buggy", "internal"),
            ):
                with pytest.raises(RequestFailed) as info:
                    await a.request(b.local_peer, protocol, b"?")
                assert info.value.reason == reason
            with pytest.raises(RequestFailed) as info:
                await a.request(b.local_peer, "/echo", bytes(LIMITS.max_frame_bytes + 1))
            assert info.value.reason == "oversized"
            assert await a.request(b.local_peer, "/echo", b"still") == a.local_peer.raw + b"still"
        assert b_stats.rejected[RejectReason.UNKNOWN_PROTOCOL] == 1
        assert b_stats.rejected[RejectReason.OVERSIZED] == 1


async def check_rate_limit(make_mesh: MeshFactory) -> None:
    limits = TransportLimits(requests_per_second=1, request_burst=5)
    async with make_mesh(2, limits) as [(a, _), (b, b_stats)]:
        b.set_request_handler("/echo", echo)
        refused = 0
        with trio.fail_after(20):
            for _ in range(10):
                try:
                    await a.request(b.local_peer, "/echo", b"")
                except RequestFailed as exc:
                    assert exc.reason == "rate_limited"
                    refused += 1
        assert refused >= 4
        assert b_stats.rejected[RejectReason.RATE_LIMITED] == refused


async def check_streams_carry_frames_in_order_both_ways(make_mesh: MeshFactory) -> None:
    async def reverse(stream: Stream) -> None:
        assert stream.remote_peer == a.local_peer
        frames = []
        while True:
            try:
                frames.append(await stream.receive())
            except StreamClosed:
                break
            if frames[-1] == b"done":
                break
        for frame in reversed(frames):
            await stream.send(frame)

    async with make_mesh(2, LIMITS) as [(a, _), (b, _)]:
        b.set_stream_handler("/reverse", reverse)
        with trio.fail_after(20):
            stream = await a.open_stream(b.local_peer, "/reverse")
            assert stream.remote_peer == b.local_peer
            sent = [bytes([i]) * i for i in range(1, 50)] + [b"done"]
            for frame in sent:
                await stream.send(frame)
            got = [await stream.receive() for _ in sent]
            assert got == list(reversed(sent))
            with pytest.raises(StreamClosed):
                await stream.receive()
            await stream.aclose()


async def check_receive_into_fills_a_numpy_buffer(make_mesh: MeshFactory) -> None:
    size, frame = 16 << 20, 1 << 19
    source = np.random.default_rng(7).integers(0, 255, size, dtype=np.uint8)
    target = np.zeros(size, np.uint8)
    got = trio.Event()

    async def sink(stream: Stream) -> None:
        view = target.data
        offset = 0
        while offset < size:
            offset += await stream.receive_into(view[offset : offset + frame])
        got.set()
        with pytest.raises(RemoteProtocolError):
            await stream.receive_into(memoryview(bytearray(4)))  # a 16-byte frame: too big

    async with make_mesh(2, LIMITS) as [(a, _), (b, _)]:
        b.set_stream_handler("/sink", sink)
        with trio.fail_after(60):
            stream = await a.open_stream(b.local_peer, "/sink")
            view = source.data
            for offset in range(0, size, frame):
                await stream.send(view[offset : offset + frame])
            await stream.send(bytes(16))
            await got.wait()
            await stream.aclose()
    np.testing.assert_array_equal(target, source)


async def check_stream_limits(make_mesh: MeshFactory) -> None:
    release = trio.Event()

    async def hold(stream: Stream) -> None:
        await release.wait()

    limits = TransportLimits(max_streams_per_peer=2)
    async with make_mesh(2, limits) as [(a, _), (b, b_stats)]:
        b.set_stream_handler("/hold", hold)
        with trio.fail_after(20):
            held = [await a.open_stream(b.local_peer, "/hold") for _ in range(2)]
            with pytest.raises(RequestFailed) as info:
                await a.open_stream(b.local_peer, "/hold")
            assert info.value.reason == "too_many_streams"
            with pytest.raises(RequestFailed) as info:
                await a.open_stream(b.local_peer, "/nobody")
            assert info.value.reason == "unknown_protocol"
            release.set()
            for stream in held:
                await stream.aclose()
        assert b_stats.rejected[RejectReason.TOO_MANY_STREAMS] == 1
        assert b_stats.rejected[RejectReason.UNKNOWN_PROTOCOL] == 1


async def check_stop_is_prompt_with_streams_and_requests_open(make_mesh: MeshFactory) -> None:
    async def never(peer: PeerId, payload: bytes) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def idle(stream: Stream) -> None:
        await trio.sleep_forever()

    outcomes: list[type[BaseException]] = []
    async with make_mesh(2, LIMITS) as mesh:
        (a, _), (b, _) = mesh
        b.set_request_handler("/never", never)
        b.set_stream_handler("/idle", idle)
        stream = await a.open_stream(b.local_peer, "/idle")

        async def wait_request() -> None:
            try:
                await a.request(b.local_peer, "/never", b"")
            except (PeerUnreachable, RequestFailed) as exc:
                outcomes.append(type(exc))

        async def wait_stream() -> None:
            try:
                await stream.receive()
            except StreamClosed as exc:
                outcomes.append(type(exc))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_request)
                nursery.start_soon(wait_stream)
                await trio.sleep(0.2)
                started = trio.current_time()
                await mesh[1].stop()
                stopped = trio.current_time() - started
    assert stopped < 2.0
    assert len(outcomes) == 2


async def check_request_each_answers_each_in_order(make_mesh: MeshFactory) -> None:
    async def echo_or_hang(peer: PeerId, payload: bytes) -> bytes:
        if payload == b"hang":
            await trio.sleep_forever()
        return peer.raw + payload

    async with make_mesh(3, LIMITS) as mesh:
        (a, _), (b, _), (c, c_stats) = mesh
        b.set_request_handler("/echo", echo_or_hang)
        c.set_request_handler("/echo", echo_or_hang)
        me, too_long = a.local_peer.raw, bytes(LIMITS.max_frame_bytes + 1)
        with trio.fail_after(20):
            answers = await a.request_each(
                [(b.local_peer, b"1"), (c.local_peer, b"2"), (c.local_peer, too_long)],
                "/echo",
                deadline=trio.current_time() + 15,
            )
            assert answers[:2] == [me + b"1", me + b"2"]
            assert isinstance(answers[2], RequestFailed) and answers[2].reason == "oversized"
            assert c_stats.rejected[RejectReason.OVERSIZED] == 1
            started = trio.current_time()
            answers = await a.request_each(
                [(b.local_peer, b"hang"), (c.local_peer, b"3")],
                "/echo",
                deadline=started + 0.5,
            )
            assert 0.5 <= trio.current_time() - started < 5
            assert isinstance(answers[0], trio.TooSlowError) and answers[1] == me + b"3"
            await mesh[2].stop()
            answers = await a.request_each(
                [(b.local_peer, b"4"), (c.local_peer, b"5")],
                "/echo",
                deadline=trio.current_time() + 15,
            )
            assert answers[0] == me + b"4"
            assert isinstance(answers[1], PeerUnreachable | RequestFailed)


CHECKS: list[Check] = [
    check_requests_both_ways_and_concurrently,
    check_request_each_answers_each_in_order,
    check_empty_and_largest_payloads,
    check_bytes_are_counted_once,
    check_refusals_are_answered_and_counted,
    check_rate_limit,
    check_streams_carry_frames_in_order_both_ways,
    check_receive_into_fills_a_numpy_buffer,
    check_stream_limits,
    check_stop_is_prompt_with_streams_and_requests_open,
]
