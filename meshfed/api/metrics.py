"""``/metrics``: the node in Prometheus' text format, from a registry of its own.

Counters are read from the node at each scrape (``node.stats``, membership, the market's jobs),
so a scrape agrees with ``node.stats`` exactly; round and phase durations are histograms fed
by the market's reports of the work this node leased. Names: see the SPEC section on the API.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["CONTENT_TYPE", "NodeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _NodeCollector(Collector):
    """What the node counts, read at each scrape."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node, stats = self._node, self._node.stats
        accepted = CounterMetricFamily(
            "meshfed_messages_accepted", "Messages accepted, by type.", labels=["type"]
        )
        for kind, count in sorted(stats.accepted.items()):
            accepted.add_metric([kind], count)
        yield accepted
        rejected = CounterMetricFamily(
            "meshfed_messages_rejected",
            "Frames and messages rejected, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(stats.rejected.items()):
            rejected.add_metric([str(reason)], count)
        yield rejected
        yield CounterMetricFamily("meshfed_bytes_in", "Bytes received.", value=stats.bytes_in)
        yield CounterMetricFamily("meshfed_bytes_out", "Bytes sent.", value=stats.bytes_out)
        yield CounterMetricFamily(
            "meshfed_handshakes_abandoned",
            "Sealed connections the dialer closed before its handshake was done.",
            value=stats.abandoned,
        )
        yield GaugeMetricFamily(
            "meshfed_connected_peers",
            "Peers with an open connection.",
            value=len(node.transport.connected_peers()),
        )
        yield from self._membership()
        yield from self._market()

    def _membership(self) -> Iterator[Metric]:
        membership = self._node.membership
        if membership is None:
            return
        states: dict[str, int] = {"alive": 0, "suspect": 0, "dead": 0, "unknown": 0}
        for record in membership.table.peers(None):
            if record.peer != self._node.peer_id:
                state = membership.swim.state(record.peer)
                states["unknown" if state is None else state.name.lower()] += 1
        peers = GaugeMetricFamily("meshfed_peers", "Peers known, by state.", labels=["state"])
        for name, count in states.items():
            peers.add_metric([name], count)
        yield peers
        own = membership.table.get(self._node.peer_id)
        if own is None:
            return
        caps = own.capabilities
        readings: dict[str, tuple[str, float | None]] = {
            "battery_pct": ("Battery charge, percent.", caps.battery_pct),
            "charging": ("1 while charging.", None if caps.charging is None else caps.charging),
            "temperature_celsius": ("Device temperature.", caps.temperature_c),
            "metered": ("1 on a metered link.", caps.metered),
        }
        for name, (text, value) in readings.items():
            if value is not None:
                yield GaugeMetricFamily(f"meshfed_device_{name}", text, value=float(value))

    def _market(self) -> Iterator[Metric]:
        market = self._node.market
        if market is None:
            return
        awards = CounterMetricFamily(
            "meshfed_market_awards",
            "Leases awarded by the jobs this node bought (since start).",
        )
        price = GaugeMetricFamily(
            "meshfed_market_award_price_micro",
            "Price per unit of the last award, by job.",
            labels=["job"],
        )
        total = 0
        for job_id, handle in market.jobs.items():
            last = None
            for event in handle.events:
                if event["event"] == "award":
                    total += 1
                    last = event["price"]
            if last is not None:
                price.add_metric([job_id], last)
        awards.add_metric([], total)
        yield awards
        yield price
        yield GaugeMetricFamily(
            "meshfed_market_leases_held",
            "Leases this node works on as a seller.",
            value=len(market.work),
        )


class NodeMetrics:
    """The per-node registry: the collector, the round histograms and the budget gauges."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_NodeCollector(node))
        self.rounds = Counter(
            "meshfed_rounds", "Training rounds done, by job.", ["job"], registry=self.registry
        )
        self.rounds_without_data = Counter(
            "meshfed_rounds_without_data",
            "Rounds run without this node's data (budget spent).",
            ["job"],
            registry=self.registry,
        )
        self.round_seconds = Histogram(
            "meshfed_round_seconds",
            "Duration of a training round.",
            buckets=_ROUND_BUCKETS,
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "meshfed_round_phase_seconds",
            "Duration of a round's phases (local, averaging).",
            ["phase"],
            buckets=_ROUND_BUCKETS,
            registry=self.registry,
        )
        self.accuracy = Gauge(
            "meshfed_round_accuracy",
            "Accuracy after the last round, by job.",
            ["job"],
            registry=self.registry,
        )
        self.epsilon = Gauge(
            "meshfed_privacy_epsilon_spent",
            "Privacy budget spent (epsilon), by job.",
            ["job"],
            registry=self.registry,
        )
        self.budget = Gauge(
            "meshfed_privacy_epsilon_budget",
            "Privacy budget (epsilon), by job.",
            ["job"],
            registry=self.registry,
        )
        if node.market is not None:
            node.market.observers.append(self.observe)

    def observe(self, event: str, document: dict[str, Any]) -> None:
        """A market observer: a round of leased work, as its report says."""
        if event != "round":
            return
        job = str(document.get("job_id", ""))
        seconds = float(document.get("seconds", 0.0))
        averaging = float(document.get("averaging_s", 0.0))
        self.rounds.labels(job).inc()
        if document.get("contributed") is False:
            self.rounds_without_data.labels(job).inc()
        self.round_seconds.observe(seconds)
        self.phase_seconds.labels("local").observe(max(0.0, seconds - averaging))
        self.phase_seconds.labels("averaging").observe(averaging)
        self.accuracy.labels(job).set(float(document.get("accuracy", 0.0)))
        self.epsilon.labels(job).set(float(document.get("epsilon", 0.0)))

    def _budgets(self) -> dict[str, float]:
        store = self._node.store
        if store is None:
            return {}
        found = {}
        for record in store.jobs():
            state = store.privacy(record.job_id)
            if state is not None:
                found[record.job_id] = float(state["budget_epsilon"])
        return found

    async def scrape(self) -> bytes:
        """The exposition text (the store's budgets read in a worker thread)."""
        budgets = await trio.to_thread.run_sync(self._budgets)
        for job, epsilon in budgets.items():
            self.budget.labels(job).set(epsilon)
        return generate_latest(self.registry)  # on the loop: the counters change there
