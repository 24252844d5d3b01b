"""Single-use reply blocks: a reply reaches its SURB's maker and nobody else, once."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.errors import LocalProtocolError, RemoteProtocolError
from meshfed.onion import (
    BODY_SIZE,
    MAX_HOPS,
    PACKET_SIZE,
    DeliverReply,
    Drop,
    DropReason,
    Forward,
    OpenedReply,
    Relay,
    ReplayCache,
    Surb,
    SurbBook,
    build_surb,
    packet_from_surb,
)
from meshfed.onion.packet import HEADER_SIZE
from meshfed.onion.surb import SURB_SIZE

from .mesh import EPOCH, NOW, SCHEDULE, Mesh, Trace

SENDER = 0  # node 0 makes the SURBs; nodes 1.. are relays and the replier


def _surb(mesh: Mesh, relays: list[int]) -> tuple[Surb, SurbBook]:
    path = mesh.path([*relays, SENDER])
    surb, secrets = build_surb(path, epoch=EPOCH, random_bytes=os.urandom)
    book = SurbBook()
    book.add(secrets, expires_at=SCHEDULE.retires_at(EPOCH))
    return Surb.from_bytes(surb.to_bytes()), book  # as the replier parses it


def _reply(mesh: Mesh, surb: Surb, body: bytes) -> Trace:
    return mesh.route(packet_from_surb(surb, body))


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    relays=st.integers(0, MAX_HOPS - 1),
    body=st.binary(max_size=BODY_SIZE),
)
def test_a_reply_on_a_surb_reaches_its_maker_with_its_body(
    data: st.DataObject, relays: int, body: bytes
) -> None:
    mesh = Mesh(MAX_HOPS + 1)
    order = data.draw(st.permutations(range(1, MAX_HOPS + 1)))[:relays]
    surb, book = _surb(mesh, order)
    trace = _reply(mesh, surb, body)

    assert isinstance(trace.action, DeliverReply)
    assert trace.seen[-1][0] == mesh.nodes[SENDER].peer
    assert [len(packet) for _, packet in trace.seen] == [PACKET_SIZE] * (relays + 1)
    reply = book.open(trace.action.surb_id, trace.action.payload, NOW)
    assert reply == OpenedReply(trace.action.surb_id, body + bytes(BODY_SIZE - len(body)))


def test_a_reply_opens_only_at_its_maker() -> None:
    """Anyone else handed the reply at the last hop fails its MAC; another node's book, or
    the maker's book after the SURB was used, has no keys for it."""
    mesh = Mesh(4)
    surb, book = _surb(mesh, [1, 2])
    forwarded: list[bytes] = []

    def capture(hop_number: int, packet: bytes) -> bytes:
        forwarded.append(packet)
        return packet

    trace = mesh.route(packet_from_surb(surb, b"answer"), tamper=capture)
    assert isinstance(trace.action, DeliverReply)
    for other in (1, 2, 3):
        fresh = Relay(mesh.nodes[other].ring, ReplayCache())
        assert fresh.process(forwarded[-1], NOW) == Drop(DropReason.BAD_MAC)
    assert SurbBook().open(trace.action.surb_id, trace.action.payload, NOW) == Drop(
        DropReason.UNKNOWN_SURB
    )
    assert isinstance(book.open(trace.action.surb_id, trace.action.payload, NOW), OpenedReply)


def test_a_surb_used_twice_is_dropped_at_the_first_relay() -> None:
    mesh = Mesh(4)
    surb, _ = _surb(mesh, [1, 2])
    assert isinstance(_reply(mesh, surb, b"first").action, DeliverReply)
    second = _reply(mesh, surb, b"second, another body")
    assert second.action == Drop(DropReason.REPLAYED)
    assert len(second.seen) == 1


def test_a_surb_used_twice_is_dropped_by_its_maker_even_if_every_relay_forgot() -> None:
    mesh = Mesh(4)
    surb, book = _surb(mesh, [1, 2])
    first = _reply(mesh, surb, b"first")
    assert isinstance(first.action, DeliverReply)
    assert isinstance(book.open(first.action.surb_id, first.action.payload, NOW), OpenedReply)

    _forget_replays(mesh, [1, 2, 3])  # relays restarted without their caches
    assert _reply(mesh, surb, b"second").action == Drop(DropReason.REPLAYED)

    _forget_replays(mesh, [0, 1, 2, 3])  # and the maker too: its book still refuses
    third = _reply(mesh, surb, b"third")
    assert isinstance(third.action, DeliverReply)
    assert book.open(third.action.surb_id, third.action.payload, NOW) == Drop(
        DropReason.UNKNOWN_SURB
    )


def _forget_replays(mesh: Mesh, indices: list[int]) -> None:
    for i in indices:
        node = mesh.nodes[i]
        node.relay = Relay(node.ring, ReplayCache())


@settings(max_examples=100, deadline=None)
@given(bit=st.integers(0, PACKET_SIZE * 8 - 1), at_hop=st.integers(0, 2))
def test_a_tampered_reply_is_dropped_on_the_way_or_refused_by_its_maker(
    bit: int, at_hop: int
) -> None:
    mesh = Mesh(3)
    surb, book = _surb(mesh, [1, 2])

    def flip(hop_number: int, packet: bytes) -> bytes:
        if hop_number != at_hop:
            return packet
        tampered = bytearray(packet)
        tampered[bit // 8] ^= 1 << (bit % 8)
        return bytes(tampered)

    trace = mesh.route(packet_from_surb(surb, b"the answer"), tamper=flip)
    if bit < HEADER_SIZE * 8:
        assert isinstance(trace.action, Drop)
        assert len(trace.seen) == at_hop + 1
    else:
        assert isinstance(trace.action, DeliverReply)
        opened = book.open(trace.action.surb_id, trace.action.payload, NOW)
        assert opened == Drop(DropReason.BAD_PAYLOAD, "reply authenticator is not zero")


def test_a_reply_after_its_surb_expired_is_refused_and_expire_forgets_it() -> None:
    mesh = Mesh(2)
    surb, book = _surb(mesh, [1])
    trace = _reply(mesh, surb, b"late")
    assert isinstance(trace.action, DeliverReply)
    expired = SCHEDULE.retires_at(EPOCH)
    assert book.open(trace.action.surb_id, trace.action.payload, expired) == Drop(
        DropReason.UNKNOWN_SURB
    )
    _, other = _surb(mesh, [1])
    counts = (len(other), other.expire(expired - 1), other.expire(expired), len(other))
    assert counts == (1, 0, 1, 0)


def test_the_book_is_bounded_and_refuses_a_surb_twice() -> None:
    mesh = Mesh(2)
    book = SurbBook(max_open=1)
    _, secrets = build_surb(mesh.path([1, SENDER]), epoch=EPOCH, random_bytes=os.urandom)
    book.add(secrets, expires_at=NOW + 1)
    with pytest.raises(LocalProtocolError, match="already"):
        book.add(secrets, expires_at=NOW + 1)
    _, more = build_surb(mesh.path([1, SENDER]), epoch=EPOCH, random_bytes=os.urandom)
    with pytest.raises(LocalProtocolError, match="no room"):
        book.add(more, expires_at=NOW + 1)


@pytest.mark.parametrize(
    "data", [b"", bytes(SURB_SIZE - 1), bytes(SURB_SIZE + 1), bytes(SURB_SIZE)]
)
def test_a_malformed_surb_from_a_request_is_a_remote_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        Surb.from_bytes(data)


def test_a_reply_body_too_long_is_refused() -> None:
    mesh = Mesh(2)
    surb, _ = _surb(mesh, [1])
    with pytest.raises(LocalProtocolError, match="at most"):
        packet_from_surb(surb, bytes(BODY_SIZE + 1))


def test_a_reply_looks_like_a_forward_packet_to_a_relay() -> None:
    mesh = Mesh(3)
    surb, _ = _surb(mesh, [1, 2])
    action = mesh.nodes[1].relay.process(packet_from_surb(surb, b"x").packet, NOW)
    assert isinstance(action, Forward)
    assert action.next_hop == mesh.nodes[2].peer
