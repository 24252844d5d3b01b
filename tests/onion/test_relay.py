"""The relay plays by the rules an attacker probes: replays, restarts, key rotation, and what
a relay learns from the packets it handles."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.onion import (
    MAX_HOPS,
    PACKET_SIZE,
    Deliver,
    Drop,
    DropReason,
    Forward,
    Relay,
    ReplayCache,
    build_packet,
)
from meshfed.onion.packet import HEADER_SIZE, PEER_ID_SIZE, ROUTING_SIZE, SLOT_SIZE, authenticate
from meshfed.onion.primitives import stream_xor
from meshfed.stats import RejectReason

from .mesh import EPOCH, NOW, SCHEDULE, Mesh

NEXT_EPOCH_IN_GRACE = SCHEDULE.starts_at(EPOCH + 1) + SCHEDULE.grace / 2
AFTER_GRACE = SCHEDULE.retires_at(EPOCH)


def _packet(mesh: Mesh, indices: list[int], *, epoch: int = EPOCH) -> bytes:
    out = build_packet(mesh.path(indices, epoch=epoch), b"hi", epoch=epoch, random_bytes=os.urandom)
    return out.packet


def test_a_replayed_packet_is_dropped() -> None:
    mesh = Mesh(2)
    packet = _packet(mesh, [0, 1])
    relay = mesh.nodes[0].relay
    assert isinstance(relay.process(packet, NOW), Forward)
    assert relay.process(packet, NOW) == Drop(DropReason.REPLAYED)


def test_a_replay_is_dropped_by_a_restarted_relay_from_the_dumped_cache() -> None:
    mesh = Mesh(2)
    packet = _packet(mesh, [0, 1])
    node = mesh.nodes[0]
    assert isinstance(node.relay.process(packet, NOW), Forward)

    restarted = Relay(node.ring, ReplayCache.load(node.relay.replay.dump()))
    assert restarted.process(packet, NOW) == Drop(DropReason.REPLAYED)


def test_a_replay_is_dropped_by_a_restarted_relay_from_the_tags_its_actions_named() -> None:
    mesh = Mesh(2)
    node = mesh.nodes[1]
    packets = [_packet(mesh, [1]), _packet(mesh, [1, 0])]
    stored: list[tuple[int, bytes]] = []  # the rows a driver writes before acting
    for packet in packets:
        action = node.relay.process(packet, NOW)
        assert isinstance(action, Deliver | Forward)
        stored.append((action.epoch, action.replay_tag))

    cache = ReplayCache()
    for epoch, tag in stored:
        cache.restore(epoch, [tag])
    restarted = Relay(node.ring, cache)
    for packet in packets:
        assert restarted.process(packet, NOW) == Drop(DropReason.REPLAYED)


def test_a_replay_is_dropped_across_a_key_rotation_until_the_old_key_retires() -> None:
    mesh = Mesh(2, epochs=(EPOCH, EPOCH + 1))
    node = mesh.nodes[0]
    packet = _packet(mesh, [0, 1])
    assert isinstance(node.relay.process(packet, NOW), Forward)

    # the next epoch has begun; the old key is in its grace period, after a restart too
    assert node.relay.retire(NEXT_EPOCH_IN_GRACE) == []
    assert node.relay.process(packet, NEXT_EPOCH_IN_GRACE) == Drop(DropReason.REPLAYED)
    restarted = Relay(node.ring, ReplayCache.load(node.relay.replay.dump()))
    assert restarted.process(packet, NEXT_EPOCH_IN_GRACE) == Drop(DropReason.REPLAYED)
    late_but_new = _packet(mesh, [0, 1])
    assert isinstance(restarted.process(late_but_new, NEXT_EPOCH_IN_GRACE), Forward)
    next_epoch = _packet(mesh, [0, 1], epoch=EPOCH + 1)
    assert isinstance(restarted.process(next_epoch, NEXT_EPOCH_IN_GRACE), Forward)

    # grace over: key and tags are gone, and the packet is dropped for its epoch
    assert restarted.retire(AFTER_GRACE) == [EPOCH]
    assert restarted.replay.epochs == [EPOCH + 1]
    assert restarted.keys.epochs == [EPOCH + 1]
    assert restarted.process(packet, AFTER_GRACE).reason is DropReason.UNKNOWN_EPOCH  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("epoch", "now"),
    [
        (EPOCH, AFTER_GRACE),  # retired
        (EPOCH, SCHEDULE.starts_at(EPOCH) - SCHEDULE.grace - 1),  # not yet valid
        (EPOCH + 7, NOW),  # its key is installed ahead, but its window is not open
    ],
)
def test_a_packet_outside_its_epochs_window_is_dropped(epoch: int, now: float) -> None:
    mesh = Mesh(1, epochs=(EPOCH, EPOCH + 7))
    packet = _packet(mesh, [0], epoch=epoch)
    action = mesh.nodes[0].relay.process(packet, now)
    assert isinstance(action, Drop)
    assert action.reason is DropReason.UNKNOWN_EPOCH


def test_a_full_replay_cache_drops_new_packets_rather_than_forget_tags() -> None:
    mesh = Mesh(1)
    node = mesh.nodes[0]
    relay = Relay(node.ring, ReplayCache(max_tags_per_epoch=2))
    assert isinstance(relay.process(_packet(mesh, [0]), NOW), Deliver)
    assert isinstance(relay.process(_packet(mesh, [0]), NOW), Deliver)
    assert relay.process(_packet(mesh, [0]), NOW).reason is DropReason.REPLAY_CACHE_FULL  # type: ignore[union-attr]


def test_every_drop_reason_is_counted_under_a_node_reject_reason() -> None:
    assert {reason.counted_as for reason in DropReason} <= set(RejectReason)


def _windows(data: bytes, width: int = 16) -> set[bytes]:
    return {data[i : i + width] for i in range(len(data) - width + 1)}


@settings(max_examples=40, deadline=None)
@given(length=st.integers(2, MAX_HOPS), data=st.data())
def test_a_relay_learns_only_its_next_hop_and_cannot_link_what_goes_in_and_out(
    length: int, data: st.DataObject
) -> None:
    """Play each relay on a path: the sender (node 6) and the destination are not in
    anything a relay handles except, for the last relay, the destination as its next hop;
    its decrypted routing information names only the next hop; the body is never in clear;
    and the packet it forwards shares no 16 bytes with the one it received (alpha included)."""
    mesh = Mesh(MAX_HOPS + 2)
    order = data.draw(st.permutations(range(MAX_HOPS + 1)))[:length]
    sender = mesh.nodes[MAX_HOPS + 1]
    body = b"what the sender asks " * 40
    out = build_packet(mesh.path(order), body, epoch=EPOCH, random_bytes=os.urandom)
    trace = mesh.route(out)
    assert isinstance(trace.action, Deliver)

    everyone = {node.peer.raw for node in mesh.nodes}
    relays = zip(trace.seen[:-1], trace.forwards, strict=True)
    for position, ((peer, received), forward) in enumerate(relays):
        node = mesh.by_peer[peer]
        keys = authenticate(node.ring.secret_for(EPOCH, NOW) or b"", received)
        assert not isinstance(keys, Drop)
        beta = received[HEADER_SIZE - ROUTING_SIZE : HEADER_SIZE]
        routing = stream_xor(keys.header_stream, beta + bytes(SLOT_SIZE))
        seen_by_relay = received + routing + forward.packet

        next_hop = mesh.nodes[order[position + 1]].peer.raw
        assert routing[1 : 1 + PEER_ID_SIZE] == next_hop
        named = {p for p in everyone if p in seen_by_relay}
        assert named == {next_hop}, f"relay at position {position} sees more than its next hop"
        assert sender.peer.raw not in seen_by_relay
        assert b"what the sender asks" not in seen_by_relay
        assert received[5:37] != forward.packet[5:37]  # alpha
        assert not (_windows(received) & _windows(forward.packet))
        assert len(received) == len(forward.packet) == PACKET_SIZE


@pytest.mark.parametrize("length", range(1, MAX_HOPS + 1))
def test_the_destination_cannot_read_the_path_length_from_its_routing_information(
    length: int,
) -> None:
    """Unused slots are random, not zeros: what follows the destination's slot looks the same
    for every path length (no run of zero bytes marks where the path ended)."""
    mesh = Mesh(MAX_HOPS)
    out = build_packet(mesh.path(list(range(length))), b"", epoch=EPOCH, random_bytes=os.urandom)
    trace = mesh.route(out)
    peer, received = trace.seen[-1]
    node = mesh.by_peer[peer]
    keys = authenticate(node.ring.secret_for(EPOCH, NOW) or b"", received)
    assert not isinstance(keys, Drop)
    beta = received[HEADER_SIZE - ROUTING_SIZE : HEADER_SIZE]
    rest = stream_xor(keys.header_stream, beta + bytes(SLOT_SIZE))[SLOT_SIZE:]
    assert bytes(8) not in rest
