"""Messages larger than one packet: split, carried, reassembled once, within bounds."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.errors import LocalProtocolError
from meshfed.onion import (
    BODY_SIZE,
    Deliver,
    Drop,
    DropReason,
    Reassembled,
    Reassembler,
    build_packet,
    fragment,
)
from meshfed.onion.fragments import FRAGMENT_CAPACITY, MAX_FRAGMENTS, MAX_MESSAGE_SIZE

from .mesh import EPOCH, Mesh

MID = b"m" * 16


@settings(max_examples=60, deadline=None)
@given(
    message=st.binary(max_size=4 * FRAGMENT_CAPACITY + 7),
    seed=st.integers(0, 2**32),
    duplicates=st.integers(0, 5),
)
def test_fragments_in_any_order_with_duplicates_give_the_message_once(
    message: bytes, seed: int, duplicates: int
) -> None:
    bodies = fragment(message, MID)
    assert len(bodies) == max(1, -(-len(message) // FRAGMENT_CAPACITY))
    assert {len(b) for b in bodies} == {BODY_SIZE}
    rng = random.Random(seed)
    arrivals = bodies + [rng.choice(bodies) for _ in range(duplicates)]
    rng.shuffle(arrivals)
    arrivals += bodies  # a retry of the whole message after it completed

    reassembler = Reassembler()
    results = [reassembler.add(body, now=10.0) for body in arrivals]
    done = [r for r in results if r is not None]
    assert done == [Reassembled(MID, message)]
    assert (reassembler.pending, reassembler.held_bytes) == (0, 0)


def test_a_message_travels_as_packets_and_is_reassembled_at_the_destination() -> None:
    mesh = Mesh(4)
    message = os.urandom(3 * FRAGMENT_CAPACITY + 100)
    reassembler = Reassembler()
    results = []
    for body in fragment(message, MID):
        out = build_packet(mesh.path([0, 1, 2, 3]), body, epoch=EPOCH, random_bytes=os.urandom)
        trace = mesh.route(out)
        assert isinstance(trace.action, Deliver)
        results.append(reassembler.add(trace.action.body, now=0.0))
    assert results[-1] == Reassembled(MID, message)


def test_an_incomplete_message_is_dropped_after_the_timeout() -> None:
    reassembler = Reassembler(timeout=5.0)
    first, second = fragment(bytes(FRAGMENT_CAPACITY + 1), MID)
    assert reassembler.add(first, now=0.0) is None
    assert reassembler.held_bytes == FRAGMENT_CAPACITY
    assert reassembler.expire(4.9) == 0
    assert reassembler.expire(5.0) == 1
    assert (reassembler.pending, reassembler.held_bytes) == (0, 0)
    assert reassembler.add(second, now=5.0) is None  # a new, incomplete message now


def test_a_completed_message_id_is_forgotten_after_the_timeout() -> None:
    reassembler = Reassembler(timeout=5.0)
    (body,) = fragment(b"once", MID)
    assert reassembler.add(body, now=0.0) == Reassembled(MID, b"once")
    assert reassembler.add(body, now=4.0) is None
    assert reassembler.add(body, now=10.0) == Reassembled(MID, b"once")


def test_the_number_of_incomplete_messages_is_bounded() -> None:
    reassembler = Reassembler(max_messages=2)
    for i in range(2):
        first = fragment(bytes(FRAGMENT_CAPACITY + 1), bytes([i]) * 16)[0]
        assert reassembler.add(first, 0.0) is None
    third = fragment(bytes(FRAGMENT_CAPACITY + 1), b"3" * 16)[0]
    dropped = reassembler.add(third, 0.0)
    assert isinstance(dropped, Drop)
    assert dropped.reason is DropReason.REASSEMBLY_FULL


def test_the_bytes_held_are_bounded() -> None:
    reassembler = Reassembler(max_bytes=FRAGMENT_CAPACITY + 10)
    bodies = fragment(bytes(3 * FRAGMENT_CAPACITY), MID)
    assert reassembler.add(bodies[0], 0.0) is None
    dropped = reassembler.add(bodies[1], 0.0)
    assert isinstance(dropped, Drop)
    assert dropped.reason is DropReason.REASSEMBLY_FULL
    assert reassembler.held_bytes == FRAGMENT_CAPACITY


def test_a_fragment_that_contradicts_its_message_is_dropped() -> None:
    reassembler = Reassembler()
    assert reassembler.add(fragment(bytes(FRAGMENT_CAPACITY + 1), MID)[0], 0.0) is None
    liar = fragment(bytes(3 * FRAGMENT_CAPACITY), MID)[2]
    dropped = reassembler.add(liar, 0.0)
    assert isinstance(dropped, Drop)
    assert dropped.reason is DropReason.FRAGMENT_CONFLICT


def _body(index: int, count: int, length: int, tail: bytes = b"") -> bytes:
    head = MID + index.to_bytes(2, "big") + count.to_bytes(2, "big") + length.to_bytes(2, "big")
    body = head + bytes(length) + tail
    return (body + bytes(BODY_SIZE))[:BODY_SIZE]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_body(0, 0, 1), DropReason.BAD_FRAGMENT),
        (_body(2, 2, 1), DropReason.BAD_FRAGMENT),
        (_body(0, MAX_FRAGMENTS + 1, 1), DropReason.BAD_FRAGMENT),
        (_body(0, 1, FRAGMENT_CAPACITY + 1), DropReason.BAD_FRAGMENT),
        (_body(0, 1, 3, tail=b"\x01"), DropReason.BAD_FRAGMENT),
        (bytes(BODY_SIZE - 1), DropReason.WRONG_SIZE),
    ],
)
def test_a_malformed_fragment_is_dropped_with_its_reason(body: bytes, reason: DropReason) -> None:
    dropped = Reassembler().add(body, 0.0)
    assert isinstance(dropped, Drop)
    assert dropped.reason is reason


@settings(max_examples=200, deadline=None)
@given(body=st.binary(min_size=BODY_SIZE, max_size=BODY_SIZE))
def test_any_body_yields_a_drop_nothing_or_a_message_never_an_exception(body: bytes) -> None:
    result = Reassembler().add(body, 0.0)
    assert result is None or isinstance(result, Drop | Reassembled)


@pytest.mark.parametrize(
    ("message", "message_id"), [(bytes(MAX_MESSAGE_SIZE + 1), MID), (b"", b"short")]
)
def test_fragmenting_refuses_too_long_a_message_or_a_bad_id(
    message: bytes, message_id: bytes
) -> None:
    with pytest.raises(LocalProtocolError):
        fragment(message, message_id)
