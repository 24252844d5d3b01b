"""The audit log: security-relevant events, append-only, in the node's store.

What goes in (:class:`AuditKind`): the node's identity created, forged or replayed messages
rejected, privacy budget spent and refused, market awards and settlements, the API's token
created, a token used from an address not seen before, and requests refused for a missing or
wrong token.

Theory of operation. :class:`AuditLog` is the table (``audit_log``, store schema v6). Each row
carries ``seq``, ``at`` (seconds since the epoch), ``kind``, ``fields`` (canonical JSON), ``prev``
(the MAC of the row before; 32 zero bytes for the first) and ``mac`` = :meth:`Store.seal` of all
of them, so a row changed, inserted or removed in the middle breaks the chain (found by
:meth:`AuditLog.verify`), and SQLite triggers refuse ``UPDATE`` and ``DELETE`` outright. Cutting
the tail off, or putting back an older file, is not detected (as for the rest of the store).

:class:`AuditTrail` is what the node notes events into (:meth:`meshfed.node.Node.audit`): notes
are kept in memory and written by its ``run`` task in one transaction every
``flush_every_s`` (one fsync for many events, never on the trio loop). Rejections are
coalesced per peer and reason (a flood of forged messages is one row with its ``count``), and
at most ``max_pending`` notes wait: what comes beyond is counted and written as one
``audit_dropped`` row. A note is durable once flushed: a ``kill -9`` loses at most the notes of
the last ``flush_every_s``. Without a store the trail only logs.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from .errors import CorruptRecord, MeshfedError
from .stats import RejectReason

if TYPE_CHECKING:
    import sqlite3

    from .identity import PeerId
    from .store import Store

__all__ = ["AUDITED_REJECTIONS", "AuditEntry", "AuditKind", "AuditLog", "AuditTrail"]

log = logging.getLogger(__name__)

_TABLE = "audit_log"
_GENESIS = bytes(32)
#: the most rows one query returns
MAX_LIMIT = 1000


class AuditKind(enum.StrEnum):
    """What an audit entry records."""

    #: this node's identity key was created (``peer``)
    IDENTITY_CREATED = "identity_created"
    #: forged or replayed messages from ``peer`` rejected for ``reason`` (``count`` of them)
    REJECTED = "rejected"
    #: privacy budget of ``job`` charged for ``round`` (``events`` charged so far)
    PRIVACY_SPENT = "privacy_spent"
    #: a round of ``job`` ran without this node's data: the charge would exceed the budget
    PRIVACY_REFUSED = "privacy_refused"
    #: a lease of ``job`` awarded (``role``: buyer or seller, ``peer``, ``price``, ``units``)
    AWARD = "award"
    #: a lease of ``job`` settled (``role``, ``peer``, ``reason``)
    SETTLEMENT = "settlement"
    #: the API's bearer token was created (its file, never the token)
    API_TOKEN_CREATED = "api_token_created"
    #: the token was used from an ``address`` not seen before by this node
    API_NEW_CLIENT = "api_new_client"
    #: requests from ``address`` refused: no token (401) or a wrong one (403), ``count`` of them
    API_REFUSED = "api_refused"
    #: ``count`` notes dropped because too many waited to be written
    DROPPED = "audit_dropped"


#: rejections that mean a forged or replayed message (the others are counted, not audited)
AUDITED_REJECTIONS = frozenset(
    {
        RejectReason.BAD_SIGNATURE,
        RejectReason.SENDER_MISMATCH,
        RejectReason.REPLAYED,
        RejectReason.STALE,
        RejectReason.FUTURE,
    }
)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the audit log."""

    seq: int
    at: float
    kind: str
    fields: dict[str, Any]


def _canonical(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


def append_rows(
    store: Store, connection: sqlite3.Connection, rows: Iterable[tuple[float, str, dict[str, Any]]]
) -> None:
    """Append ``(at, kind, fields)`` rows inside the caller's write transaction (the store's
    privacy charge writes its entry with the charge, in one commit)."""
    last = connection.execute(f"SELECT seq, mac FROM {_TABLE} ORDER BY seq DESC LIMIT 1")
    found = last.fetchone()
    seq, prev = (0, _GENESIS) if found is None else (found[0], found[1])
    for at, kind, fields in rows:
        seq += 1
        text = _canonical(fields)
        mac = store.seal(_TABLE, seq, at, kind, text, prev)
        connection.execute(
            f"INSERT INTO {_TABLE} (seq, at, kind, fields, prev, mac) VALUES (?, ?, ?, ?, ?, ?)",
            (seq, at, kind, text, prev, mac),
        )
        prev = mac


class AuditLog:
    """The audit log of one store. Blocking: call from a worker thread on a running node."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def append(self, rows: Iterable[tuple[float, str, dict[str, Any]]]) -> None:
        """Append ``(at, kind, fields)`` rows in one transaction (durable when it returns)."""
        rows = list(rows)
        if rows:
            with self._store.transaction() as connection:
                append_rows(self._store, connection, rows)

    def entries(
        self, *, kind: str | None = None, after: int = 0, limit: int = 100
    ) -> list[AuditEntry]:
        """Entries with ``seq > after`` (of ``kind`` if given), oldest first, at most
        ``limit`` (1..:data:`MAX_LIMIT`).

        Raises:
            CorruptRecord: a row does not match its MAC, or two consecutive rows are not
                chained.
            ValueError: ``limit`` out of range.
        """
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit is 1..{MAX_LIMIT}, not {limit}")
        query = f"SELECT seq, at, kind, fields, prev, mac FROM {_TABLE} WHERE seq > ?"
        parameters: tuple[Any, ...] = (after,)
        if kind is not None:
            query += " AND kind = ?"
            parameters += (kind,)
        with self._store.snapshot() as connection:
            rows = connection.execute(f"{query} ORDER BY seq LIMIT ?", (*parameters, limit))
            found = rows.fetchall()
        return self._checked(found)

    def _checked(self, rows: list[tuple[Any, ...]]) -> list[AuditEntry]:
        entries = []
        before: tuple[int, bytes] | None = None
        for seq, at, kind, text, prev, mac in rows:
            what = f"audit entry {seq}"
            self._store.check_seal(mac, _TABLE, seq, at, kind, text, prev, what=what)
            if before is not None and before[0] + 1 == seq and before[1] != prev:
                raise CorruptRecord(f"{what} is not chained to entry {seq - 1}")
            before = (seq, mac)
            entries.append(AuditEntry(seq=seq, at=at, kind=kind, fields=json.loads(text)))
        return entries

    def verify(self) -> list[str]:
        """Walk the whole log: every MAC, the chain, and no gap in ``seq``; the problems found
        (empty: all is well)."""
        with self._store.snapshot() as connection:
            rows = connection.execute(
                f"SELECT seq, at, kind, fields, prev, mac FROM {_TABLE} ORDER BY seq"
            ).fetchall()
        problems = []
        expected_seq, expected_prev = 1, _GENESIS
        for seq, at, kind, text, prev, mac in rows:
            if seq != expected_seq:
                problems.append(f"audit entries {expected_seq}..{seq - 1} are missing")
            elif prev != expected_prev:
                problems.append(f"audit entry {seq} is not chained to the one before")
            try:
                self._store.check_seal(mac, _TABLE, seq, at, kind, text, prev, what=f"entry {seq}")
            except CorruptRecord as exc:
                problems.append(f"audit {exc}")
            expected_seq, expected_prev = seq + 1, mac
        return problems


class AuditTrail:
    """Notes of a running node for its audit log, written in batches (see the module).

    Args:
        keeps: whether a store will be attached (``attach``); without, notes are only logged.
        max_pending: the most notes that wait to be written.
        flush_every_s: how often waiting notes are written.
    """

    def __init__(self, *, keeps: bool, max_pending: int = 1024, flush_every_s: float = 0.5) -> None:
        self.keeps = keeps
        self.max_pending = max_pending
        self.flush_every_s = flush_every_s
        self._log: AuditLog | None = None
        self._notes: list[tuple[float, str, dict[str, Any]]] = []
        #: (peer, reason) -> [first seen, count, why]
        self._rejections: dict[tuple[str, str], list[Any]] = {}
        self._dropped = 0
        self._lock = trio.Lock()

    def attach(self, store: Store) -> None:
        """Write to ``store`` from now on (notes taken before wait for the first flush)."""
        self._log = AuditLog(store)

    def note(self, kind: AuditKind | str, **fields: Any) -> None:
        """Note one event (never blocks, never raises)."""
        log.info(
            "audit", extra={"audit": str(kind), **{f"audit_{k}": v for k, v in fields.items()}}
        )
        if not self.keeps:
            return
        if self._pending() >= self.max_pending:
            self._dropped += 1
            return
        self._notes.append((time.time(), str(kind), fields))

    def rejected(self, peer: PeerId, reason: RejectReason, why: str) -> None:
        """Note a forged or replayed message from ``peer`` (coalesced per peer and reason)."""
        self.coalesced(AuditKind.REJECTED, str(peer), str(reason), why)

    def coalesced(self, kind: AuditKind, who: str, reason: str, why: str) -> None:
        """Note an event that may come in floods: one row per ``(kind, who, reason)`` and
        flush, with its ``count``."""
        if not self.keeps:
            return
        key = (f"{kind}\0{who}", reason)
        pending = self._rejections.get(key)
        if pending is not None:
            pending[1] += 1
        elif self._pending() >= self.max_pending:
            self._dropped += 1
        else:
            self._rejections[key] = [time.time(), 1, why]

    def _pending(self) -> int:
        return len(self._notes) + len(self._rejections)

    def _take(self) -> list[tuple[float, str, dict[str, Any]]]:
        rows, self._notes = self._notes, []
        for (kind_who, reason), (at, count, why) in self._rejections.items():
            kind, who = kind_who.split("\0", 1)
            subject = "peer" if kind == AuditKind.REJECTED else "address"
            rows.append((at, kind, {subject: who, "reason": reason, "count": count, "why": why}))
        self._rejections = {}
        if self._dropped:
            rows.append((time.time(), str(AuditKind.DROPPED), {"count": self._dropped}))
            self._dropped = 0
        rows.sort(key=lambda row: row[0])
        return rows

    async def flush(self) -> None:
        """Write every waiting note now (in a worker thread); durable when this returns. A
        store that fails is logged (the notes are lost), never raised: the node serves on."""
        async with self._lock:
            if self._log is None or (not self._pending() and not self._dropped):
                return
            rows = self._take()
            try:
                await trio.to_thread.run_sync(functools.partial(self._log.append, rows))
            except MeshfedError as exc:
                log.error("audit entries not written", extra={"error": str(exc), "lost": len(rows)})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write waiting notes every ``flush_every_s`` until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.flush_every_s)
            await self.flush()


def seller_auditor(trail: AuditTrail) -> Any:
    """A ``Market.seller_observers`` callback noting the awards and settlements a buyer sent
    this node (the buyer's side: see the integrator's hooks in the SPEC)."""
    from .market.messages import Award, Settle

    def observe(buyer: PeerId, message: object, actions: object) -> None:
        if isinstance(message, Award):
            trail.note(
                AuditKind.AWARD,
                role="seller",
                job=message.job,
                peer=str(buyer),
                price=message.price,
                units=message.units,
            )
        elif isinstance(message, Settle):
            trail.note(
                AuditKind.SETTLEMENT,
                role="seller",
                job=message.job,
                peer=str(buyer),
                units=message.units,
                amount=message.amount,
                reason=message.reason,
            )

    return observe
