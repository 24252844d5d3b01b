"""Token buckets per key (peer), the one rate limiter meshfed uses. Sans-IO: pass ``now``."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["TokenBuckets"]

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
