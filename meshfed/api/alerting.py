"""Alerts evaluated in the node: the conditions of the shipped Prometheus rules
(``alerts.yml``), over samples of the node's state, without Prometheus.

Sans-IO: :meth:`Alerting.observe` takes a :class:`Sample` (its time passed in) and answers the
alerts that started or stopped firing. A condition fires once it has held at every sample for
its rule's ``for_s`` (Prometheus' pending then firing); it clears at the first sample where it
does not hold. Windows (the failure rate's 5 minutes, the accuracy's 30-minute best) are kept
from the samples themselves, so they need samples at least as often as the window is long.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["RULES", "AlertChange", "Alerting", "Rule", "Sample"]


@dataclass(frozen=True)
class Sample:
    """The node's state at one moment (``at``: seconds on any monotonic clock)."""

    at: float
    #: peers membership says are alive (this node excluded)
    alive_peers: int
    #: messages accepted and rejected since start (``node.stats``)
    accepted: int
    rejected: int
    #: the device's temperature from the node's own record, when known
    temperature_c: float | None = None
    #: per job: (epsilon spent, epsilon budget)
    budgets: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    #: per job: the accuracy after its last round
    accuracy: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    """One alert: its name (as in ``alerts.yml``), how long its condition must hold, its
    threshold (the number in the rule's expression) and severity."""

    name: str
    for_s: float
    threshold: float
    severity: str


#: the rules, with the names, durations and thresholds of ``alerts.yml`` (a test compares them)
RULES = (
    Rule("MeshfedTooFewParticipants", for_s=300, threshold=3, severity="warning"),
    Rule("MeshfedHighFailureRate", for_s=600, threshold=0.1, severity="warning"),
    Rule("MeshfedPrivacyBudgetNearlySpent", for_s=0, threshold=0.9, severity="warning"),
    Rule("MeshfedAccuracyDrop", for_s=300, threshold=0.05, severity="warning"),
    Rule("MeshfedNodeOverheating", for_s=120, threshold=75, severity="critical"),
)
_RULE = {rule.name: rule for rule in RULES}

#: the failure rate's window (``rate(...[5m])``) and the accuracy's best (``[30m]``)
RATE_WINDOW_S = 300.0
BEST_WINDOW_S = 1800.0
#: the most jobs whose accuracy is followed (the oldest one is forgotten beyond)
MAX_JOBS = 64


@dataclass(frozen=True)
class AlertChange:
    """An alert that started (``firing``) or stopped firing, for one subject (a job, or
    ``""`` for the node), with a sentence for the operator."""

    name: str
    subject: str
    firing: bool
    severity: str
    summary: str
    at: float


class Alerting:
    """The rules' state over successive samples. See the module docstring."""

    def __init__(self) -> None:
        self._counts: deque[tuple[float, int, int]] = deque()
        self._accuracy: dict[str, deque[tuple[float, float]]] = {}
        #: (rule, subject) -> since when its condition holds
        self._pending: dict[tuple[str, str], float] = {}
        #: (rule, subject) -> the change that made it fire
        self.firing: dict[tuple[str, str], AlertChange] = {}

    def observe(self, sample: Sample) -> list[AlertChange]:
        """Take one sample; the alerts that started or stopped firing with it."""
        holding = self._conditions(sample)
        changes = []
        for key in list(self._pending):
            if key not in holding:
                del self._pending[key]
                fired = self.firing.pop(key, None)
                if fired is not None:
                    changes.append(
                        AlertChange(fired.name, fired.subject, False, fired.severity,
                                    fired.summary, sample.at)
                    )  # fmt: skip
        for key, summary in holding.items():
            since = self._pending.setdefault(key, sample.at)
            rule = _RULE[key[0]]
            if key not in self.firing and sample.at - since >= rule.for_s:
                change = AlertChange(rule.name, key[1], True, rule.severity, summary, sample.at)
                self.firing[key] = change
                changes.append(change)
        return changes

    def _conditions(self, sample: Sample) -> dict[tuple[str, str], str]:
        """Which conditions hold now, each with its sentence."""
        holding: dict[tuple[str, str], str] = {}

        def above(name: str, subject: str, value: float, text: str) -> None:
            if value > _RULE[name].threshold:
                holding[(name, subject)] = text

        if sample.alive_peers < _RULE["MeshfedTooFewParticipants"].threshold:
            holding[("MeshfedTooFewParticipants", "")] = (
                f"{sample.alive_peers} live peers: fewer than 3, jobs cannot find a roster"
            )
        rate = self._failure_rate(sample)
        above(
            "MeshfedHighFailureRate", "", rate,
            f"{rate:.0%} of what peers sent in the last 5 min was rejected",
        )  # fmt: skip
        if sample.temperature_c is not None:
            above(
                "MeshfedNodeOverheating", "", sample.temperature_c,
                f"the device is at {sample.temperature_c:.0f} degrees",
            )  # fmt: skip
        for job, (spent, budget) in sample.budgets.items():
            share = spent / budget if budget > 0 else 0.0
            above(
                "MeshfedPrivacyBudgetNearlySpent", job, share,
                f"job {job} has spent {share:.0%} of its privacy budget",
            )  # fmt: skip
        for job, (best, now) in self._accuracy_best(sample).items():
            above(
                "MeshfedAccuracyDrop", job, best - now,
                f"job {job}: accuracy {now:.3f}, {best - now:.3f} below its 30-min best",
            )  # fmt: skip
        return holding

    def _failure_rate(self, sample: Sample) -> float:
        counts = self._counts
        counts.append((sample.at, sample.accepted, sample.rejected))
        while counts[0][0] < sample.at - RATE_WINDOW_S:
            counts.popleft()
        _, accepted, rejected = counts[0]
        received = (sample.accepted - accepted) + (sample.rejected - rejected)
        return (sample.rejected - rejected) / received if received > 0 else 0.0

    def _accuracy_best(self, sample: Sample) -> dict[str, tuple[float, float]]:
        found = {}
        for job, accuracy in sample.accuracy.items():
            history = self._accuracy.pop(job, None) or deque()
            self._accuracy[job] = history  # most recently seen last
            history.append((sample.at, accuracy))
            while history[0][0] < sample.at - BEST_WINDOW_S:
                history.popleft()
            found[job] = (max(a for _, a in history), accuracy)
        while len(self._accuracy) > MAX_JOBS:
            del self._accuracy[next(iter(self._accuracy))]
        return found
