"""The store of items for runs not started yet: bounded in age, in all and per sender."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.errors import RemoteProtocolError
from meshfed.identity import Identity
from meshfed.secagg.messages import RollCall
from meshfed.secagg.pending import PendingStore
from meshfed.secagg.protocol import SliceKind
from meshfed.stats import RejectReason

PEERS = [Identity.generate().peer_id for _ in range(6)]


def message(n: int) -> RollCall:
    return RollCall(context=n.to_bytes(32, "big"), members=[])


def rejected(store: PendingStore, *args: object) -> RejectReason:
    with pytest.raises(RemoteProtocolError) as info:
        store.keep(*args)  # type: ignore[arg-type]
    return info.value.reason


def test_a_full_store_makes_room_for_a_sender_holding_less_never_for_the_heaviest() -> None:
    store = PendingStore(ttl_s=30, max_items=4, max_bytes=1 << 20, per_sender=8)
    stranger, honest = PEERS[:2]
    for n in range(4):
        store.keep(0.0, bytes(32), stranger, message(n))
    assert rejected(store, 0.0, bytes(32), stranger, message(9)) is RejectReason.RATE_LIMITED
    store.keep(1.0, b"\1" * 32, honest, message(10))  # the stranger's oldest goes
    assert len(store) == 4
    assert [sender for sender, _ in store.take(b"\1" * 32)] == [honest]
    assert len(store.take(bytes(32))) == 3


def test_each_sender_has_its_own_bound_and_items_age_out() -> None:
    store = PendingStore(ttl_s=10, max_items=100, max_bytes=1 << 20, per_sender=2)
    store.keep(0.0, bytes(32), PEERS[0], message(1))
    store.keep(5.0, bytes(32), PEERS[0], message(2))
    assert rejected(store, 6.0, bytes(32), PEERS[0], message(3)) is RejectReason.RATE_LIMITED
    store.keep(11.0, bytes(32), PEERS[0], message(3))  # the first has aged out
    assert [m for _, m in store.take(bytes(32))] == [message(2), message(3)]


def test_bytes_are_shared_fairly_too() -> None:
    store = PendingStore(ttl_s=30, max_items=100, max_bytes=1000, per_sender=100)
    big = (SliceKind.INPUT, np.zeros(200, np.uint32))  # 800 bytes
    store.keep(0.0, bytes(32), PEERS[0], big)
    small = (SliceKind.INPUT, np.zeros(100, np.uint32))  # 400 bytes: the big one goes
    store.keep(1.0, bytes(32), PEERS[1], small)
    assert [sender for sender, _ in store.take(bytes(32))] == [PEERS[1]]
    huge = (SliceKind.INPUT, np.zeros(300, np.uint32))
    assert rejected(store, 2.0, bytes(32), PEERS[2], huge) is RejectReason.RATE_LIMITED


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=200))
def test_the_bounds_always_hold_and_a_newcomer_is_never_refused(
    arrivals: list[tuple[int, int]],
) -> None:
    store = PendingStore(ttl_s=1000, max_items=10, max_bytes=1 << 20, per_sender=6)
    seen: set[int] = set()
    for time, (who, context) in enumerate(arrivals):
        try:
            store.keep(float(time), bytes([context]) * 32, PEERS[who], message(time))
        except RemoteProtocolError as exc:
            assert exc.reason is RejectReason.RATE_LIMITED
            assert who in seen  # 10 items of 6 senders: someone holds 2 or more
        seen.add(who)
        assert len(store) <= 10
    kept = len(store)
    assert sum(len(store.take(bytes([c]) * 32)) for c in range(4)) == kept
    assert len(store) == 0
