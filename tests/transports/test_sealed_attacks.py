"""The sealed port under attack, over real TCP on 127.0.0.1 (security review findings 3, 4,
5, 10, 15 and 17): what an unauthenticated dialer, an eavesdropper, an on-path proxy and a
cancelled sender can and cannot do to two libp2p transports."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from meshfed.control import Text
from meshfed.errors import PeerUnreachable, RequestTimeout, StreamClosed, TransportError
from meshfed.identity import Identity, PeerId
from meshfed.node import RPC_PROTOCOL
from meshfed.stats import NodeStats, RejectReason
from meshfed.testing import free_port
from meshfed.transport import Stream, TransportLimits
from meshfed.transports import libp2p as libp2p_module
from meshfed.transports._sealed import HEADER, HELLO_BYTES, NONCE_BYTES, TAG_BYTES
from meshfed.transports.libp2p import (
    CONTROL,
    ERROR_TABLE,
    HANDSHAKE_TIMEOUT_S,
    MAX_UNAUTHENTICATED,
    REQUEST,
    Libp2pTransport,
    _InboundSessions,
    _mapped,
)
from meshfed.wire import seal
from tests.procs.harness import ROOT, Process, start_peer
from tests.transports.conformance import Member, Mesh, running


async def echo(peer: PeerId, payload: bytes) -> bytes:
    return payload


@asynccontextmanager
async def pair(limits: TransportLimits | None = None) -> AsyncIterator[Mesh]:
    limits = limits or TransportLimits()
    members = [
        Member(Libp2pTransport(Identity.generate(), stats=stats, limits=limits), stats)
        for stats in (NodeStats(), NodeStats())
    ]
    async with running(members) as mesh:
        for transport, _ in mesh:
            transport.set_request_handler("/echo", echo)
        yield mesh


def sealed_port(a: Libp2pTransport, b: PeerId) -> int:
    return a._sessions[b].sealed_port  # test-only peek: the port a peer learns in the exchange


def session_id(a: Libp2pTransport, b: PeerId) -> bytes:
    """What an eavesdropper reads in clear at the start of each of a's sealed connections."""
    return a._sessions[b].session_id


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def receive_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


# -- finding 3: unauthenticated connections cost fixed memory, time out, are capped ------------


async def test_replayed_hellos_with_huge_headers_allocate_nothing_and_are_closed() -> None:
    limits = TransportLimits(max_frame_bytes=8 * 2**20)
    async with pair(limits) as [(a, _), (b, b_stats)]:
        assert await a.request(b.local_peer, "/echo", b"hi") == b"hi"
        port, hello = sealed_port(a, b.local_peer), session_id(a, b.local_peer)
        header = HEADER.pack(limits.max_frame_bytes, REQUEST, 1)  # "8 MiB follow"
        before = rss_mb()
        attackers = []
        with trio.fail_after(20):
            for _ in range(20):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(hello + os.urandom(NONCE_BYTES) + bytes([CONTROL]))
                attackers.append(stream)
            for stream in attackers:
                await stream.send_all(header)
            await trio.sleep(0.5)
            grown = rss_mb() - before
            assert grown < 16, f"{grown:.0f} MiB for 20 headers"
            for stream in attackers:  # the listener hangs up on each, without waiting for bodies
                answer = await receive_until_closed(stream)
                assert len(answer) == NONCE_BYTES
                await stream.aclose()
        assert b_stats.rejected[RejectReason.HANDSHAKE_FAILED] == 20
        assert b_stats.rejected[RejectReason.MALFORMED] == 0
        assert await a.request(b.local_peer, "/echo", b"still") == b"still"
        assert await b.request(a.local_peer, "/echo", b"back") == b"back"


async def test_idle_unauthenticated_connections_time_out_and_are_capped() -> None:
    async with pair() as [(a, _), (b, b_stats)]:
        port = sealed_port(a, b.local_peer)
        extra = 16
        started = trio.current_time()
        idle = [
            await trio.open_tcp_stream("127.0.0.1", port)
            for _ in range(MAX_UNAUTHENTICATED + extra)
        ]
        for stream in idle:
            await stream.send_all(HEADER.pack(2**31, REQUEST, 0))  # 13 bytes, less than a hello
        await trio.sleep(1)
        # the oldest were shed to make room; the others wait for their deadline
        assert b_stats.rejected[RejectReason.OVERLOADED] == extra
        # an honest peer gets through meanwhile: a stream is a new sealed connection
        b.set_stream_handler("/ping", _pong)
        with trio.fail_after(5):
            async with await a.open_stream(b.local_peer, "/ping") as stream:
                await stream.send(b"ping")
                assert await stream.receive() == b"pong"
        with trio.fail_after(HANDSHAKE_TIMEOUT_S + 5):
            for stream in idle:
                assert await receive_until_closed(stream) == b""
        assert trio.current_time() - started >= HANDSHAKE_TIMEOUT_S - 1
        # the honest stream's handshake shed one more: every idle one was counted once
        shed, timed_out = (
            b_stats.rejected[RejectReason.OVERLOADED],
            b_stats.rejected[RejectReason.HANDSHAKE_TIMEOUT],
        )
        assert (shed, timed_out) == (extra + 1, MAX_UNAUTHENTICATED - 1)
        assert not b._unauthenticated  # type: ignore[attr-defined]


async def _pong(stream: Stream) -> None:
    assert await stream.receive() == b"ping"
    await stream.send(b"pong")


def test_a_node_out_of_file_descriptors_keeps_serving(tmp_path: Path) -> None:
    """Flood a node's sealed port until accept() fails with EMFILE; it sheds, goes on, and
    answers an honest peer over a new connection."""
    peer, info = start_peer(tmp_path / "target")
    try:
        pid = peer.popen.pid
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 24, hard))
        trio.run(_flood_then_ask, info["listen"][0], peer.popen)
        assert peer.popen.poll() is None, peer.stderr
        assert "Traceback" not in peer.stderr, peer.stderr
        rejected = peer.call(cmd="status")["stats"]["rejected"]
        assert rejected.get("overloaded", 0) > 0, rejected
    finally:
        peer.stop()


async def _flood_then_ask(addr: str, popen: subprocess.Popen[str]) -> None:
    me = Identity.generate()
    client = Libp2pTransport(me, stats=NodeStats())
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        target = await client.connect(addr)
        assert await _text_request(client, me, target, "before") == "echo:before"
        port = sealed_port(client, target)
        flood: list[socket.socket] = []
        for _ in range(150):  # far more than the target has descriptors for
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            flood.append(sock)
        await trio.sleep(1)
        assert popen.poll() is None, "the node died"
        with trio.fail_after(20):
            for i in range(3):  # new sealed connections each time: the control one is dropped
                client._controls.clear()
                assert await _text_request(client, me, target, f"during {i}") == f"echo:during {i}"
        for sock in flood:
            sock.close()
        nursery.cancel_scope.cancel()


async def _text_request(client: Libp2pTransport, me: Identity, target: PeerId, text: str) -> str:
    """Send a signed Text to the peer process's echo handler; the echo's text."""
    envelope, _ = seal(me, Text(text=text), now_ms=time.time_ns() // 1_000_000)
    answer = await client.request(target, RPC_PROTOCOL, envelope)
    expected = f"echo:{text}"
    assert expected.encode() in answer  # inside the peer's signed envelope
    return expected


# -- finding 4: the session id in clear is not a bearer token ----------------------------------


async def test_a_replayed_hello_cannot_take_the_control_connection() -> None:
    async with pair() as [(a, a_stats), (b, b_stats)]:
        await a.connect(b.listen_addrs[0])  # sessions both ways, no sealed connection yet
        port, captured = sealed_port(a, b.local_peer), session_id(a, b.local_peer)
        hello = captured + os.urandom(NONCE_BYTES) + bytes([CONTROL])
        with trio.fail_after(10):
            thief = await trio.open_tcp_stream("127.0.0.1", port)
            await thief.send_all(hello)  # ... and holds the connection
            assert len(await thief.receive_some()) == NONCE_BYTES
            await trio.sleep(0.2)
            # B's requests to A reach A, not the thief
            assert await b.request(a.local_peer, "/echo", b"to a") == b"to a"
            assert await a.request(b.local_peer, "/echo", b"to b") == b"to b"
            forger = await trio.open_tcp_stream("127.0.0.1", port)
            await forger.send_all(hello)
            assert len(await forger.receive_some()) == NONCE_BYTES
            await forger.send_all(HEADER.pack(0, 255, 0) + os.urandom(TAG_BYTES))  # a CONFIRM
            assert await receive_until_closed(forger) == b""
            assert await b.request(a.local_peer, "/echo", b"again") == b"again"
        with trio.fail_after(HANDSHAKE_TIMEOUT_S + 5):
            assert await receive_until_closed(thief) == b""
        assert b_stats.rejected[RejectReason.HANDSHAKE_FAILED] == 1
        assert b_stats.rejected[RejectReason.HANDSHAKE_TIMEOUT] == 1
        assert a_stats.rejected[RejectReason.MALFORMED] == 0
        assert b_stats.rejected[RejectReason.MALFORMED] == 0


# -- an on-path proxy (findings 5 and 15) --------------------------------------------------------


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of a sealed port, frame-aware in the dialer's
    direction: it may replace the next REQUEST frame (``forge``) or stop forwarding
    (``paused``)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.forge: Callable[[int], bytes] | None = None
        self.flowing = trio.Event()
        self.flowing.set()
        self.forwarded = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async def serve(down: trio.SocketStream) -> None:
            up = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with down, up, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_back, up, down)
                await self._pump_frames(down, up)
                nursery.cancel_scope.cancel()

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(serve, listeners)

    async def _pump_back(self, up: trio.SocketStream, down: trio.SocketStream) -> None:
        try:
            while chunk := await up.receive_some():
                await down.send_all(chunk)
        except trio.BrokenResourceError:
            pass
        await down.aclose()

    async def _pump_frames(self, down: trio.SocketStream, up: trio.SocketStream) -> None:
        try:
            await up.send_all(await _exactly(down, HELLO_BYTES))
            while True:
                header = await _exactly(down, HEADER.size)
                length, frame_type, _ = HEADER.unpack(header)
                if frame_type == REQUEST and self.forge is not None:
                    await _exactly(down, length + TAG_BYTES)  # swallow the real frame
                    await up.send_all(self.forge(length))
                    self.forge = None
                    continue
                await up.send_all(header)
                remaining = length + TAG_BYTES
                while remaining:
                    await self.flowing.wait()
                    chunk = await down.receive_some(min(remaining, 65536))
                    if not chunk:
                        return
                    await up.send_all(chunk)
                    remaining -= len(chunk)
                    self.forwarded += len(chunk)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


@asynccontextmanager
async def through_proxy(a: Libp2pTransport, b: PeerId) -> AsyncIterator[Proxy]:
    """Route a's sealed connections to b through a new proxy."""
    proxy = Proxy(sealed_port(a, b))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        a._sessions[b].sealed_port = proxy.port  # the on-path position
        a._controls.pop(b, None)
        yield proxy
        nursery.cancel_scope.cancel()


async def test_a_frame_replaced_on_path_is_caught_before_it_is_acted_on() -> None:
    limits = TransportLimits(max_frame_bytes=1024)
    async with pair(limits) as [(a, _), (b, b_stats)]:
        await a.connect(b.listen_addrs[0])
        async with through_proxy(a, b.local_peer) as proxy:
            assert await a.request(b.local_peer, "/echo", b"through") == b"through"
            oversized = limits.max_frame_bytes + 1000
            proxy.forge = lambda _: (
                HEADER.pack(oversized, REQUEST, 77) + bytes(oversized + TAG_BYTES)
            )
            with trio.fail_after(5), pytest.raises(PeerUnreachable):
                await a.request(b.local_peer, "/echo", b"replaced")
            assert b_stats.rejected[RejectReason.MALFORMED] == 1  # B noticed ...
            assert b_stats.rejected[RejectReason.OVERSIZED] == 0  # ... before acting on it
            with trio.fail_after(5):
                assert await a.request(b.local_peer, "/echo", b"again") == b"again"


async def test_an_honest_oversized_request_is_still_refused_and_answered() -> None:
    limits = TransportLimits(max_frame_bytes=1024)
    async with pair(limits) as [(a, _), (b, b_stats)]:
        with trio.fail_after(10):
            with pytest.raises(TransportError) as info:
                await a.request(b.local_peer, "/echo", bytes(5000))
            assert getattr(info.value, "reason", None) == "oversized"
            assert await a.request(b.local_peer, "/echo", b"after") == b"after"
        assert b_stats.rejected[RejectReason.OVERSIZED] == 1


async def test_a_send_cancelled_mid_frame_does_not_poison_the_next_request() -> None:
    limits = TransportLimits(max_frame_bytes=64 * 2**20)
    async with pair(limits) as [(a, a_stats), (b, b_stats)]:
        await a.connect(b.listen_addrs[0])
        async with through_proxy(a, b.local_peer) as proxy:
            assert await a.request(b.local_peer, "/echo", b"warm") == b"warm"
            first = a._controls[b.local_peer]
            proxy.flowing = trio.Event()  # B stops receiving: the write blocks mid-frame
            with trio.move_on_after(1) as scope:
                await a.request(b.local_peer, "/echo", bytes(48 * 2**20))
            assert scope.cancelled_caught
            proxy.flowing.set()
            with trio.fail_after(10):
                assert await a.request(b.local_peer, "/echo", b"next") == b"next"
            assert first.channel.broken
            assert a._controls[b.local_peer] is not first
        assert b_stats.rejected[RejectReason.MALFORMED] == 0
        assert a_stats.rejected[RejectReason.MALFORMED] == 0


async def test_a_send_cancelled_before_any_byte_left_keeps_the_connection() -> None:
    async with pair() as [(a, _), (b, _)]:
        assert await a.request(b.local_peer, "/echo", b"warm") == b"warm"
        control = a._controls[b.local_peer]
        with trio.CancelScope() as scope:
            scope.cancel()
            await a.request(b.local_peer, "/echo", b"never")
        with trio.fail_after(5):
            assert await a.request(b.local_peer, "/echo", b"same") == b"same"
        assert not control.channel.broken
        assert a._controls[b.local_peer] is control


# -- finding 10: inbound sessions are bounded ----------------------------------------------------


async def test_inbound_sessions_are_pruned_per_peer() -> None:
    async with pair() as [(a, _), (b, _)]:
        await a.connect(b.listen_addrs[0])
        for _ in range(10):  # a peer that keeps exchanging keys (or reconnects, or restarts)
            a._sessions[b.local_peer] = await a._exchange_keys(b.local_peer)
        assert len(b._inbound_sessions) <= 2
        assert await a.request(b.local_peer, "/echo", b"newest works") == b"newest works"


def test_the_session_table_keeps_the_newest_within_both_bounds() -> None:
    table = _InboundSessions(per_peer=2, total=5)
    peers = [Identity.generate().peer_id for _ in range(4)]
    for round_ in range(3):
        for index, peer in enumerate(peers):
            table.add(bytes([round_, index]) * 8, peer, b"k" * 32)
    assert len(table) == 5
    assert table.get(bytes([2, 3]) * 8) == (peers[3], b"k" * 32)  # the newest stays
    assert table.get(bytes([0, 0]) * 8) is None  # the oldest went
    assert table.get(bytes([1, 3]) * 8) is not None and table.get(bytes([0, 3]) * 8) is None


# -- finding 17: one table maps foreign exceptions; our bugs propagate -------------------------


@pytest.mark.parametrize("foreign, ours", ERROR_TABLE)
def test_foreign_exceptions_are_mapped_by_type(
    foreign: type[BaseException], ours: type[TransportError]
) -> None:
    with pytest.raises(ours, match="dialling x"), _mapped("dialling x"):
        raise foreign() if foreign is not OSError else ConnectionRefusedError(111, "refused")


def test_a_failure_inside_py_libp2p_is_mapped_whatever_its_type() -> None:
    from libp2p.peer.peerinfo import PeerInfo

    with pytest.raises(PeerUnreachable, match="py-libp2p failed"), _mapped("dialling x"):
        PeerInfo(1, 1)  # type: ignore[arg-type]  # a TypeError raised in py-libp2p's code


def test_our_own_bugs_are_not_mapped() -> None:
    for bug in (ZeroDivisionError, KeyError, AttributeError, AssertionError):
        with pytest.raises(bug), _mapped("anything"):
            raise bug()


async def test_network_failures_arrive_as_our_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libp2p_module, "DIAL_TIMEOUT_S", 1.0)
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP, never speaks libp2p
    async with pair() as [(a, _), _]:
        stranger = Identity.generate().peer_id
        closed_port = free_port()
        with pytest.raises(PeerUnreachable):
            await a.connect(f"/ip4/127.0.0.1/tcp/{closed_port}/p2p/{stranger}")
        with pytest.raises(RequestTimeout):
            other = Identity.generate().peer_id  # py-libp2p caches the first one's failure
            await a.connect(f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/p2p/{other}")
        with pytest.raises(PeerUnreachable):
            await a.connect("/ip4/127.0.0.1/tcp/1")  # no /p2p
        with pytest.raises((PeerUnreachable, RequestTimeout)):
            await a.ping(stranger)  # type: ignore[attr-defined]
        with pytest.raises((PeerUnreachable, StreamClosed)):
            await a.request(stranger, "/echo", b"")
    silent.close()


# -- issue 13, item 1: a taken port is an error --------------------------------------------------


async def test_a_second_transport_on_a_taken_port_fails_naming_it() -> None:
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}"
    first = Libp2pTransport(Identity.generate(), stats=NodeStats(), listen_addrs=(addr,))
    second = Libp2pTransport(Identity.generate(), stats=NodeStats(), listen_addrs=(addr,))
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        with trio.fail_after(10), pytest.raises(TransportError, match="address in use") as info:
            await nursery.start(second.run)
        assert addr in str(info.value)
        assert first.listen_addrs  # the first one is unaffected
        nursery.cancel_scope.cancel()


def test_a_second_node_process_on_a_taken_port_exits_non_zero(tmp_path: Path) -> None:
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}"
    config = tmp_path / "node.toml"
    config.write_text("mdns = false\n")
    command = ["-m", "meshfed.cli", "run", "--listen", addr, "--config", str(config)]
    first = Process(*command, "--data-dir", str(tmp_path / "one"), cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while _listening(addr) is False:
            assert first.popen.poll() is None and time.monotonic() < deadline, first.stderr
            time.sleep(0.2)
        second = Process(*command, "--data-dir", str(tmp_path / "two"), cwd=ROOT)
        assert second.popen.wait(60) != 0
        assert "address in use" in second.stderr and addr in second.stderr, second.stderr
        assert first.popen.poll() is None
    finally:
        first.popen.send_signal(signal.SIGTERM)
        first.popen.wait(20)


def _listening(addr: str) -> bool:
    port = int(addr.rsplit("/", 1)[1])
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# -- the key exchange: a low-order key is refused and counted, never an exception --------------


async def test_a_low_order_key_in_the_key_exchange_is_refused_and_counted() -> None:
    import msgpack

    from meshfed.transports.libp2p import SESSION_PROTOCOL, _to_libp2p

    async with pair() as [(a, _), (b, b_stats)]:
        await a.connect(b.listen_addrs[0])
        with trio.fail_after(10):
            stream = await a.host.new_stream(_to_libp2p(b.local_peer), [SESSION_PROTOCOL])
            await stream.write(msgpack.packb([1, bytes(32), os.urandom(16), 0]))
            with contextlib.suppress(Exception):  # reset by B: py-libp2p's errors, any type
                assert await stream.read(256) == b""
        await trio.sleep(0.2)
        assert b_stats.rejected[RejectReason.HANDSHAKE_FAILED] == 1
        assert await a.request(b.local_peer, "/echo", b"still") == b"still"


async def test_authenticated_connections_per_peer_are_capped() -> None:
    from meshfed.transports.libp2p import STREAM

    limits = TransportLimits(max_streams_per_peer=2)
    async with pair(limits) as [(a, _), (b, b_stats)]:
        await a.connect(b.listen_addrs[0])
        cap = limits.max_streams_per_peer + 4  # streams and a few control connections
        with trio.fail_after(10):
            held = [await a._dial_sealed(b.local_peer, STREAM) for _ in range(cap + 3)]
            await trio.sleep(0.3)
            for channel in held[cap:]:  # refused: B closed them
                with pytest.raises(StreamClosed):
                    await channel.receive_header()
        assert b_stats.rejected[RejectReason.TOO_MANY_STREAMS] == 3
        for channel in held:
            channel.close()
        with trio.fail_after(10):
            assert await a.request(b.local_peer, "/echo", b"still") == b"still"
