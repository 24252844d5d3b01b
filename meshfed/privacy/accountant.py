"""A persistent privacy accountant per peer and job, over Google's dp-accounting (RDP).

The accountant records each privacy event a peer's data took part in (a Gaussian mechanism
with some noise multiplier, optionally Poisson-subsampled) and answers ``epsilon()`` at the
job's delta with dp-accounting's Renyi-DP accountant, so the figure is dp-accounting's own.
``would_exceed(event)`` asks before spending; ``charge(round, event)`` records a round's release
(once per round); ``state_dict()`` / ``load_state_dict()`` keep the spent budget and the charged
rounds across restarts (the events, replayed into a fresh accountant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dp_accounting
from dp_accounting import rdp

__all__ = ["GaussianEvent", "PrivacyAccountant", "calibrate_noise"]


@dataclass(frozen=True, slots=True)
class GaussianEvent:
    """One release through a Gaussian mechanism: noise std = ``noise_multiplier`` x the
    sensitivity, the data sampled with probability ``sampling_rate`` (1: always)."""

    noise_multiplier: float
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or not 0 < self.sampling_rate <= 1:
            raise ValueError("noise_multiplier > 0 and 0 < sampling_rate <= 1")

    def as_dp_event(self) -> dp_accounting.DpEvent:
        """The same event for dp-accounting."""
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate == 1.0:
            return gaussian
        return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)


class PrivacyAccountant:
    """Spent privacy of one peer in one job, against a budget of ``(epsilon, delta)``."""

    def __init__(self, *, budget_epsilon: float, delta: float) -> None:
        if not budget_epsilon > 0 or not 0 < delta < 1:
            raise ValueError("budget_epsilon > 0 and 0 < delta < 1")
        self.budget_epsilon = budget_epsilon
        self.delta = delta
        self._events: list[tuple[GaussianEvent, int]] = []
        self._rounds: set[int] = set()

    def _epsilon_of(self, events: list[tuple[GaussianEvent, int]]) -> float:
        accountant = rdp.RdpAccountant()
        for event, count in events:
            accountant.compose(event.as_dp_event(), count)
        return float(accountant.get_epsilon(self.delta))

    def compose(self, event: GaussianEvent, count: int = 1) -> None:
        """Record that this peer's data went through ``event`` ``count`` times."""
        if count < 1:
            raise ValueError("count must be at least 1")
        self._events.append((event, count))

    def charge(self, round: int, event: GaussianEvent, count: int = 1) -> None:
        """Record round ``round``'s release: ``event``, ``count`` times. One charge per round:
        a round charged once (then maybe released before a crash) is never charged again."""
        if round in self._rounds:
            raise ValueError(f"round {round} is already charged")
        self.compose(event, count)
        self._rounds.add(round)

    def charged(self, round: int) -> bool:
        """Whether round ``round`` was charged (its release may have happened)."""
        return round in self._rounds

    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta` (0 before any event)."""
        return self._epsilon_of(self._events) if self._events else 0.0

    def would_exceed(self, event: GaussianEvent, count: int = 1) -> bool:
        """Whether recording ``event`` would take epsilon past the budget."""
        return self._epsilon_of([*self._events, (event, count)]) > self.budget_epsilon

    def state_dict(self) -> dict[str, Any]:
        """What to persist: the budget and every event so far."""
        return {
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "events": [[e.noise_multiplier, e.sampling_rate, count] for e, count in self._events],
            "rounds": sorted(self._rounds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.budget_epsilon = float(state["budget_epsilon"])
        self.delta = float(state["delta"])
        self._events = [(GaussianEvent(m, q), int(c)) for m, q, c in state["events"]]
        self._rounds = {int(r) for r in state.get("rounds", [])}


def calibrate_noise(
    *, epsilon: float, delta: float, sampling_rate: float, count: int, most: float = 100.0
) -> float:
    """The least noise multiplier (within 1 %) with which ``count`` Gaussian events at
    ``sampling_rate`` spend at most ``epsilon`` at ``delta`` (dp-accounting's RDP, bisection).

    Raises:
        ValueError: not even ``most`` fits the budget.
    """

    def spent(noise_multiplier: float) -> float:
        accountant = rdp.RdpAccountant()
        event = GaussianEvent(noise_multiplier, sampling_rate=sampling_rate)
        accountant.compose(event.as_dp_event(), count)
        return float(accountant.get_epsilon(delta))

    low, high = 0.1, most
    if spent(high) > epsilon:
        raise ValueError(f"{count} releases do not fit epsilon {epsilon} even at noise {most}")
    while high - low > 0.01 * low:
        middle = (low + high) / 2
        low, high = (low, middle) if spent(middle) <= epsilon else (middle, high)
    return high
