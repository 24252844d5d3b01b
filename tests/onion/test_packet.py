"""Sphinx packets: round trips, one size for every path, tampering, malformed input."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.errors import LocalProtocolError
from meshfed.onion import (
    BODY_SIZE,
    MAX_HOPS,
    PACKET_SIZE,
    Deliver,
    Drop,
    DropReason,
    Forward,
    Hop,
    build_packet,
)
from meshfed.onion.packet import (
    HEADER_SIZE,
    MAX_DELAY_MS,
    PEER_ID_SIZE,
    SLOT_SIZE,
    build_header,
)

from .mesh import EPOCH, NOW, Mesh

MESH = Mesh(MAX_HOPS + 1)


def _random_path(data: st.DataObject, length: int) -> list[int]:
    return data.draw(st.permutations(range(len(MESH.nodes))))[:length]


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    length=st.integers(1, MAX_HOPS),
    body=st.binary(max_size=BODY_SIZE),
    delay_ms=st.integers(0, MAX_DELAY_MS),
)
def test_a_packet_reaches_its_destination_with_its_body_over_any_path(
    data: st.DataObject, length: int, body: bytes, delay_ms: int
) -> None:
    indices = _random_path(data, length)
    out = build_packet(MESH.path(indices, delay_ms), body, epoch=EPOCH, random_bytes=os.urandom)
    trace = MESH.route(out)

    assert isinstance(trace.action, Deliver)
    assert trace.action.body == body + bytes(BODY_SIZE - len(body))
    assert [peer for peer, _ in trace.seen] == [MESH.nodes[i].peer for i in indices]
    assert [f.delay for f in trace.forwards] == [delay_ms / 1000] * (length - 1)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), length=st.integers(1, MAX_HOPS))
def test_every_packet_on_the_wire_has_one_size_whatever_the_path_and_position(
    data: st.DataObject, length: int
) -> None:
    indices = _random_path(data, length)
    out = build_packet(MESH.path(indices), b"x", epoch=EPOCH, random_bytes=os.urandom)
    trace = MESH.route(out)
    assert [len(packet) for _, packet in trace.seen] == [PACKET_SIZE] * length


@settings(max_examples=200, deadline=None)
@given(data=st.data(), length=st.integers(1, MAX_HOPS), bit=st.integers(0, PACKET_SIZE * 8 - 1))
def test_one_flipped_bit_is_dropped_at_the_next_hop_or_rejected_by_the_destination(
    data: st.DataObject, length: int, bit: int
) -> None:
    """A bit flipped on the way into any hop: a header bit makes that hop drop the packet; a
    payload bit passes the relays (they cannot tell) and the destination rejects the noise."""
    indices = _random_path(data, length)
    at_hop = data.draw(st.integers(0, length - 1))
    body = b"the request " * 100
    out = build_packet(MESH.path(indices), body, epoch=EPOCH, random_bytes=os.urandom)

    def flip(hop_number: int, packet: bytes) -> bytes:
        if hop_number != at_hop:
            return packet
        tampered = bytearray(packet)
        tampered[bit // 8] ^= 1 << (bit % 8)
        return bytes(tampered)

    trace = MESH.route(out, tamper=flip)

    assert isinstance(trace.action, Drop)
    if bit < HEADER_SIZE * 8:
        assert len(trace.seen) == at_hop + 1, "a tampered header is dropped where it arrives"
        assert trace.action.reason in {
            DropReason.BAD_MAC,
            DropReason.BAD_VERSION,
            DropReason.UNKNOWN_EPOCH,
            DropReason.BAD_ELEMENT,
        }
    else:
        assert len(trace.seen) == length
        assert trace.action.reason is DropReason.BAD_PAYLOAD


@settings(max_examples=200, deadline=None)
@given(packet=st.binary(min_size=PACKET_SIZE - 5, max_size=PACKET_SIZE - 5))
def test_random_bytes_of_packet_size_for_the_right_epoch_are_dropped_never_raised(
    packet: bytes,
) -> None:
    node = MESH.nodes[0]
    action = node.relay.process(bytes([1]) + EPOCH.to_bytes(4, "big") + packet, NOW)
    assert isinstance(action, Drop)
    assert action.reason in {DropReason.BAD_MAC, DropReason.BAD_ELEMENT}


@settings(max_examples=100, deadline=None)
@given(packet=st.binary(max_size=PACKET_SIZE + 10))
def test_any_bytes_are_dropped_with_a_counted_reason(packet: bytes) -> None:
    action = MESH.nodes[0].relay.process(packet, NOW)
    assert isinstance(action, Drop)
    assert action.reason.counted_as is not None


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little")])
def test_a_low_order_alpha_is_dropped(point: bytes) -> None:
    out = build_packet(MESH.path([0]), b"", epoch=EPOCH, random_bytes=os.urandom)
    packet = out.packet[:5] + point + out.packet[37:]
    action = MESH.nodes[0].relay.process(packet, NOW)
    assert action == Drop(DropReason.BAD_ELEMENT, "alpha has low order")


def _forward_slot(next_peer: bytes, delay_ms: int) -> bytes:
    slot = bytes([1]) + next_peer + delay_ms.to_bytes(4, "big")
    return slot + bytes(SLOT_SIZE - len(slot))


@pytest.mark.parametrize(
    "slot",
    [
        bytes([9]) + bytes(SLOT_SIZE - 1),  # no such command
        bytes([2]) + b"\x01" + bytes(SLOT_SIZE - 2),  # deliver with a nonzero reserved byte
        _forward_slot(bytes(PEER_ID_SIZE), 0),  # the next hop is not a peer id
        _forward_slot(MESH.nodes[1].peer.raw, MAX_DELAY_MS + 1),  # too long a delay
        _forward_slot(MESH.nodes[1].peer.raw, 0)[:-1] + b"\x01",  # reserved bytes
    ],
)
def test_routing_a_relay_refuses_is_dropped_even_with_a_valid_mac(slot: bytes) -> None:
    """A sender may write anything into a slot; the relay reads it within bounds."""
    header, _ = build_header(MESH.path([0]), slot, epoch=EPOCH, random_bytes=os.urandom)
    action = MESH.nodes[0].relay.process(header + bytes(PACKET_SIZE - HEADER_SIZE), NOW)
    assert isinstance(action, Drop)
    assert action.reason is DropReason.BAD_ROUTING


def test_a_forward_slot_the_sender_wrote_by_hand_is_followed() -> None:
    slot = _forward_slot(MESH.nodes[1].peer.raw, 1500)
    header, _ = build_header(MESH.path([0]), slot, epoch=EPOCH, random_bytes=os.urandom)
    action = MESH.nodes[0].relay.process(header + bytes(PACKET_SIZE - HEADER_SIZE), NOW)
    assert isinstance(action, Forward)
    assert (action.next_hop, action.delay) == (MESH.nodes[1].peer, 1.5)


@pytest.mark.parametrize(
    ("path", "body", "epoch", "match"),
    [
        ([], b"", EPOCH, "1 to 5 hops"),
        (MESH.path([0, 1, 2, 3, 4, 5]), b"", EPOCH, "1 to 5 hops"),
        (MESH.path([0]), bytes(BODY_SIZE + 1), EPOCH, "at most"),
        (MESH.path([0]), b"", -1, "unsigned 32-bit"),
        (MESH.path([0]), b"", 2**32, "unsigned 32-bit"),
        ([Hop(MESH.nodes[0].peer, bytes(31))], b"", EPOCH, "32 bytes"),
        ([Hop(MESH.nodes[0].peer, bytes(32))], b"", EPOCH, "low-order"),
        (MESH.path([0], MAX_DELAY_MS + 1), b"", EPOCH, "delay"),
        (MESH.path([0], -1), b"", EPOCH, "delay"),
    ],
)
def test_building_refuses_what_no_relay_could_process(
    path: list[Hop], body: bytes, epoch: int, match: str
) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        build_packet(path, body, epoch=epoch, random_bytes=os.urandom)


@pytest.mark.parametrize("at_hop", [0, 1, 2])
def test_alpha_with_its_ignored_top_bit_flipped_is_dropped(at_hop: int) -> None:
    """X25519 ignores the top bit of a point, so the MAC must cover alpha itself: else the
    flipped packet would be a second valid encoding of the same packet."""
    out = build_packet(MESH.path([0, 1, 2]), b"", epoch=EPOCH, random_bytes=os.urandom)

    def flip_top_bit(hop_number: int, packet: bytes) -> bytes:
        if hop_number != at_hop:
            return packet
        return packet[:36] + bytes([packet[36] ^ 0x80]) + packet[37:]

    trace = MESH.route(out, tamper=flip_top_bit)
    assert trace.action == Drop(DropReason.BAD_MAC)
    assert len(trace.seen) == at_hop + 1
