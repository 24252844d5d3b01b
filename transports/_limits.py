"""Per-peer admission control shared by the transports: rate buckets and concurrency caps."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshfed.identity import PeerId
from meshfed.stats import RejectReason
from meshfed.transport import TransportLimits

__all__ = ["PeerAdmission"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    active: int = 0


@dataclass(slots=True)
class PeerAdmission:
    """Decides whether one more inbound request or stream from a peer may start.

    Requests draw from a token bucket (``requests_per_second``, ``request_burst``); requests
    and streams together may not exceed ``max_streams_per_peer`` at once. Sans-IO: pass ``now``.
    """

    limits: TransportLimits
    _peers: dict[PeerId, _Bucket] = field(default_factory=dict)

    def admit(self, peer: PeerId, now: float, *, is_request: bool) -> RejectReason | None:
        """Reserve a slot for ``peer``; returns why not, or ``None`` if admitted.

        Every admitted call must be paired with :meth:`release`.
        """
        bucket = self._peers.get(peer)
        if bucket is None:
            bucket = self._peers[peer] = _Bucket(float(self.limits.request_burst), now)
        if bucket.active >= self.limits.max_streams_per_peer:
            return RejectReason.TOO_MANY_STREAMS
        if is_request:
            elapsed = now - bucket.updated
            bucket.tokens = min(
                float(self.limits.request_burst),
                bucket.tokens + elapsed * self.limits.requests_per_second,
            )
            bucket.updated = now
            if bucket.tokens < 1.0:
                return RejectReason.RATE_LIMITED
            bucket.tokens -= 1.0
        bucket.active += 1
        return None

    def release(self, peer: PeerId) -> None:
        """Free the slot taken by a finished request or stream."""
        bucket = self._peers[peer]
        bucket.active -= 1
        if bucket.active == 0 and bucket.tokens >= self.limits.request_burst:
            del self._peers[peer]  # idle and full: forget it, keeps memory bounded
