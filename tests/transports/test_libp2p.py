"""The libp2p transport on 127.0.0.1 and ::1: the conformance suite and libp2p-specific
behaviour."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio
from libp2p.peer.id import ID

from meshfed.errors import PeerUnreachable
from meshfed.identity import Identity
from meshfed.interfaces import host_addresses
from meshfed.stats import NodeStats, RejectReason
from meshfed.testing import free_port
from meshfed.transport import Stream, TransportLimits
from meshfed.transports.libp2p import Libp2pTransport
from tests.transports.conformance import CHECKS, Check, Member, Mesh, running


@asynccontextmanager
async def libp2p_mesh(
    n: int, limits: TransportLimits, *, listen: str = "/ip4/127.0.0.1/tcp/0"
) -> AsyncIterator[Mesh]:
    members = []
    for _ in range(n):
        stats = NodeStats()
        transport = Libp2pTransport(
            Identity.generate(), stats=stats, limits=limits, listen_addrs=(listen,)
        )
        members.append(Member(transport, stats))
    async with running(members) as mesh:
        yield mesh


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
async def test_conformance(check: Check) -> None:
    await check(libp2p_mesh)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
async def test_conformance_over_ipv6(check: Check) -> None:
    if not socket.has_ipv6 or "::1" not in {str(ip) for ip in host_addresses()}:
        pytest.skip("this host has no IPv6 loopback")
    await check(functools.partial(libp2p_mesh, listen="/ip6/::1/tcp/0"))


async def test_peer_id_and_security_are_ours() -> None:
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX

    identity = Identity.generate()
    transport = Libp2pTransport(identity, stats=NodeStats())
    assert str(transport.host.get_id()) == str(identity.peer_id)
    upgrader = transport.host.get_network().upgrader
    assert list(upgrader.security_multistream.transports) == [NOISE]  # no plaintext, TLS, secio
    assert list(upgrader.muxer_multistream.transports) == [YAMUX]


async def test_libp2p_ping_and_addresses() -> None:
    async with libp2p_mesh(2, TransportLimits()) as [(a, _), (b, _)]:
        assert all(addr.endswith(f"/p2p/{b.local_peer}") for addr in b.listen_addrs)
        assert 0 < await a.ping(b.local_peer) < 1  # type: ignore[attr-defined]
        assert b.local_peer in a.connected_peers()


async def test_a_100mb_array_arrives_byte_exact() -> None:
    size, frame = 100_000_000, 1 << 20
    source = np.random.default_rng(3).integers(0, 255, size, dtype=np.uint8)
    target = np.empty(size, np.uint8)

    async def sink(stream: Stream) -> None:
        view, offset = target.data, 0
        while offset < size:
            offset += await stream.receive_into(view[offset : offset + frame])
        await stream.send(b"ok")

    async with libp2p_mesh(2, TransportLimits()) as [(a, _), (b, _)]:
        b.set_stream_handler("/sink", sink)
        with trio.fail_after(120):
            stream = await a.open_stream(b.local_peer, "/sink")
            view = source.data
            for offset in range(0, size, frame):
                await stream.send(view[offset : offset + frame])
            assert await stream.receive() == b"ok"
            await stream.aclose()
    assert np.array_equal(source, target)


async def test_garbage_on_the_sealed_port_is_counted_and_harmless() -> None:
    async with libp2p_mesh(2, TransportLimits()) as [(a, _), (b, b_stats)]:
        port = a._sessions[b.local_peer].sealed_port  # type: ignore[attr-defined]
        for garbage in (b"", b"\x00" * 33, bytes(range(200))):
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    try:
                        await stream.send_all(garbage)
                        await stream.send_eof()
                        assert await stream.receive_some() == b""  # hung up on, no answer
                    except trio.BrokenResourceError:
                        pass  # ... or reset
        # garbage hellos are refused; a hang-up before any hello refused nothing
        assert b_stats.rejected[RejectReason.HANDSHAKE_FAILED] == 2
        assert b_stats.abandoned == 1
        b.set_request_handler("/ok", lambda peer, p: _ok())
        assert await a.request(b.local_peer, "/ok", b"") == b"ok"


async def _ok() -> bytes:
    return b"ok"


def test_libp2p_records_reach_our_handlers(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        logging.getLogger("libp2p.network.swarm").warning("from libp2p")
    assert any(
        r.name == "libp2p.network.swarm" and r.message == "from libp2p" for r in caplog.records
    )


async def test_an_address_that_answers_as_another_peer_is_named() -> None:
    stranger = Identity.generate().peer_id
    async with libp2p_mesh(2, TransportLimits()) as [(a, _), (b, _)]:
        listen = a.listen_addrs[0]
        answering = listen.rsplit("/p2p/", 1)[1]
        with pytest.raises(PeerUnreachable) as caught:
            await b.connect(listen.replace(answering, str(stranger)))
        assert f"answers as peer {answering}, not {stranger}" in str(caught.value)


async def test_a_peer_back_on_a_new_port_is_reached_while_its_old_port_is_dialled() -> None:
    # A peer that restarted on another port: one task (gossip, with the bootstrap entry) keeps
    # dialling its old address while another connects to the new one. Each dials what it
    # asked for: the old address never replaces the new one.
    async with (
        libp2p_mesh(1, TransportLimits()) as [(a, _)],
        libp2p_mesh(1, TransportLimits()) as [(b, _)],
    ):
        new = b.listen_addrs[0]
        old = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{b.local_peer}"  # nobody listens

        async def dial_the_old_address(task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            while True:
                with contextlib.suppress(PeerUnreachable):
                    await a.connect(old)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            await nursery.start(dial_the_old_address)
            for _ in range(5):
                await trio.sleep(0.05)
                with trio.fail_after(10):
                    assert await a.connect(new) == b.local_peer
                await a.host.disconnect(ID(b.local_peer.raw))  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()
