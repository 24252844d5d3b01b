"""The market's persisted leases, the seller's outbox of debit notes, and clearing history.

Theory of operation. What the lease state machines (:mod:`.lease`) must find again after a
restart lives here, in the node's store, one sealed row each (an HMAC under the store's key,
:meth:`~meshfed.store.Store.seal`; a row that does not match raises
:class:`~meshfed.errors.CorruptRecord` and is never loaded):

- a *lease* per (job, role, counterpart): the terms (price per unit, units), where it stands,
  and the signed award it rests on, raw. A lease that ended (settled, cancelled, failed,
  forfeited) never changes again.
- the seller's *outbox*: each debit note (the signed envelope, raw) that waits for the buyer's
  acknowledgement, so that a buyer that was away gets them when it is back (SPEC: "the buyer
  need not stay online"). At most ``max_pending`` notes wait per buyer: a seller whose buyer
  left that many units unacknowledged is told to stop working for it.
- *clearing history*: the per-unit prices auctions cleared at, by kind and tier, newest kept
  (``clearing_history`` per kind and tier), for the buyer's price estimate (:mod:`.pricing`).
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptRecord, LocalProtocolError, StoreError
from ..identity import PeerId
from ..store import Store
from . import _checks as check
from .terms import Tier, WorkKind

__all__ = [
    "ClearingRecord",
    "LeaseBook",
    "LeaseRecord",
    "LeaseRole",
    "LeaseState",
    "Outbox",
    "PendingNote",
]

_LEASES = "market_leases"
_OUTBOX = "market_outbox"
_CLEARINGS = "market_clearings"
_LEASE_COLUMNS = "job, role, counterpart, price, units, state, award, created, updated, mac"


class LeaseRole(enum.StrEnum):
    """Which side of a lease this node is on."""

    BUYER = "buyer"
    SELLER = "seller"


class LeaseState(enum.StrEnum):
    """Where a lease stands."""

    #: the award is out (buyer) or in hand (seller), not accepted yet
    AWARDED = "awarded"
    #: accepted: units are done and debited
    ACTIVE = "active"
    #: every unit settled, the receipt given (final)
    SETTLED = "settled"
    #: declined, or cancelled before its end (final)
    CANCELLED = "cancelled"
    #: the seller failed or was replaced (final)
    FAILED = "failed"
    #: the buyer never came back within the lease's terms (final)
    FORFEITED = "forfeited"

    @property
    def final(self) -> bool:
        """True if a lease in this state never changes again."""
        return self not in (LeaseState.AWARDED, LeaseState.ACTIVE)


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """One lease as the book holds it.

    Attributes:
        job: the job.
        role: this node's side.
        counterpart: the buyer (role seller) or the seller (role buyer).
        price: micro-credits per unit.
        units: the units leased.
        state: where it stands.
        award: the signed award envelope, raw.
        created, updated: when it was recorded and last changed (seconds since the epoch).
    """

    job: str
    role: LeaseRole
    counterpart: PeerId
    price: int
    units: int
    state: LeaseState
    award: bytes
    created: float
    updated: float

    @property
    def total(self) -> int:
        """The most the lease pays: ``price * units``."""
        return self.price * self.units


@dataclass(frozen=True, slots=True)
class PendingNote:
    """A debit note in the seller's outbox, waiting for the buyer's acknowledgement."""

    job: str
    counterpart: PeerId
    unit: int
    message: bytes
    created: float


@dataclass(frozen=True, slots=True)
class ClearingRecord:
    """The per-unit price an auction of ``kind`` in ``tier`` cleared at, at time ``at``."""

    kind: WorkKind
    tier: Tier
    price: int
    at: float


class LeaseBook:
    """The node's leases and clearing history, with its outbox (:attr:`outbox`).

    Args:
        store: the node's store.
        clock: the time written into rows.
        max_pending: the most debit notes that wait per buyer.
        clearing_history: the clearing prices kept per kind and tier (the newest).
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        max_pending: int = 4096,
        clearing_history: int = 256,
    ) -> None:
        if max_pending < 1 or clearing_history < 1:
            raise ValueError("max_pending and clearing_history are at least 1")
        self._store = store
        self._clock = clock
        self._clearing_history = clearing_history
        self.outbox = Outbox(store, clock=clock, max_pending=max_pending)

    # -- leases -------------------------------------------------------------------------------

    def put_lease(
        self,
        job: str,
        role: LeaseRole,
        counterpart: PeerId,
        *,
        price: int,
        units: int,
        award: bytes,
        state: LeaseState = LeaseState.AWARDED,
    ) -> LeaseRecord:
        """Record a lease unless one for (job, role, counterpart) is known; returns the stored
        lease (whose terms may differ from these: the caller checks).

        Raises:
            ValueError: a price not in (0, MAX_AMOUNT], units not in [1, MAX_UNIT], a
                malformed job or an award over MAX_ENVELOPE bytes.
            CorruptRecord: the stored lease does not match its HMAC.
        """
        check.job_id(job)
        check.amount(price, "a price")
        check.unit(units, least=1)
        check.envelope(award)
        now = self._clock()
        fields = (job, role.value, counterpart.raw, price, units, state.value, award, now, now)
        with self._store.transaction() as connection:
            connection.execute(
                f"INSERT INTO {_LEASES} ({_LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (*fields, self._store.seal(_LEASES, *fields)),
            )
            stored = self._lease(connection, job, role, counterpart)
        assert stored is not None  # just written, and leases are never deleted
        return stored

    def set_lease_state(
        self, job: str, role: LeaseRole, counterpart: PeerId, state: LeaseState
    ) -> LeaseRecord:
        """Move a lease to ``state`` (the same state again: nothing changes).

        Raises:
            LocalProtocolError: no such lease, or it ended in another state.
            CorruptRecord: the stored lease does not match its HMAC.
        """
        with self._store.transaction() as connection:
            lease = self._lease(connection, job, role, counterpart)
            if lease is None:
                raise LocalProtocolError(
                    f"no {role} lease of job {job!r} with {counterpart.short()}"
                )
            if lease.state is state:
                return lease
            if lease.state.final:
                raise LocalProtocolError(
                    f"the {role} lease of job {job!r} with {counterpart.short()} ended "
                    f"{lease.state}: it cannot become {state}"
                )
            now = self._clock()
            key = (job, role.value, counterpart.raw)
            terms = (lease.price, lease.units, state.value, lease.award, lease.created, now)
            connection.execute(
                f"UPDATE {_LEASES} SET state = ?, updated = ?, mac = ? "
                "WHERE job = ? AND role = ? AND counterpart = ?",
                (state.value, now, self._store.seal(_LEASES, *key, *terms), *key),
            )
            changed = self._lease(connection, job, role, counterpart)
        assert changed is not None
        return changed

    def lease(self, job: str, role: LeaseRole, counterpart: PeerId) -> LeaseRecord | None:
        """The lease of (job, role, counterpart), or None.

        Raises:
            CorruptRecord: it does not match its HMAC.
        """
        with self._store.snapshot() as connection:
            return self._lease(connection, job, role, counterpart)

    def leases(
        self,
        *,
        job: str | None = None,
        role: LeaseRole | None = None,
        states: Iterable[LeaseState] | None = None,
    ) -> list[LeaseRecord]:
        """The leases that match every filter given, oldest first.

        Raises:
            CorruptRecord: one does not match its HMAC.
        """
        wanted = None if states is None else {LeaseState(s) for s in states}
        with self._store.snapshot() as connection:
            rows = connection.execute(
                f"SELECT {_LEASE_COLUMNS} FROM {_LEASES} WHERE (?1 IS NULL OR job = ?1) "
                "AND (?2 IS NULL OR role = ?2) ORDER BY created, job, role, counterpart",
                (job, None if role is None else role.value),
            ).fetchall()
        leases = [self._checked_lease(row) for row in rows]
        return [lease for lease in leases if wanted is None or lease.state in wanted]

    def _lease(
        self, connection: sqlite3.Connection, job: str, role: LeaseRole, counterpart: PeerId
    ) -> LeaseRecord | None:
        row = connection.execute(
            f"SELECT {_LEASE_COLUMNS} FROM {_LEASES} WHERE job = ? AND role = ? "
            "AND counterpart = ?",
            (job, role.value, counterpart.raw),
        ).fetchone()
        return None if row is None else self._checked_lease(row)

    def _checked_lease(self, row: tuple[Any, ...]) -> LeaseRecord:
        *fields, mac = row
        job, role, counterpart, price, units, state, award, created, updated = fields
        where = f"{role} lease of job {job!r}"
        self._store.check_seal(mac, _LEASES, *fields, what=where)
        try:
            peer = PeerId.of(counterpart)
            return LeaseRecord(
                job, LeaseRole(role), peer, price, units, LeaseState(state), award, created, updated
            )
        except (ValueError, TypeError) as exc:  # sealed by us: only a bug gets here
            raise CorruptRecord(f"{where} cannot be decoded: {exc}") from None

    # -- clearing history ---------------------------------------------------------------------

    def record_clearing(self, kind: WorkKind, tier: Tier, price_per_unit: int, at: float) -> None:
        """Remember that an auction of ``kind`` in ``tier`` cleared at ``price_per_unit`` at
        time ``at`` (keeping the newest ``clearing_history`` of that kind and tier).

        Raises:
            ValueError: a price not in (0, MAX_AMOUNT], or ``at`` not a finite time.
        """
        check.amount(price_per_unit, "a price")
        fields = (WorkKind(kind).value, Tier(tier).value, price_per_unit, check.instant(at))
        with self._store.transaction() as connection:
            connection.execute(
                f"INSERT INTO {_CLEARINGS} (kind, tier, price, at, mac) VALUES (?, ?, ?, ?, ?)",
                (*fields, self._store.seal(_CLEARINGS, *fields)),
            )
            connection.execute(
                f"DELETE FROM {_CLEARINGS} WHERE kind = ?1 AND tier = ?2 AND seq NOT IN "
                f"(SELECT seq FROM {_CLEARINGS} WHERE kind = ?1 AND tier = ?2 "
                "ORDER BY at DESC, seq DESC LIMIT ?3)",
                (*fields[:2], self._clearing_history),
            )

    def recent_clearing(self, kind: WorkKind, tier: Tier, limit: int = 32) -> list[ClearingRecord]:
        """The newest ``limit`` clearing prices of ``kind`` in ``tier``, newest first.

        Raises:
            CorruptRecord: a row does not match its HMAC.
        """
        with self._store.snapshot() as connection:
            rows = connection.execute(
                f"SELECT kind, tier, price, at, mac FROM {_CLEARINGS} WHERE kind = ? AND tier = ? "
                "ORDER BY at DESC, seq DESC LIMIT ?",
                (WorkKind(kind).value, Tier(tier).value, max(limit, 0)),
            ).fetchall()
        records = []
        for *fields, mac in rows:
            self._store.check_seal(mac, _CLEARINGS, *fields, what=f"clearing {fields}")
            records.append(ClearingRecord(WorkKind(fields[0]), Tier(fields[1]), *fields[2:]))
        return records


class Outbox:
    """The seller's debit notes that wait for their buyer's acknowledgement (survives
    restarts). One note per (job, buyer, unit); at most ``max_pending`` per buyer.

    Args:
        store: the node's store.
        clock: the time written into rows.
        max_pending: the most notes that wait per buyer.
    """

    def __init__(
        self, store: Store, *, clock: Callable[[], float] = time.time, max_pending: int = 4096
    ) -> None:
        self._store = store
        self._clock = clock
        self.max_pending = max_pending

    def put(self, job: str, counterpart: PeerId, unit: int, message: bytes) -> bool:
        """Keep ``message`` (the signed debit note for ``unit``, raw) until
        :meth:`acknowledge`.

        Returns:
            True if kept now, False if a note for this (job, counterpart, unit) waits already
            (the first one stays).

        Raises:
            StoreError: ``max_pending`` notes wait for ``counterpart`` already (stop working
                for it until it acknowledges some).
            ValueError: a malformed job or unit, or a message over MAX_ENVELOPE bytes.
        """
        check.job_id(job)
        check.unit(unit)
        check.envelope(message)
        fields = (job, counterpart.raw, unit, message, self._clock())
        with self._store.transaction() as connection:
            known = connection.execute(
                f"SELECT 1 FROM {_OUTBOX} WHERE job = ? AND counterpart = ? AND unit = ?",
                fields[:3],
            ).fetchone()
            if known is not None:
                return False
            (waiting,) = connection.execute(
                f"SELECT COUNT(*) FROM {_OUTBOX} WHERE counterpart = ?", (counterpart.raw,)
            ).fetchone()
            if waiting >= self.max_pending:
                raise StoreError(
                    f"{waiting} debit notes wait for {counterpart.short()} to acknowledge "
                    "them: do no more work for it until it does"
                )
            connection.execute(
                f"INSERT INTO {_OUTBOX} (job, counterpart, unit, message, created, mac) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (*fields, self._store.seal(_OUTBOX, *fields)),
            )
        return True

    def pending(
        self, *, counterpart: PeerId | None = None, job: str | None = None, limit: int = 1024
    ) -> list[PendingNote]:
        """Up to ``limit`` waiting notes (for ``counterpart`` and/or ``job`` if given), in the
        order they were put.

        Raises:
            CorruptRecord: a row does not match its HMAC.
        """
        with self._store.snapshot() as connection:
            rows = connection.execute(
                f"SELECT job, counterpart, unit, message, created, mac FROM {_OUTBOX} "
                "WHERE (?1 IS NULL OR counterpart = ?1) AND (?2 IS NULL OR job = ?2) "
                "ORDER BY seq LIMIT ?3",
                (None if counterpart is None else counterpart.raw, job, max(limit, 0)),
            ).fetchall()
        notes = []
        for *fields, mac in rows:
            where = f"debit note of job {fields[0]!r} unit {fields[2]}"
            self._store.check_seal(mac, _OUTBOX, *fields, what=where)
            job_id, peer, unit, message, created = fields
            notes.append(PendingNote(job_id, PeerId.of(peer), unit, message, created))
        return notes

    def acknowledge(self, job: str, counterpart: PeerId, unit: int) -> bool:
        """Drop the note for (job, counterpart, unit): its acknowledgement arrived (and the
        ledger has earned it). Returns True if it was waiting."""
        with self._store.transaction() as connection:
            deleted = connection.execute(
                f"DELETE FROM {_OUTBOX} WHERE job = ? AND counterpart = ? AND unit = ?",
                (job, counterpart.raw, unit),
            ).rowcount
        return bool(deleted)
