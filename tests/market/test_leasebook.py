"""The lease book: leases, the seller's outbox and clearing history survive restarts, sealed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from meshfed.errors import CorruptRecord, LocalProtocolError, StoreError
from meshfed.identity import PeerId
from meshfed.market.leasebook import (
    ClearingRecord,
    LeaseBook,
    LeaseRole,
    LeaseState,
)
from meshfed.market.terms import MAX_AMOUNT, Tier, WorkKind
from meshfed.store import Store

BUYER, SELLER, OTHER = (PeerId.from_public_key(bytes([i]) * 32) for i in range(3))
KEY = bytes(range(32))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_lease_is_found_again_after_a_restart_with_its_award(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    with Store.open(path, key=KEY) as store:
        book = LeaseBook(store, clock=Clock())
        lease = book.put_lease("job", LeaseRole.SELLER, BUYER, price=7, units=10, award=b"sig")
        assert (lease.state, lease.total, lease.created) == (LeaseState.AWARDED, 70, 101.0)
        again = book.put_lease("job", LeaseRole.SELLER, BUYER, price=9, units=1, award=b"x")
        assert again == lease  # the first terms stay; the caller compares
        book.put_lease("job", LeaseRole.BUYER, SELLER, price=7, units=10, award=b"sig")
        book.set_lease_state("job", LeaseRole.SELLER, BUYER, LeaseState.ACTIVE)
    with Store.open(path, key=KEY) as store:
        book = LeaseBook(store)
        found = book.lease("job", LeaseRole.SELLER, BUYER)
        assert found is not None
        assert (found.state, found.price, found.units, found.award) == (
            LeaseState.ACTIVE,
            7,
            10,
            b"sig",
        )
        assert found.updated > found.created
        assert book.lease("job", LeaseRole.SELLER, SELLER) is None
        assert [le.role for le in book.leases(job="job")] == [LeaseRole.SELLER, LeaseRole.BUYER]
        assert [le.counterpart for le in book.leases(role=LeaseRole.BUYER)] == [SELLER]
        assert [le.state for le in book.leases(states=[LeaseState.ACTIVE])] == [LeaseState.ACTIVE]
        assert book.leases(job="other") == []


def test_a_lease_that_ended_never_changes_again(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        book = LeaseBook(store)
        book.put_lease("job", LeaseRole.BUYER, SELLER, price=1, units=1, award=b"award")
        book.set_lease_state("job", LeaseRole.BUYER, SELLER, LeaseState.SETTLED)
        book.set_lease_state("job", LeaseRole.BUYER, SELLER, LeaseState.SETTLED)  # a repeat
        with pytest.raises(LocalProtocolError, match="ended settled: it cannot become active"):
            book.set_lease_state("job", LeaseRole.BUYER, SELLER, LeaseState.ACTIVE)
        with pytest.raises(LocalProtocolError, match="no buyer lease of job 'job'"):
            book.set_lease_state("job", LeaseRole.BUYER, OTHER, LeaseState.ACTIVE)
        lease = book.lease("job", LeaseRole.BUYER, SELLER)
        assert lease is not None and lease.state is LeaseState.SETTLED


@pytest.mark.parametrize(
    "terms",
    [
        {"price": 0, "units": 1, "award": b"award"},
        {"price": MAX_AMOUNT + 1, "units": 1, "award": b"award"},
        {"price": 1, "units": 0, "award": b"award"},
        {"price": 1, "units": 1, "award": b"x" * (64 * 1024 + 1)},
        {"price": 1, "units": 1, "award": b""},
    ],
)
def test_malformed_terms_are_refused(tmp_path: Path, terms: dict[str, object]) -> None:
    with Store.open(tmp_path / "s") as store:
        book = LeaseBook(store)
        with pytest.raises(ValueError):
            book.put_lease("job", LeaseRole.BUYER, SELLER, **terms)  # type: ignore[arg-type]
        assert book.leases() == []


def test_debit_notes_wait_in_the_outbox_across_restarts_until_acknowledged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.sqlite3"
    with Store.open(path, key=KEY) as store:
        outbox = LeaseBook(store).outbox
        for unit in range(3):
            assert outbox.put("job", BUYER, unit, f"note {unit}".encode())
        assert not outbox.put("job", BUYER, 1, b"a second note for unit 1")
        assert outbox.put("other", OTHER, 0, b"note for another buyer")
        assert outbox.acknowledge("job", BUYER, 0)
        assert not outbox.acknowledge("job", BUYER, 0)
    with Store.open(path, key=KEY) as store:  # the buyer comes back after a restart
        outbox = LeaseBook(store).outbox
        waiting = outbox.pending(counterpart=BUYER)
        assert [(n.unit, n.message) for n in waiting] == [(1, b"note 1"), (2, b"note 2")]
        assert [n.counterpart for n in outbox.pending(job="other")] == [OTHER]
        assert len(outbox.pending()) == 3 and len(outbox.pending(limit=1)) == 1
        assert outbox.pending(counterpart=OTHER, job="job") == []


def test_a_buyer_that_leaves_too_much_unacknowledged_stops_the_work(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        outbox = LeaseBook(store, max_pending=3).outbox
        for unit in range(3):
            outbox.put("job", BUYER, unit, b"note")
        with pytest.raises(StoreError, match=r"3 debit notes wait for .*: do no more work"):
            outbox.put("job", BUYER, 3, b"note")
        assert outbox.put("job", OTHER, 0, b"note")  # another buyer is not held up
        outbox.acknowledge("job", BUYER, 0)
        assert outbox.put("job", BUYER, 3, b"note")


def test_clearing_history_keeps_the_newest_prices_per_kind_and_tier(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        book = LeaseBook(store, clearing_history=3)
        for at, price in enumerate((10, 11, 12, 13, 14)):
            book.record_clearing(WorkKind.TRAINING, Tier.SMALL, price, at=float(at))
        book.record_clearing(WorkKind.TRAINING, Tier.SMALL, 99, at=-1.0)  # reported late
        book.record_clearing(WorkKind.INFERENCE, Tier.SMALL, 5, at=2.0)
        recent = book.recent_clearing(WorkKind.TRAINING, Tier.SMALL, limit=10)
        assert recent == [
            ClearingRecord(WorkKind.TRAINING, Tier.SMALL, price, float(at))
            for at, price in ((4, 14), (3, 13), (2, 12))
        ]
        assert [r.price for r in book.recent_clearing(WorkKind.TRAINING, Tier.SMALL, 1)] == [14]
        assert book.recent_clearing(WorkKind.TRAINING, Tier.LARGE, 10) == []
        with pytest.raises(ValueError):
            book.record_clearing(WorkKind.TRAINING, Tier.SMALL, 0, at=0.0)
        with pytest.raises(ValueError, match="finite"):
            book.record_clearing(WorkKind.TRAINING, Tier.SMALL, 1, at=float("inf"))


def test_tampered_leases_notes_and_prices_are_detected_and_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    with Store.open(path, key=KEY) as store:
        book = LeaseBook(store)
        book.put_lease("job", LeaseRole.BUYER, SELLER, price=5, units=4, award=b"award")
        book.outbox.put("job", BUYER, 0, b"note")
        book.record_clearing(WorkKind.TRAINING, Tier.SMALL, 5, at=1.0)
    connection = sqlite3.connect(path)
    connection.execute("UPDATE market_leases SET price = 500")  # a richer lease
    connection.execute("UPDATE market_outbox SET message = x'00'")
    connection.execute("UPDATE market_clearings SET price = 1")  # a cheaper market
    connection.commit()
    connection.close()
    with Store.open(path, key=KEY) as store:
        book = LeaseBook(store)
        with pytest.raises(CorruptRecord, match="buyer lease of job 'job' does not match"):
            book.lease("job", LeaseRole.BUYER, SELLER)
        with pytest.raises(CorruptRecord, match="lease"):
            book.set_lease_state("job", LeaseRole.BUYER, SELLER, LeaseState.ACTIVE)
        with pytest.raises(CorruptRecord, match="debit note of job 'job' unit 0"):
            book.outbox.pending()
        with pytest.raises(CorruptRecord, match="clearing"):
            book.recent_clearing(WorkKind.TRAINING, Tier.SMALL)
