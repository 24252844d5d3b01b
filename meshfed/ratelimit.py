"""Token buckets per key (peer), the one rate limiter meshfed uses, and fair shares of the CPU
between keys. Sans-IO: pass ``now``."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["CpuShares", "TokenBuckets"]

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class TokenBuckets(Generic[K]):
    """One bucket of ``burst`` tokens per key, refilled at ``rate`` tokens per second.

    Memory stays bounded by the keys seen recently: a bucket that refilled is forgotten.
    """

    rate: float
    burst: float
    _buckets: dict[K, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {self.rate}, {self.burst}")

    def take(self, key: K, now: float, tokens: float = 1.0) -> bool:
        """Spend ``tokens`` from ``key``'s bucket; False (and nothing spent) if it lacks them."""
        level, updated = self._buckets.get(key, (self.burst, now))
        level = min(self.burst, level + (now - updated) * self.rate)
        if level < tokens:
            self._buckets[key] = (level, now)
            return False
        level -= tokens
        if level >= self.burst:
            self._buckets.pop(key, None)
        else:
            self._buckets[key] = (level, now)
        if len(self._buckets) > 4096:
            self._forget_full(now)
        return True

    def _forget_full(self, now: float) -> None:
        full = [
            key
            for key, (level, updated) in self._buckets.items()
            if level + (now - updated) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]


@dataclass(slots=True)
class _Share:
    level: float  # CPU seconds this key may still spend now (negative: its debt)
    updated: float
    charged: float  # when it last spent
    spent: float = 0.0  # CPU seconds charged since it became active


@dataclass(slots=True)
class CpuShares(Generic[K]):
    """Fair shares of one CPU between the keys (peers) that use it.

    ``now`` is any clock in seconds; the libp2p transport passes the thread's CPU clock, so
    shares divide the CPU the node actually got. A key charged within the last ``window_s``
    is *active*. Each active key's bucket refills at ``1 / active`` seconds per second up to
    its depth, ``burst_s`` or the costliest single charge of the last window or two if that is
    more (as deficit round robin's quantum covers the largest packet: a key whose jobs are
    cheap would otherwise lose what it earns while it waits its turn behind others' longer
    jobs); :meth:`charge` spends from it, into debt if the work cost more. :meth:`wait_s`
    says how long a key in debt must wait before more of its work starts, so busy keys each
    get an equal share whatever their work costs, and a key alone gets all of it. A key's wait
    depends on its own debt and on how many keys are active, never on how much the others
    spend. Memory is bounded by the keys active within the window.
    """

    burst_s: float = 0.05
    window_s: float = 1.0
    _shares: dict[K, _Share] = field(default_factory=dict)
    _pruned: float = float("-inf")
    _total: float = 0.0
    #: how much a bucket holds (``burst_s``, or the costliest charge of the last window or two)
    _depth: float = 0.0
    _peak: float = 0.0  # the costliest charge since the last prune

    def __post_init__(self) -> None:
        if self.burst_s <= 0 or self.window_s <= 0:
            raise ValueError(
                f"burst_s and window_s must be > 0, got {self.burst_s}, {self.window_s}"
            )
        self._depth = self.burst_s

    @property
    def rate(self) -> float:
        """CPU seconds per second each active key earns."""
        return 1.0 / max(1, len(self._shares))

    def charge(self, key: K, seconds: float, now: float) -> None:
        """``key`` spent ``seconds`` of CPU (at ``now``)."""
        share = self._refilled(key, now)
        share.level -= seconds
        share.spent += seconds
        share.charged = now
        self._total += seconds
        self._peak = max(self._peak, seconds)
        self._depth = max(self._depth, seconds)
        if now - self._pruned >= self.window_s:
            self._prune(now)

    def wait_s(self, key: K, now: float) -> float:
        """Seconds ``key`` must wait before its next work starts (0: it may go on)."""
        share = self._shares.get(key)
        if share is None:
            return 0.0
        share = self._refilled(key, now)
        return max(0.0, -share.level) / self.rate

    def spent_s(self, key: K) -> float:
        """CPU seconds charged to ``key`` since it last became active."""
        share = self._shares.get(key)
        return 0.0 if share is None else share.spent

    def forgive(self, key: K) -> None:
        """Fill ``key``'s bucket: it waited while nobody else wanted the CPU, so its debt
        held back no one (and would only grow while it is alone)."""
        share = self._shares.get(key)
        if share is not None:
            share.level = self._depth

    def spent_by_others_s(self, key: K) -> float:
        """CPU seconds charged so far to every key but ``key`` (it grows while others work)."""
        return self._total - self.spent_s(key)

    def _refilled(self, key: K, now: float) -> _Share:
        share = self._shares.get(key)
        if share is None:
            share = self._shares[key] = _Share(self._depth, now, now)
        else:
            earned = max(0.0, now - share.updated) * self.rate
            share.level = min(self._depth, share.level + earned)
            share.updated = now
        return share

    def _prune(self, now: float) -> None:
        """Forget keys idle for ``window_s`` whose debt is paid."""
        self._pruned = now
        self._depth, self._peak = max(self.burst_s, self._peak), 0.0
        for key in [
            key
            for key, share in self._shares.items()
            if now - share.charged >= self.window_s and self._refilled(key, now).level >= 0
        ]:
            del self._shares[key]
