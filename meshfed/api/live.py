"""What the live dashboard shows, and the node's own alerts: one task beside the API.

:class:`LiveView` follows the node: the rounds of its leased work as the market reports them
(accuracy and loss per round: the curves), the jobs it bought as their roster reports them
(accuracy per round paid), and every ``interval_s`` a snapshot of the rest (peers, device,
jobs, privacy budgets, asks and awards, the ledger, messages accepted and rejected, alerts)
published on its :class:`~.stream.Feed` while a client watches. Every ``alert_every`` ticks it
reads the store (budgets, the ledger: in a worker thread; snapshots show the last read) and
samples the node for :class:`~.alerting.Alerting`, watched or not: alerts are logged and
streamed.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from ..errors import StoreError
from .alerting import AlertChange, Alerting, Sample
from .stream import Feed, frame
from .views import budgets, peer_out, peer_records

if TYPE_CHECKING:
    from ..node import Node
    from .models import BudgetOut

__all__ = ["LiveView"]

log = logging.getLogger(__name__)

#: points kept per curve, and curves kept (the oldest job's is dropped beyond)
MAX_POINTS = 2000
MAX_CURVES = 32


def _number(value: Any) -> float | None:
    """A finite float for JSON, or None (NaN and infinities are not JSON)."""
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


class LiveView:
    """The dashboard's state of one node and the task that keeps it (see the module)."""

    def __init__(self, node: Node, *, interval_s: float = 1.0, alert_every: int = 5) -> None:
        self.node = node
        self.interval_s = interval_s
        self.alert_every = alert_every
        self.feed = Feed()
        self.alerting = Alerting()
        #: job -> its points ``{round, accuracy, loss, epsilon, at}``, oldest first
        self.curves: dict[str, deque[dict[str, Any]]] = {}
        self._snapshot: dict[str, Any] | None = None
        self._budgets: list[BudgetOut] = []
        self._accounts: dict[str, int] = {}
        if node.market is not None:
            node.market.observers.append(self.observe)

    # -- what happens ---------------------------------------------------------------------------

    def observe(self, event: str, document: dict[str, Any]) -> None:
        """A market observer: each round of leased work is a point of its job's curve."""
        if event == "round":
            self._point(
                str(document.get("job_id", "")),
                round=document.get("round"),
                accuracy=document.get("accuracy"),
                loss=document.get("loss"),
                epsilon=document.get("epsilon"),
            )

    def _point(self, job: str, **values: Any) -> None:
        if not isinstance(values["round"], int):
            return
        point = {"job": job, "at": trio.current_time(), "round": values.pop("round")}
        point |= {name: _number(value) for name, value in values.items()}
        curve = self.curves.pop(job, None) or deque(maxlen=MAX_POINTS)
        self.curves[job] = curve  # the last updated last: the oldest is dropped first
        while len(self.curves) > MAX_CURVES:
            del self.curves[next(iter(self.curves))]
        if curve and curve[-1]["round"] == point["round"]:
            return
        curve.append(point)
        self.feed.publish("round", point)

    def _bought_rounds(self) -> None:
        """The jobs this node bought: a point per round its roster reported."""
        if self.node.market is None:
            return
        for job_id, handle in self.node.market.jobs.items():
            report = handle.report
            if report is not None and report.round > 0:
                self._point(job_id, round=report.round, accuracy=report.accuracy, loss=None,
                            epsilon=None)  # fmt: skip

    # -- the task -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Snapshot while watched, sample for alerts always; until cancelled."""
        task_status.started()
        tick = 0
        while True:
            await self.refresh(trio.current_time(), sample=tick % self.alert_every == 0)
            tick += 1
            await trio.sleep(self.interval_s)

    async def refresh(self, now: float, *, sample: bool) -> None:
        """One tick at ``now``: the bought jobs' new rounds; with ``sample``, the alerts; a
        snapshot if a client watches."""
        self._bought_rounds()
        if sample:
            await self._read_store()
            self._alert(self._sample(now))
        if self.feed.clients:
            self._snapshot = self.snapshot()
            self.feed.publish("snapshot", self._snapshot)

    def start(self) -> Iterator[bytes]:
        """What a new client gets first: every curve, then the last snapshot."""
        yield frame("curves", {job: list(points) for job, points in self.curves.items()})
        yield frame("snapshot", self._snapshot or self.snapshot())

    async def _read_store(self) -> None:
        node = self.node
        if node.store is None:
            return
        market = node.market

        def read() -> tuple[list[BudgetOut], dict[str, int]]:
            assert node.store is not None
            return budgets(node.store), {} if market is None else market.ledger.accounts()

        try:
            self._budgets, self._accounts = await trio.to_thread.run_sync(read)
        except StoreError:  # closed: the node is stopping; shown as last read
            return
        except OSError as exc:  # out of descriptors (a flood), say: shown as last read
            log.warning("the live view could not read the store", extra={"error": str(exc)})

    # -- alerts ---------------------------------------------------------------------------------

    def _own_temperature(self) -> float | None:
        membership = self.node.membership
        own = None if membership is None else membership.table.get(self.node.peer_id)
        return None if own is None else own.capabilities.temperature_c

    def _sample(self, now: float) -> Sample:
        records = peer_records(self.node)
        alive = sum(1 for r in records if peer_out(self.node, r).state == "alive")
        stats = self.node.stats
        accuracy = {
            job: curve[-1]["accuracy"]
            for job, curve in self.curves.items()
            if curve and curve[-1]["accuracy"] is not None
        }
        return Sample(
            at=now,
            alive_peers=alive,
            accepted=sum(stats.accepted.values()),
            rejected=sum(stats.rejected.values()),
            temperature_c=self._own_temperature(),
            budgets={b.job_id: (b.spent_epsilon, b.budget_epsilon) for b in self._budgets},
            accuracy=accuracy,
        )

    def _alert(self, sample: Sample) -> None:
        for change in self.alerting.observe(sample):
            fields = {"alert": change.name, "subject": change.subject, "summary": change.summary}
            if change.firing:
                log.warning("alert firing", extra=fields | {"severity": change.severity})
            else:
                log.info("alert cleared", extra=fields)
            self.feed.publish("alert", _alert_out(change))

    # -- the snapshot ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The node now, JSON-ready (store reads: as of the last tick)."""
        node = self.node
        status = node.status()
        peers = [peer_out(node, record).model_dump() for record in peer_records(node)]
        return {
            "node": {
                "peer_id": status["peer_id"],
                "listen": status["listen"],
                "uptime_s": status["uptime_s"],
                "connected": len(node.transport.connected_peers()),
                "device": self._device(),
            },
            "peers": peers,
            "jobs": self._jobs(),
            "budgets": [b.model_dump() for b in self._budgets],
            "market": {
                "asks": [{"peer_id": p["peer_id"], **ask} for p in peers for ask in p["prices"]],
                "awards": self._awards(),
                "accounts": self._accounts,
            },
            "stats": status["stats"],
            "alerts": [_alert_out(change) for change in self.alerting.firing.values()],
        }

    def _device(self) -> dict[str, Any] | None:
        device = self.node.device
        if device is None:
            return None
        readings = device.readings
        return {
            "battery_pct": readings.battery_pct,
            "charging": readings.charging,
            "temperature_c": _number(readings.temperature_c),
            "metered": readings.metered,
            "allows_work": device.allows_work(),
        }

    def _jobs(self) -> list[dict[str, Any]]:
        market = self.node.market
        if market is None:
            return []
        jobs = []
        for job_id, handle in market.jobs.items():
            status = handle.status()
            jobs.append({
                "job_id": job_id, "role": "buyer", "state": status["state"],
                "round": status["rounds_done"], "rounds": status["rounds"],
                "accuracy": _number(status["accuracy"]), "peers": len(status["roster"]),
            })  # fmt: skip
        for job_id, work in market.work.items():
            report = work.report
            jobs.append({
                "job_id": job_id, "role": "seller", "state": work.state,
                "round": work.round, "rounds": work.start.units,
                "accuracy": None if report is None else _number(report.accuracy),
                "peers": None,
            })  # fmt: skip
        return jobs

    def _awards(self) -> list[dict[str, Any]]:
        market = self.node.market
        if market is None:
            return []
        return [
            {"job_id": job_id, "peer_id": event.get("peer"), "price": event.get("price")}
            for job_id, handle in market.jobs.items()
            for event in handle.events
            if event.get("event") == "award"
        ]


def _alert_out(change: AlertChange) -> dict[str, Any]:
    return {
        "name": change.name,
        "subject": change.subject,
        "firing": change.firing,
        "severity": change.severity,
        "summary": change.summary,
    }
