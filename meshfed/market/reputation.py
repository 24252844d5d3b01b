"""What this node saw of each peer's work, and the reliability score it bids with.

Theory of operation. The buyer's lease machine reports, once per job and peer, what happened:
a lease *delivered* to the end, a lease *failed* (not accepted after the award, abandoned,
replaced), a result *late*, a result *wrong* (it disagreed with its replicas or failed a spot
check). Each is one sealed row keyed by (peer, job, event), so a report repeated after a
restart or a replayed message counts once.

The score is the mean of a Beta distribution over "this peer does the work it is paid for"::

    score = (prior_good + good) / (prior_good + prior_bad + good + bad)

with ``good`` the delivered leases and ``bad`` the failed ones plus half a failure per late
result and two per wrong result (a wrong result is what replication exists to catch). With
the default prior Beta(2, 2) a stranger scores 0.5, the same as an
:class:`~meshfed.market.auction.Offer` with no reliability given, so a stranger is neither
favoured nor shut out; one delivered lease lifts it to 0.6, one failure drops it to 0.4. Each
event's weight halves every ``half_life`` seconds (``None``: never), so a peer's score drifts
back toward the prior when it has not worked for this node in a while: an old failure is
forgiven, and an old record of good work does not shelter a peer that turned bad.

The buyer's driver feeds it to the auction: ``Offer(..., reliability=reputation.score(peer))``.
The score is this node's own view, never gossiped: a peer cannot raise it but by working well
for this node, nor lower a third peer's (only this node's lease machine records events).
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import CorruptRecord
from ..identity import PeerId
from ..store import Store
from . import _checks as check

__all__ = ["PeerEvent", "Reputation", "WorkRecord"]

_EVENTS = "market_reputation"
_TALLIES = "market_reputation_peers"
#: a month
DEFAULT_HALF_LIFE = 30 * 24 * 3600.0


class PeerEvent(enum.StrEnum):
    """What a peer's lease came to, as the buyer saw it."""

    #: the lease was done to its end
    DELIVERED = "delivered"
    #: the lease was not accepted after the award, abandoned, or the peer replaced
    FAILED = "failed"
    #: a result came after its deadline
    LATE = "late"
    #: a result disagreed with its replicas or failed a spot check
    WRONG = "wrong"


#: (good, bad) evidence one event adds
_EVIDENCE = {
    PeerEvent.DELIVERED: (1.0, 0.0),
    PeerEvent.FAILED: (0.0, 1.0),
    PeerEvent.LATE: (0.0, 0.5),
    PeerEvent.WRONG: (0.0, 2.0),
}


@dataclass(frozen=True, slots=True)
class WorkRecord:
    """How many jobs saw each event from ``peer`` (no decay)."""

    peer: PeerId
    delivered: int = 0
    failed: int = 0
    late: int = 0
    wrong: int = 0


@dataclass(frozen=True, slots=True)
class _Tally:
    """A peer's counters and its evidence, decayed to time ``at`` (one sealed row)."""

    counts: tuple[int, int, int, int]  # in PeerEvent order
    good: float = 0.0
    bad: float = 0.0
    at: float = float("-inf")  # no event yet

    def add(self, event: PeerEvent, at: float, decay: Callable[[float], float]) -> _Tally:
        """This tally with ``event`` at time ``at`` folded in (decayed to the later time)."""
        now = max(self.at, at)
        good, bad = _EVIDENCE[event]
        counts = list(self.counts)
        counts[_ORDER.index(event)] += 1
        return _Tally(
            (counts[0], counts[1], counts[2], counts[3]),
            self.good * decay(now - self.at) + good * decay(now - at),
            self.bad * decay(now - self.at) + bad * decay(now - at),
            now,
        )


_ORDER = tuple(PeerEvent)
_EMPTY = _Tally((0, 0, 0, 0))


class Reputation:
    """Per-peer work records in the node's store, and the score they give.

    Each event is a sealed row (its key makes it count once); a sealed tally per peer holds its
    counters and its evidence decayed to its newest event, so a score costs one row however
    long the peer's history (500 bidders: one auction's worth of rows). A tally made under
    another half-life is not used: the score is then summed from the peer's events.

    Args:
        store: the node's store.
        prior: (good, bad) pseudo-counts of a stranger (both > 0).
        half_life: seconds after which an event weighs half (None: no decay).
        clock: the time recorded with events and scored at.
    """

    def __init__(
        self,
        store: Store,
        *,
        prior: tuple[float, float] = (2.0, 2.0),
        half_life: float | None = DEFAULT_HALF_LIFE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not (prior[0] > 0 and prior[1] > 0):
            raise ValueError(f"a Beta prior has two positive counts, not {prior}")
        if half_life is not None and not half_life > 0:
            raise ValueError(f"a half-life is positive (or None), not {half_life}")
        self._store = store
        self._prior = prior
        self._half_life = 0.0 if half_life is None else float(half_life)  # 0.0: no decay
        self._clock = clock

    def record(self, job: str, peer: PeerId, event: PeerEvent, *, at: float | None = None) -> bool:
        """Record that ``peer`` did ``event`` in ``job`` (at ``at``, default now).

        Returns:
            True if recorded now, False if this (job, peer, event) was recorded before.

        Raises:
            ValueError: a malformed job, or ``at`` not a finite time.
            CorruptRecord: the peer's tally (or one of its events) does not match its HMAC.
        """
        event = PeerEvent(event)
        fields = (peer.raw, check.job_id(job), event.value)
        when = check.instant(self._clock() if at is None else at)
        with self._store.transaction() as connection:
            known = connection.execute(
                f"SELECT 1 FROM {_EVENTS} WHERE peer = ? AND job = ? AND event = ?", fields
            ).fetchone()
            if known is not None:
                return False
            tally = self._tally(connection, peer).add(event, when, self._decay)
            connection.execute(
                f"INSERT INTO {_EVENTS} (peer, job, event, at, mac) VALUES (?, ?, ?, ?, ?)",
                (*fields, when, self._store.seal(_EVENTS, *fields, when)),
            )
            row = (peer.raw, self._half_life, *tally.counts, tally.good, tally.bad, tally.at)
            connection.execute(
                f"INSERT OR REPLACE INTO {_TALLIES} (peer, half_life, delivered, failed, late, "
                "wrong, good, bad, at, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row, self._store.seal(_TALLIES, *row)),
            )
        return True

    def counters(self, peer: PeerId) -> WorkRecord:
        """How many jobs saw each event from ``peer``.

        Raises:
            CorruptRecord: its tally (or one of its events) does not match its HMAC.
        """
        with self._store.snapshot() as connection:
            tally = self._tally(connection, peer)
        return WorkRecord(peer, *tally.counts)

    def score(self, peer: PeerId, *, now: float | None = None) -> float:
        """``peer``'s reliability in (0, 1) (a stranger: the prior's mean, 0.5 by default).

        Raises:
            CorruptRecord: its tally (or one of its events) does not match its HMAC.
        """
        return self.scores([peer], now=now)[peer]

    def scores(self, peers: Iterable[PeerId], *, now: float | None = None) -> dict[PeerId, float]:
        """:meth:`score` of each of ``peers`` at the same ``now`` (one auction's offers), read
        in one snapshot."""
        now = self._clock() if now is None else now
        scores = {}
        with self._store.snapshot() as connection:
            for peer in peers:
                tally = self._tally(connection, peer)
                weight = self._decay(max(now - tally.at, 0.0))
                good = self._prior[0] + tally.good * weight
                bad = self._prior[1] + tally.bad * weight
                scores[peer] = good / (good + bad)
        return scores

    def verify(self) -> list[str]:
        """Check every event's and tally's HMAC, and that each tally counts its peer's events;
        returns the problems found (empty: all is well)."""
        problems = []
        counted: dict[bytes, list[int]] = {}
        with self._store.snapshot() as connection:
            events = connection.execute(f"SELECT peer, job, event, at, mac FROM {_EVENTS}")
            for peer, job, event, at, mac in events.fetchall():
                try:
                    where = f"reputation of {PeerId.of(peer).short()} in job {job!r} ({event})"
                    self._store.check_seal(mac, _EVENTS, peer, job, event, at, what=where)
                except CorruptRecord as exc:
                    problems.append(str(exc))
                    continue
                counted.setdefault(peer, [0, 0, 0, 0])[_ORDER.index(PeerEvent(event))] += 1
            tallies = connection.execute(
                f"SELECT peer, half_life, delivered, failed, late, wrong, good, bad, at, mac "
                f"FROM {_TALLIES}"
            )
            for *fields, mac in tallies.fetchall():
                what = f"reputation tally of {PeerId.of(fields[0]).short()}"
                try:
                    self._store.check_seal(mac, _TALLIES, *fields, what=what)
                except CorruptRecord as exc:
                    problems.append(str(exc))
                if counted.get(fields[0]) != fields[2:6]:
                    problems.append(f"{what} does not count its events")
        return problems

    def _decay(self, age: float) -> float:
        return 1.0 if not self._half_life else 0.5 ** (age / self._half_life)

    def _tally(self, connection: sqlite3.Connection, peer: PeerId) -> _Tally:
        """``peer``'s tally under this half-life: its row, or else summed from its events."""
        row = connection.execute(
            f"SELECT half_life, delivered, failed, late, wrong, good, bad, at, mac "
            f"FROM {_TALLIES} WHERE peer = ?",
            (peer.raw,),
        ).fetchone()
        if row is not None:
            *fields, mac = row
            what = f"reputation tally of {peer.short()}"
            self._store.check_seal(mac, _TALLIES, peer.raw, *fields, what=what)
            half_life, delivered, failed, late, wrong, good, bad, at = fields
            if half_life == self._half_life:
                return _Tally((delivered, failed, late, wrong), good, bad, at)
        events = connection.execute(
            f"SELECT job, event, at, mac FROM {_EVENTS} WHERE peer = ? ORDER BY at", (peer.raw,)
        ).fetchall()
        tally = _EMPTY
        for job, event, at, mac in events:
            where = f"reputation of {peer.short()} in job {job!r} ({event})"
            self._store.check_seal(mac, _EVENTS, peer.raw, job, event, at, what=where)
            tally = tally.add(PeerEvent(event), at, self._decay)
        return tally
