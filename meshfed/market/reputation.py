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
for this node, nor lower another's but by being that other (SPEC: what a seller can do).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..identity import PeerId
from ..store import Store
from . import _checks as check

__all__ = ["PeerEvent", "PeerRecord", "Reputation"]

_TABLE = "market_reputation"
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
class PeerRecord:
    """How many jobs saw each event from ``peer`` (no decay)."""

    peer: PeerId
    delivered: int = 0
    failed: int = 0
    late: int = 0
    wrong: int = 0


class Reputation:
    """Per-peer work records in the node's store, and the score they give.

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
        self._half_life = half_life
        self._clock = clock

    def record(self, job: str, peer: PeerId, event: PeerEvent, *, at: float | None = None) -> bool:
        """Record that ``peer`` did ``event`` in ``job`` (at ``at``, default now).

        Returns:
            True if recorded now, False if this (job, peer, event) was recorded before.

        Raises:
            ValueError: a malformed job.
        """
        fields = (peer.raw, check.job_id(job), PeerEvent(event).value)
        when = self._clock() if at is None else float(at)
        with self._store.transaction() as connection:
            added = connection.execute(
                f"INSERT INTO {_TABLE} (peer, job, event, at, mac) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (*fields, when, self._store.seal(_TABLE, *fields, when)),
            ).rowcount
        return bool(added)

    def counters(self, peer: PeerId) -> PeerRecord:
        """How many jobs saw each event from ``peer``.

        Raises:
            CorruptRecord: one of its rows does not match its HMAC.
        """
        counts = dict.fromkeys(PeerEvent, 0)
        for event, _ in self._events(peer):
            counts[event] += 1
        return PeerRecord(peer, *(counts[event] for event in PeerEvent))

    def score(self, peer: PeerId, *, now: float | None = None) -> float:
        """``peer``'s reliability in [0, 1] (a stranger: the prior's mean, 0.5 by default).

        Raises:
            CorruptRecord: one of its rows does not match its HMAC.
        """
        now = self._clock() if now is None else now
        good, bad = self._prior
        for event, at in self._events(peer):
            weight = (
                1.0 if self._half_life is None else 0.5 ** (max(now - at, 0.0) / self._half_life)
            )
            good += _EVIDENCE[event][0] * weight
            bad += _EVIDENCE[event][1] * weight
        return good / (good + bad)

    def scores(self, peers: Iterable[PeerId], *, now: float | None = None) -> dict[PeerId, float]:
        """:meth:`score` of each of ``peers`` at the same ``now`` (for one auction's offers)."""
        now = self._clock() if now is None else now
        return {peer: self.score(peer, now=now) for peer in peers}

    def _events(self, peer: PeerId) -> list[tuple[PeerEvent, float]]:
        with self._store.snapshot() as connection:
            rows = connection.execute(
                f"SELECT job, event, at, mac FROM {_TABLE} WHERE peer = ?", (peer.raw,)
            ).fetchall()
        events = []
        for job, event, at, mac in rows:
            where = f"reputation of {peer.short()} in job {job!r} ({event})"
            self._store.check_seal(mac, _TABLE, peer.raw, job, event, at, what=where)
            events.append((PeerEvent(event), at))
        return events
