"""The market's double-entry ledger, in the node's store (SPEC.md, "Market: the ledger").

Theory of operation. Every change of money is one *entry*: an idempotency key, a kind, the job
and counterpart it concerns, the amount asked, two or more *postings* (account, amount) that
sum to zero, a memo, the evidence it rests on (the counterpart's signed envelope, raw) and the
time. An entry is written in one store transaction together with the new balances of the
accounts it touches, so a method that returned survives ``kill -9`` (the store commits with
``synchronous=FULL``), and one that did not return left nothing. The market driver applies an
entry *before* it sends the message that depends on it (write-ahead): an acknowledgement is
never out while its debit is not durable.

Accounts (``<job>`` a job id, ``<peer>`` a peer id's bytes in hex)::

    buyer side
      mint                     minus every credit granted to this node
      available                what the node may still put into escrow
      escrow:<job>             what the job may still pay (its escrowed budget less payments)
      paid:<job>:<seller>      what the node paid <seller> for <job>, by acknowledged debit
    seller side
      sold:<job>:<buyer>       minus what <buyer> paid or forfeited for <job> (the counterpart)
      earned:<job>:<buyer>     paid by <buyer>: every unit backed by its signed acknowledgement
      forfeited:<job>:<buyer>  units <buyer> left unacknowledged past the lease's terms

Entries and their postings (``a`` the amount)::

    grant(a)                   mint -a, available +a                   key grant:<key>
    escrow(job, a)             available -a, escrow:job +a             key escrow:<key>
    pay(job, seller, u, a)     escrow:job -a, paid:job:seller +a       key pay:<job>:<seller>:<u>
    release(job)               escrow:job -r, available +r (r: all)    key release:<key>
    earn(job, buyer, u, a)     sold:job:buyer -a, earned:job:buyer +a  key earn:<job>:<buyer>:<u>
      (unit u forfeited before: forfeited -f, sold +(f - a) if not 0, earned +a)
    forfeit(job, buyer, u, a)  sold:job:buyer -a, forfeited:job:buyer +a  key forfeit:<...>:<u>

A key applied twice is a no-op that returns the first result; a key reused for another
transaction (another job, counterpart, unit or amount) is the caller's bug and raises
:class:`~meshfed.errors.LocalProtocolError`. Both sides of a lease post the same acknowledged
``(job, unit, amount)``, so ``paid:<job>:<seller>`` in the buyer's ledger equals
``earned:<job>:<buyer>`` in the seller's, to the last micro-credit.

Integrity. Every entry and balance row carries an HMAC under the store's key
(:meth:`~meshfed.store.Store.seal`); a row that does not match raises
:class:`~meshfed.errors.CorruptRecord` and is never used. Each entry's MAC also covers the MAC
of the entry before it, so :meth:`Ledger.verify` detects an entry changed, removed or
reordered anywhere but at the very end (cutting the tail off together with the balances it
moved is putting back an older file, which the store does not detect).
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import BudgetExceeded, CorruptRecord, LocalProtocolError
from ..identity import PeerId
from ..store import Store
from . import _checks as check
from .terms import MAX_AMOUNT, credits

__all__ = [
    "AVAILABLE",
    "MINT",
    "Debit",
    "Entry",
    "EntryKind",
    "Ledger",
    "Posting",
    "Statement",
    "escrow_account",
    "paid_account",
    "earned_account",
    "forfeited_account",
    "sold_account",
]

#: credits come from here (its balance is minus everything granted)
MINT = "mint"
#: credits the node may put into escrow
AVAILABLE = "available"
#: the longest idempotency key or memo
MAX_KEY_LEN = 256

_ENTRIES = "ledger_entries"
_BALANCES = "ledger_balances"
_ENTRY_COLUMNS = (
    "seq, key, kind, job, counterpart, unit, amount, postings, memo, evidence, at, prev, mac"
)


def escrow_account(job: str) -> str:
    """What ``job`` may still pay (buyer side)."""
    return f"escrow:{job}"


def paid_account(job: str, seller: PeerId) -> str:
    """What this node paid ``seller`` for ``job`` (buyer side)."""
    return f"paid:{job}:{seller.raw.hex()}"


def sold_account(job: str, buyer: PeerId) -> str:
    """The counterpart of a seller's income from ``buyer`` for ``job`` (negative)."""
    return f"sold:{job}:{buyer.raw.hex()}"


def earned_account(job: str, buyer: PeerId) -> str:
    """What ``buyer`` paid this node for ``job``, by signed acknowledgement (seller side)."""
    return f"earned:{job}:{buyer.raw.hex()}"


def forfeited_account(job: str, buyer: PeerId) -> str:
    """Work ``buyer`` left unacknowledged past the lease's terms (seller side)."""
    return f"forfeited:{job}:{buyer.raw.hex()}"


class EntryKind(enum.StrEnum):
    """What an entry records."""

    #: credits granted to this node (mint -> available)
    GRANT = "grant"
    #: a job's budget put aside (available -> escrow)
    ESCROW = "escrow"
    #: one acknowledged debit paid by the buyer (escrow -> paid)
    PAY = "pay"
    #: a job's escrow remainder back to available
    RELEASE = "release"
    #: one acknowledged debit earned by the seller (sold -> earned)
    EARN = "earn"
    #: one unacknowledged unit forfeited to the seller (sold -> forfeited)
    FORFEIT = "forfeit"


#: entries that rest on a counterpart's signed envelope (their evidence is never empty)
_NEEDS_EVIDENCE = frozenset({EntryKind.PAY, EntryKind.EARN, EntryKind.FORFEIT})


@dataclass(frozen=True, slots=True)
class Posting:
    """One leg of an entry: ``amount`` micro-credits into ``account`` (negative: out of it)."""

    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One transaction as the ledger holds it.

    Attributes:
        seq: its place in the ledger (1, 2, ...).
        key: its idempotency key (``pay:<job>:<seller hex>:<unit>``, ``grant:<key>``, ...).
        kind: what it records.
        job: the job ("" for a grant).
        counterpart: the seller (pay) or buyer (earn, forfeit), else None.
        unit: the unit of work paid, earned or forfeited, else None.
        amount: the amount asked (for a release, the remainder it moved).
        postings: two or more, summing to zero.
        memo: a note for people.
        evidence: what it rests on: the counterpart's signed envelope, raw (b"" if none).
        at: when it was written (seconds since the epoch).
    """

    seq: int
    key: str
    kind: EntryKind
    job: str
    counterpart: PeerId | None
    unit: int | None
    amount: int
    postings: tuple[Posting, ...]
    memo: str
    evidence: bytes
    at: float


@dataclass(frozen=True, slots=True)
class Debit:
    """One acknowledged debit: ``amount`` for ``unit`` of ``job`` with ``peer`` (the seller on
    the buyer's side), resting on ``evidence`` (the counterpart's signed envelope, raw)."""

    job: str
    peer: PeerId
    unit: int
    amount: int
    evidence: bytes


@dataclass(frozen=True, slots=True)
class Statement:
    """One job's entries and totals, both roles (a node may buy and sell in the same job id).

    Attributes:
        job: the job.
        entries: its entries, in order.
        escrowed: the budget put into escrow (buyer).
        released: what went back to available (buyer).
        escrow: what the job may still pay (buyer).
        paid: per seller, what this node paid it (buyer).
        earned: per buyer, what it paid this node, acknowledged (seller).
        forfeited: per buyer, what it forfeited to this node (seller).
    """

    job: str
    entries: tuple[Entry, ...]
    escrowed: int
    released: int
    escrow: int
    paid: Mapping[PeerId, int]
    earned: Mapping[PeerId, int]
    forfeited: Mapping[PeerId, int]


class Ledger:
    """The node's double-entry books over its store (see the module docstring).

    Every method runs in the caller's thread under the store's lock (from trio:
    ``await trio.to_thread.run_sync(ledger.pay, ...)``); a write method that returned is
    durable.

    Args:
        store: the node's store (read-only stores answer reads only).
        clock: the time written into entries.
    """

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    # -- reading ------------------------------------------------------------------------------

    def balance(self, account: str) -> int:
        """The balance of ``account`` (0 for one never posted to).

        Raises:
            CorruptRecord: its row does not match its HMAC.
        """
        with self._store.snapshot() as connection:
            return self._balance(connection, account)

    def accounts(self) -> dict[str, int]:
        """Every account ever posted to, with its balance.

        Raises:
            CorruptRecord: a balance row does not match its HMAC.
        """
        with self._store.snapshot() as connection:
            rows = connection.execute(
                f"SELECT account, balance, seq, mac FROM {_BALANCES} ORDER BY account"
            ).fetchall()
        return {row[0]: self._checked_balance(*row) for row in rows}

    def entry(self, key: str) -> Entry | None:
        """The entry applied under ``key`` (as stored: ``pay:...``, ``grant:<key>``), or None.

        Raises:
            CorruptRecord: its row does not match its HMAC.
        """
        with self._store.snapshot() as connection:
            return self._entry_by_key(connection, key)

    def entries(self, *, after: int = 0, limit: int = 1000) -> list[Entry]:
        """Up to ``limit`` entries with ``seq > after``, in order.

        Raises:
            CorruptRecord: a row does not match its HMAC.
        """
        with self._store.snapshot() as connection:
            rows = connection.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM {_ENTRIES} WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [self._entry(row) for row in rows]

    def statement(self, job: str) -> Statement:
        """``job``'s entries and totals, both roles.

        Raises:
            CorruptRecord: an entry or balance row does not match its HMAC.
        """
        with self._store.snapshot() as connection:
            rows = connection.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM {_ENTRIES} WHERE job = ? ORDER BY seq", (job,)
            ).fetchall()
            escrow = self._balance(connection, escrow_account(job))
        entries = tuple(self._entry(row) for row in rows)
        totals: dict[str, dict[PeerId, int]] = {"paid": {}, "earned": {}, "forfeited": {}}
        for entry in entries:
            peer = entry.counterpart
            if peer is None:
                continue
            sides = {
                paid_account(job, peer): totals["paid"],
                earned_account(job, peer): totals["earned"],
                forfeited_account(job, peer): totals["forfeited"],
            }
            for posting in entry.postings:
                side = sides.get(posting.account)
                if side is not None:
                    side[peer] = side.get(peer, 0) + posting.amount
        return Statement(
            job=job,
            entries=entries,
            escrowed=sum(e.amount for e in entries if e.kind is EntryKind.ESCROW),
            released=sum(e.amount for e in entries if e.kind is EntryKind.RELEASE),
            escrow=escrow,
            paid=totals["paid"],
            earned=totals["earned"],
            forfeited={peer: left for peer, left in totals["forfeited"].items() if left},
        )

    def verify(self) -> list[str]:
        """Check the whole ledger: every row's HMAC, the chain of entries, every entry's
        postings summing to zero, and every balance equal to the sum of its postings. Returns
        the problems found (empty: all is well)."""
        problems: list[str] = []
        sums: dict[str, int] = {}
        last: dict[str, int] = {}
        with self._store.snapshot() as connection:
            rows = connection.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM {_ENTRIES} ORDER BY seq"
            ).fetchall()
            balances = connection.execute(
                f"SELECT account, balance, seq, mac FROM {_BALANCES}"
            ).fetchall()
        previous = b""
        for row in rows:
            seq, prev, mac = row[0], row[-2], row[-1]
            if prev != previous:
                problems.append(f"ledger entry {seq}: the entry before it was changed or removed")
            previous = mac
            try:
                entry = self._entry(row)
            except CorruptRecord as exc:
                problems.append(str(exc))
                continue
            if sum(p.amount for p in entry.postings) != 0:
                problems.append(f"ledger entry {seq}: its postings do not sum to zero")
            for posting in entry.postings:
                sums[posting.account] = sums.get(posting.account, 0) + posting.amount
                last[posting.account] = seq
        for account, balance, seq, mac in balances:
            try:
                self._checked_balance(account, balance, seq, mac)
            except CorruptRecord as exc:
                problems.append(str(exc))
                continue
            if balance != sums.get(account) or seq != last.get(account):
                problems.append(f"ledger account {account!r}: its balance is not its postings'")
        missing = sums.keys() - {account for account, *_ in balances}
        problems.extend(f"ledger account {a!r}: its balance row is missing" for a in missing)
        return problems

    # -- buyer side ---------------------------------------------------------------------------

    def grant(self, amount: int, *, key: str, memo: str = "") -> None:
        """Credit ``amount`` to ``available`` from ``mint`` (a no-op if ``key`` was applied).

        Raises:
            ValueError: ``amount`` not in (0, MAX_AMOUNT], or a malformed key or memo.
            BudgetExceeded: ``available`` would hold more than MAX_AMOUNT.
        """
        check.amount(amount)
        self._apply(
            _Request(f"grant:{_checked_key(key)}", EntryKind.GRANT, "", None, None, amount),
            lambda _: [Posting(MINT, -amount), Posting(AVAILABLE, amount)],
            memo=memo,
        )

    def escrow(self, job: str, amount: int, *, key: str) -> None:
        """Put ``amount`` of ``available`` aside for ``job`` (a no-op if ``key`` was applied).

        Raises:
            ValueError: ``amount`` not in (0, MAX_AMOUNT], or a malformed job or key.
            BudgetExceeded: ``available`` holds less than ``amount``.
        """
        check.amount(amount)
        request = _Request(
            f"escrow:{_checked_key(key)}", EntryKind.ESCROW, check.job_id(job), None, None, amount
        )

        def postings(read: _Read) -> list[Posting]:
            left = read(AVAILABLE)
            if left < amount:
                raise BudgetExceeded(
                    f"job {job!r}: cannot escrow {credits(amount)} credits, "
                    f"{credits(left)} available"
                )
            return [Posting(AVAILABLE, -amount), Posting(escrow_account(job), amount)]

        self._apply(request, postings)

    def pay(self, job: str, seller: PeerId, unit: int, amount: int, *, evidence: bytes) -> bool:
        """Pay ``seller`` ``amount`` for ``unit`` of ``job`` from its escrow: one debit the
        buyer acknowledged. ``evidence`` is the seller's signed debit note, raw.

        Returns:
            True if applied now, False if this (job, seller, unit) was paid before.

        Raises:
            ValueError: ``amount`` not in (0, MAX_AMOUNT], a malformed job or unit, no evidence.
            BudgetExceeded: the job's escrow holds less than ``amount`` (nothing is written).
            LocalProtocolError: this unit was paid before with another amount.
        """
        return self.pay_many([Debit(job, seller, unit, amount, evidence)])[0]

    def pay_many(self, debits: Iterable[Debit]) -> list[bool]:
        """:meth:`pay` each debit (``peer`` the seller), all in one transaction: one fsync for
        a round's worth of debit notes instead of one each. All or nothing.

        Returns:
            For each debit, True if applied now, False if paid before.

        Raises:
            ValueError, BudgetExceeded, LocalProtocolError: as :meth:`pay`, for any of them;
                then none is applied.
        """
        plans = [self._pay_plan(debit) for debit in debits]
        with self._store.transaction() as connection:
            return [
                self._apply_in(connection, request, plan, "", evidence)[1]
                for request, plan, evidence in plans
            ]

    def _pay_plan(self, debit: Debit) -> tuple[_Request, _Plan, bytes]:
        job, seller, unit, amount = debit.job, debit.peer, debit.unit, debit.amount
        check.amount(amount)
        check.envelope(debit.evidence)
        request = _Request(
            f"pay:{check.job_id(job)}:{seller.raw.hex()}:{check.unit(unit)}",
            EntryKind.PAY,
            job,
            seller,
            unit,
            amount,
        )

        def postings(read: _Read) -> list[Posting]:
            left = read(escrow_account(job))
            if left < amount:
                raise BudgetExceeded(
                    f"job {job!r}: a debit of {credits(amount)} credits for unit {unit} of "
                    f"{seller.short()} exceeds the {credits(left)} credits left in escrow"
                )
            return [
                Posting(escrow_account(job), -amount),
                Posting(paid_account(job, seller), amount),
            ]

        return request, postings, debit.evidence

    def release(self, job: str, *, key: str) -> int:
        """Move what is left in ``job``'s escrow back to ``available`` (on settle or cancel).

        Returns:
            The amount released (by the first application of ``key``: a repeat returns it
            again and moves nothing).

        Raises:
            ValueError: a malformed job or key.
        """
        request = _Request(
            f"release:{_checked_key(key)}", EntryKind.RELEASE, check.job_id(job), None, None, None
        )

        def postings(read: _Read) -> list[Posting]:
            left = read(escrow_account(job))
            return [Posting(escrow_account(job), -left), Posting(AVAILABLE, left)]

        entry, _ = self._apply(request, postings)
        assert entry is not None  # a release is never declined
        return entry.amount

    # -- seller side --------------------------------------------------------------------------

    def earn(self, job: str, buyer: PeerId, unit: int, amount: int, *, evidence: bytes) -> bool:
        """Record ``amount`` earned from ``buyer`` for ``unit`` of ``job``: one debit the buyer
        acknowledged. ``evidence`` is the buyer's signed acknowledgement, raw. A unit recorded
        as forfeited is moved to earned (the acknowledgement now proves it).

        Returns:
            True if applied now, False if this (job, buyer, unit) was earned before.

        Raises:
            ValueError: ``amount`` not in (0, MAX_AMOUNT], a malformed job or unit, no evidence.
            LocalProtocolError: this unit was earned before with another amount.
        """
        check.amount(amount)
        tail = f"{check.job_id(job)}:{buyer.raw.hex()}:{check.unit(unit)}"
        request = _Request(f"earn:{tail}", EntryKind.EARN, job, buyer, unit, amount)

        def postings(read: _Read) -> list[Posting]:
            earned = Posting(earned_account(job, buyer), amount)
            forfeit = read.entry(f"forfeit:{tail}")
            if forfeit is None:
                return [Posting(sold_account(job, buyer), -amount), earned]
            moved = [Posting(forfeited_account(job, buyer), -forfeit.amount), earned]
            if forfeit.amount != amount:
                moved.append(Posting(sold_account(job, buyer), forfeit.amount - amount))
            return moved

        return self._apply(request, postings, evidence=evidence)[1]

    def forfeit(self, job: str, buyer: PeerId, unit: int, amount: int, *, evidence: bytes) -> bool:
        """Record ``unit`` of ``job``, done for ``buyer`` but never acknowledged within the
        lease's terms, as forfeited to this node. ``evidence`` is what the seller holds: the
        buyer's signed award (its price and terms) and its own debit note; it proves the
        buyer's commitment, not the work (SPEC: what a dishonest buyer can do).

        Returns:
            True if applied now, False if the unit was already earned or forfeited.

        Raises:
            ValueError: ``amount`` not in (0, MAX_AMOUNT], a malformed job or unit, no evidence.
            LocalProtocolError: this unit was forfeited before with another amount.
        """
        check.amount(amount)
        tail = f"{check.job_id(job)}:{buyer.raw.hex()}:{check.unit(unit)}"
        request = _Request(f"forfeit:{tail}", EntryKind.FORFEIT, job, buyer, unit, amount)

        def postings(read: _Read) -> list[Posting] | None:
            if read.entry(f"earn:{tail}") is not None:
                return None
            return [
                Posting(sold_account(job, buyer), -amount),
                Posting(forfeited_account(job, buyer), amount),
            ]

        return self._apply(request, postings, evidence=evidence)[1]

    # -- the one write path -------------------------------------------------------------------

    def _apply(
        self,
        request: _Request,
        plan: _Plan,
        *,
        memo: str = "",
        evidence: bytes = b"",
    ) -> tuple[Entry | None, bool]:
        """Apply ``request`` once, in its own transaction (see :meth:`_apply_in`)."""
        if len(memo) > MAX_KEY_LEN:
            raise ValueError(f"a memo has at most {MAX_KEY_LEN} characters")
        check.envelope(evidence, required=request.kind in _NEEDS_EVIDENCE)
        with self._store.transaction() as connection:
            return self._apply_in(connection, request, plan, memo, evidence)

    def _apply_in(
        self,
        connection: sqlite3.Connection,
        request: _Request,
        plan: _Plan,
        memo: str,
        evidence: bytes,
    ) -> tuple[Entry | None, bool]:
        """Apply ``request`` once in the caller's transaction: the stored entry and True if
        written now; the first entry and False if its key was applied before; (None, False)
        if ``plan`` declined."""
        found = self._entry_by_key(connection, request.key)
        if found is not None:
            request.check_repeat(found)
            return found, False
        postings = plan(_Read(self, connection))
        if postings is None:
            return None, False
        return self._append(connection, request, postings, memo, evidence), True

    def _append(
        self,
        connection: sqlite3.Connection,
        request: _Request,
        postings: list[Posting],
        memo: str,
        evidence: bytes,
    ) -> Entry:
        assert sum(p.amount for p in postings) == 0 and len(postings) >= 2
        last = connection.execute(
            f"SELECT seq, mac FROM {_ENTRIES} ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        seq, prev = (1, b"") if last is None else (last[0] + 1, last[1])
        amount = max(p.amount for p in postings) if request.amount is None else request.amount
        for posting in postings:
            balance = self._balance(connection, posting.account) + posting.amount
            if abs(balance) > MAX_AMOUNT:
                raise BudgetExceeded(
                    f"account {posting.account!r} would hold {credits(balance)} credits, "
                    f"beyond the market's largest amount"
                )
            connection.execute(
                f"INSERT INTO {_BALANCES} (account, balance, seq, mac) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (account) DO UPDATE SET balance = excluded.balance, "
                "seq = excluded.seq, mac = excluded.mac",
                (posting.account, balance, seq, self._balance_mac(posting.account, balance, seq)),
            )
        row: tuple[Any, ...] = (
            seq,
            request.key,
            request.kind.value,
            request.job,
            None if request.counterpart is None else request.counterpart.raw,
            request.unit,
            amount,
            msgpack.packb([[p.account, p.amount] for p in postings]),
            memo,
            evidence,
            self._clock(),
            prev,
        )
        mac = self._store.seal(_ENTRIES, *row)
        placeholders = ", ".join("?" * (len(row) + 1))
        connection.execute(
            f"INSERT INTO {_ENTRIES} ({_ENTRY_COLUMNS}) VALUES ({placeholders})", (*row, mac)
        )
        return self._entry((*row, mac))

    # -- rows ---------------------------------------------------------------------------------

    def _balance(self, connection: sqlite3.Connection, account: str) -> int:
        row = connection.execute(
            f"SELECT balance, seq, mac FROM {_BALANCES} WHERE account = ?", (account,)
        ).fetchone()
        return 0 if row is None else self._checked_balance(account, *row)

    def _balance_mac(self, account: str, balance: int, seq: int) -> bytes:
        return self._store.seal(_BALANCES, account, balance, seq)

    def _checked_balance(self, account: str, balance: int, seq: int, mac: bytes) -> int:
        self._store.check_seal(
            mac, _BALANCES, account, balance, seq, what=f"ledger account {account!r}"
        )
        return balance

    def _entry_by_key(self, connection: sqlite3.Connection, key: str) -> Entry | None:
        row = connection.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM {_ENTRIES} WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else self._entry(row)

    def _entry(self, row: tuple[Any, ...]) -> Entry:
        *fields, mac = row
        seq, key, kind, job, counterpart, unit, amount, postings, memo, evidence, at, _ = fields
        where = f"ledger entry {seq} ({key})"
        self._store.check_seal(mac, _ENTRIES, *fields, what=where)
        try:
            legs = tuple(Posting(account, value) for account, value in msgpack.unpackb(postings))
            peer = None if counterpart is None else PeerId.of(counterpart)
            return Entry(
                seq, key, EntryKind(kind), job, peer, unit, amount, legs, memo, evidence, at
            )
        except (ValueError, TypeError) as exc:  # sealed by us: only a bug gets here
            raise CorruptRecord(f"{where} cannot be decoded: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Request:
    """What a caller asked for, before it becomes an entry."""

    key: str
    kind: EntryKind
    job: str
    counterpart: PeerId | None
    unit: int | None
    amount: int | None  # None: decided by the balances (a release)

    def check_repeat(self, found: Entry) -> None:
        same = (found.kind, found.job, found.counterpart, found.unit) == (
            self.kind,
            self.job,
            self.counterpart,
            self.unit,
        )
        if not same or (self.amount is not None and found.amount != self.amount):
            raise LocalProtocolError(
                f"ledger key {self.key!r} was applied to another transaction: {found.kind} of "
                f"{found.amount} in job {found.job!r}, not {self.kind} of {self.amount}"
            )


_Plan = Callable[["_Read"], list[Posting] | None]


class _Read:
    """What a plan may read inside the write transaction: balances and earlier entries."""

    def __init__(self, ledger: Ledger, connection: sqlite3.Connection) -> None:
        self._ledger = ledger
        self._connection = connection

    def __call__(self, account: str) -> int:
        return self._ledger._balance(self._connection, account)

    def entry(self, key: str) -> Entry | None:
        return self._ledger._entry_by_key(self._connection, key)


def _checked_key(key: str) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LEN:
        raise ValueError(f"an idempotency key is a str of 1 to {MAX_KEY_LEN} characters")
    return key
