"""The node's own alerts: each of ``alerts.yml``'s conditions, with its duration and threshold,
evaluated over samples without Prometheus."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from meshfed.api.alerting import RULES, Alerting, Sample

QUIET = {"alive_peers": 5, "accepted": 0, "rejected": 0}


def run(samples: list[dict[str, Any]]) -> list[tuple[float, str, str, bool]]:
    """Feed ``samples`` (fields over a quiet node's); the changes as (at, name, subject,
    firing)."""
    alerting = Alerting()
    return [
        (c.at, c.name, c.subject, c.firing)
        for sample in samples
        for c in alerting.observe(Sample(**(QUIET | sample)))
    ]


def every(step: float, until: float, start: float = 0, **fields: Any) -> list[dict[str, Any]]:
    """Samples every ``step`` seconds from ``start`` to ``start + until``, with ``fields``."""
    return [{"at": start + i * step, **fields} for i in range(int(until / step) + 1)]


def test_too_few_participants_fires_after_five_minutes_and_clears_when_peers_return() -> None:
    few = every(10, 300, alive_peers=2)
    assert run(few[:-1]) == []  # 290 s: still pending
    changes = run([*few, {"at": 310, "alive_peers": 3}])
    assert changes == [
        (300, "MeshfedTooFewParticipants", "", True),
        (310, "MeshfedTooFewParticipants", "", False),
    ]


def test_a_gap_in_the_condition_restarts_its_clock() -> None:
    samples = [*every(10, 200, alive_peers=1), {"at": 210}]
    samples += [{"at": 220 + s["at"], "alive_peers": 1} for s in every(10, 290)]
    assert run(samples) == []  # never 300 s in a row


def test_high_failure_rate_counts_the_last_five_minutes_for_ten() -> None:
    # 20 % of what arrives is rejected for 11 minutes, then only good messages
    bad = [{"at": t, "accepted": 8 * t, "rejected": 2 * t} for t in range(0, 661, 10)]
    good = [{"at": t, "accepted": 8 * 660 + 10 * (t - 660), "rejected": 2 * 660}
            for t in range(670, 1000, 10)]  # fmt: skip
    changes = run(bad + good)
    # a rate needs two samples: the condition holds from the second (10 s) on
    assert changes[0] == (610, "MeshfedHighFailureRate", "", True)
    cleared = changes[1]
    # the rate over 5 minutes falls below 10 % once half of the window is clean
    assert cleared[1:] == ("MeshfedHighFailureRate", "", False) and 800 <= cleared[0] <= 830


def test_rejects_below_ten_percent_raise_nothing() -> None:
    assert run([{"at": t, "accepted": 10 * t, "rejected": t} for t in range(0, 1300, 10)]) == []


def test_a_nearly_spent_privacy_budget_fires_at_once_per_job() -> None:
    changes = run([
        {"at": 0, "budgets": {"a": (0.5, 1.0), "b": (0.95, 1.0)}},
        {"at": 1, "budgets": {"a": (0.91, 1.0), "b": (0.95, 1.0)}},
    ])  # fmt: skip
    assert changes == [
        (0, "MeshfedPrivacyBudgetNearlySpent", "b", True),
        (1, "MeshfedPrivacyBudgetNearlySpent", "a", True),
    ]


def test_an_accuracy_drop_below_the_half_hour_best_fires_after_five_minutes() -> None:
    samples = [{"at": 0, "accuracy": {"j": 0.9}}, *every(30, 300, start=30, accuracy={"j": 0.8})]
    assert run(samples) == [(330, "MeshfedAccuracyDrop", "j", True)]
    # a best older than 30 minutes is forgotten: the same accuracy later is no drop
    late = [*samples, *every(60, 600, start=1801, accuracy={"j": 0.8})]
    assert run(late)[-1] == (1801, "MeshfedAccuracyDrop", "j", False)


def test_a_small_dip_is_no_accuracy_drop() -> None:
    samples = [{"at": 0, "accuracy": {"j": 0.9}}, *every(30, 900, start=30, accuracy={"j": 0.86})]
    assert run(samples) == []


def test_overheating_fires_after_two_minutes_and_never_without_a_sensor() -> None:
    assert run(every(10, 120, temperature_c=80.0)) == [(120, "MeshfedNodeOverheating", "", True)]
    assert run(every(10, 600, temperature_c=75.0)) == []  # at the limit: not above it
    assert run(every(10, 600, temperature_c=None)) == []


def _rules_file() -> dict[str, dict[str, Any]]:
    text = resources.files("meshfed.api").joinpath("alerts.yml").read_text()
    return {rule["alert"]: rule for rule in yaml.safe_load(text)["groups"][0]["rules"]}


def _seconds(duration: str | None) -> float:
    if duration is None:
        return 0
    number, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()  # type: ignore[union-attr]
    return int(number) * {"s": 1, "m": 60, "h": 3600}[unit]


def test_the_node_evaluates_the_shipped_prometheus_rules() -> None:
    shipped = _rules_file()
    assert sorted(shipped) == sorted(rule.name for rule in RULES)
    for rule in RULES:
        prometheus = shipped[rule.name]
        assert _seconds(prometheus.get("for")) == rule.for_s, rule.name
        assert prometheus["labels"]["severity"] == rule.severity, rule.name
        threshold = re.search(r"[<>]\s*([0-9.]+)\s*$", prometheus["expr"].strip())
        assert threshold is not None and float(threshold.group(1)) == rule.threshold, rule.name


samples = st.builds(
    dict,
    alive_peers=st.integers(0, 10),
    accepted=st.integers(0, 10**6),
    rejected=st.integers(0, 10**6),
    temperature_c=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    budgets=st.dictionaries(st.sampled_from("ab"), st.tuples(st.floats(), st.floats())),
    accuracy=st.dictionaries(st.sampled_from("ab"), st.floats()),
)


@given(st.lists(st.tuples(st.floats(0, 1000), samples), max_size=30))
def test_any_samples_give_alternating_changes_and_a_consistent_firing_set(
    steps: list[tuple[float, dict[str, Any]]],
) -> None:
    alerting, at, last = Alerting(), 0.0, {}
    for step, fields in steps:
        at += step
        for change in alerting.observe(Sample(at=at, **fields)):
            key = (change.name, change.subject)
            assert last.get(key, False) != change.firing  # raised, then cleared, then raised
            last[key] = change.firing
    assert set(alerting.firing) == {key for key, firing in last.items() if firing}
