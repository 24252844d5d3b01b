"""Which peers may be asked for a quote: requirements against capabilities, one rule for both
sides (the buyer filters the signed records it holds; a seller checks its own before bidding).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ..identity import PeerId
from ..membership.records import Capabilities, PeerRecord
from .messages import DeclineReason
from .terms import Requirements, Tier, WorkKind

__all__ = ["Match", "ask_for", "match", "unmet"]


def ask_for(capabilities: Capabilities, kind: WorkKind, tier: Tier) -> int | None:
    """The peer's price per unit for ``kind`` in ``tier`` (None: it does not sell it)."""
    return next(
        (a.price for a in capabilities.prices if (a.kind, a.tier) == (kind.value, tier.value)),
        None,
    )


def unmet(
    need: Requirements, caps: Capabilities, *, kind: WorkKind, tier: Tier
) -> DeclineReason | None:
    """The first requirement ``caps`` fails (in the order of :class:`DeclineReason`), or None
    if a peer with these capabilities may bid."""
    held = {offer.name: offer.examples for offer in caps.datasets}
    battery = caps.battery_pct is not None and not caps.charging
    plugged = caps.battery_pct is None or bool(caps.charging)
    accelerator = caps.accelerator == need.accelerator or not need.accelerator
    checks = (
        (ask_for(caps, kind, tier) is None, DeclineReason.KIND),
        (bool(need.dataset) and need.dataset not in held, DeclineReason.DATASET),
        (held.get(need.dataset, 0) < need.min_examples, DeclineReason.MIN_EXAMPLES),
        (bool(need.model) and need.model not in caps.models, DeclineReason.MODEL),
        (not set(need.roles) <= set(caps.roles), DeclineReason.ROLES),
        (caps.memory_mb < need.min_memory_mb, DeclineReason.MEMORY),
        (not accelerator, DeclineReason.ACCELERATOR),
        (battery and (caps.battery_pct or 0) < need.min_battery_pct, DeclineReason.BATTERY),
        (need.unmetered and caps.metered, DeclineReason.METERED),
        (need.charging and not plugged, DeclineReason.CHARGING),
    )  # fmt: skip
    return next((reason for failed, reason in checks if failed), None)


class Match:
    """The peers whose records meet a job's requirements, and how many each requirement
    excluded (for :class:`~meshfed.errors.NoMatchingPeers`)."""

    def __init__(self, peers: list[PeerId], excluded: Counter[str]) -> None:
        self.peers = peers
        self.excluded = excluded


def match(
    records: Iterable[PeerRecord],
    need: Requirements,
    *,
    kind: WorkKind,
    tier: Tier,
    exclude: PeerId | None = None,
) -> Match:
    """The peers of ``records`` (but ``exclude``, the buyer itself) that may bid."""
    peers: list[PeerId] = []
    excluded: Counter[str] = Counter()
    for record in records:
        if record.peer == exclude:
            continue
        reason = unmet(need, record.capabilities, kind=kind, tier=tier)
        if reason is None:
            peers.append(record.peer)
        else:
            excluded[reason.value] += 1
    return Match(peers, excluded)
