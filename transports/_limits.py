"""Per-peer admission control shared by the transports: rate buckets and concurrency caps."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshfed.identity import PeerId
from meshfed.ratelimit import TokenBuckets
from meshfed.stats import RejectReason
from meshfed.transport import TransportLimits

__all__ = ["PeerAdmission"]


@dataclass(slots=True)
class PeerAdmission:
    """Decides whether one more inbound request or stream from a peer may start.

    Requests draw from a token bucket (``requests_per_second``, ``request_burst``); requests
    and streams together may not exceed ``max_streams_per_peer`` at once. Sans-IO: pass ``now``.
    """

    limits: TransportLimits
    _active: dict[PeerId, int] = field(default_factory=dict)
    _rates: TokenBuckets[PeerId] = field(init=False)

    def __post_init__(self) -> None:
        self._rates = TokenBuckets(self.limits.requests_per_second, self.limits.request_burst)

    def admit(self, peer: PeerId, now: float, *, is_request: bool) -> RejectReason | None:
        """Reserve a slot for ``peer``; returns why not, or ``None`` if admitted.

        Every admitted call must be paired with :meth:`release`.
        """
        active = self._active.get(peer, 0)
        if active >= self.limits.max_streams_per_peer:
            return RejectReason.TOO_MANY_STREAMS
        if is_request and not self._rates.take(peer, now):
            return RejectReason.RATE_LIMITED
        self._active[peer] = active + 1
        return None

    def release(self, peer: PeerId) -> None:
        """Free the slot taken by a finished request or stream."""
        active = self._active[peer] - 1
        if active:
            self._active[peer] = active
        else:
            del self._active[peer]
