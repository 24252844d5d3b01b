"""Views of the node's state shared by the REST routes and the live dashboard's stream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .models import BudgetOut, PeerOut

if TYPE_CHECKING:
    from ..node import Node
    from ..store import Store

__all__ = ["budgets", "peer_out", "peer_records"]


def peer_out(node: Node, record: Any) -> PeerOut:
    """A peer's signed record with membership's verdict and what talking to it showed."""
    caps = record.capabilities
    link = node.links.get(record.peer)
    state = None if node.membership is None else node.membership.swim.state(record.peer)
    return PeerOut(
        peer_id=str(record.peer),
        state="unknown" if state is None else state.name.lower(),
        addrs=list(record.addrs),
        roles=list(caps.roles),
        battery_pct=caps.battery_pct,
        charging=caps.charging,
        temperature_c=caps.temperature_c,
        metered=caps.metered,
        datasets=[offer.name for offer in caps.datasets],
        prices=[{"kind": a.kind, "tier": a.tier, "price": a.price} for a in caps.prices],
        rtt_ms=None if link is None or link.rtt_s is None else round(link.rtt_s * 1000, 3),
        failures=0 if link is None else link.failures,
    )


def peer_records(node: Node) -> list[Any]:
    """Every other peer's record membership holds (none without membership)."""
    if node.membership is None:
        return []
    return [r for r in node.membership.table.peers(None) if r.peer != node.peer_id]


def budgets(db: Store) -> list[BudgetOut]:
    """The privacy budget of each job trained with differential privacy (a store read); none
    where the train extra (dp-accounting) is not installed."""
    found = []
    for record in db.jobs():
        state = db.privacy(record.job_id)
        if state is None:
            continue
        try:  # dp-accounting: only where a job trained with a privacy budget
            from ..privacy.accountant import PrivacyAccountant
        except ImportError:  # trained before the train extra went: not readable here
            continue
        accountant = PrivacyAccountant(budget_epsilon=1.0, delta=0.5)
        accountant.load_state_dict(state)
        found.append(
            BudgetOut(
                job_id=record.job_id,
                budget_epsilon=accountant.budget_epsilon,
                delta=accountant.delta,
                spent_epsilon=accountant.epsilon(),
                rounds_charged=len(state.get("rounds", [])),
            )
        )
    return found
