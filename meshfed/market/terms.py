"""The market's shared vocabulary: kinds of work, tiers, amounts and requirements.

Amounts are integers in micro-credits (:data:`MICRO` per credit), never floats, so ledgers on
different peers agree to the last unit. A *unit* of work is one peer-round of training or one
inference request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..codec import bounded
from ..membership.records import Role

__all__ = [
    "MAX_AMOUNT",
    "MICRO",
    "Requirements",
    "Tier",
    "TierRange",
    "WorkKind",
    "credits",
    "tier_range",
]

#: micro-credits per credit
MICRO = 1_000_000
#: the largest amount anything in the market holds (fits the codec's int64 with room to add)
MAX_AMOUNT = 2**53


def credits(amount: int) -> str:
    """``amount`` micro-credits as credits for people: ``12.5`` for 12_500_000."""
    whole, micro = divmod(abs(amount), MICRO)
    sign = "-" if amount < 0 else ""
    return f"{sign}{whole}.{micro:06d}".rstrip("0").rstrip(".")


class WorkKind(enum.StrEnum):
    """What a job buys."""

    TRAINING = "training"
    INFERENCE = "inference"


class Tier(enum.StrEnum):
    """How big a job is, which picks its auction's scoring and its defaults (SPEC "Tiers")."""

    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"
    ENTERPRISE = "enterprise"


@dataclass(frozen=True, slots=True)
class TierRange:
    """The number of winners a tier is meant for (``most`` None: no upper end)."""

    least: int
    most: int | None


_RANGES = {
    Tier.SMALL: TierRange(1, 10),
    Tier.MEDIUM: TierRange(10, 50),
    Tier.LARGE: TierRange(50, 500),
    Tier.ENTERPRISE: TierRange(500, None),
}


def tier_range(tier: Tier) -> TierRange:
    """The peer counts ``tier`` is for."""
    return _RANGES[tier]


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a peer must offer to be asked for a quote (matched against its signed record).

    Attributes:
        dataset: the data set each winner trains on, by the name it registered ("" none).
        min_examples: the fewest examples of ``dataset`` a winner holds.
        model: for inference, the model a winner hosts ("" none).
        roles: roles a winner offers (:class:`~meshfed.membership.records.Role` values).
        min_memory_mb: the least memory a winner reports.
        accelerator: an accelerator kind a winner must have ("" any or none).
        min_battery_pct: the least battery charge (peers without a battery pass).
        unmetered: only peers whose network is not metered.
        charging: only peers that are charging (or have no battery).
    """

    dataset: str = bounded(max_len=128, default="")
    min_examples: int = bounded(ge=0, le=2**40, default=0)
    model: str = bounded(max_len=128, default="")
    roles: list[str] = bounded(max_len=8, default_factory=lambda: [Role.TRAINER.value])
    min_memory_mb: int = bounded(ge=0, le=2**40, default=0)
    accelerator: str = bounded(max_len=64, default="")
    min_battery_pct: int = bounded(ge=0, le=100, default=0)
    unmetered: bool = bounded(default=False)
    charging: bool = bounded(default=False)

    def __post_init__(self) -> None:
        known = {role.value for role in Role}
        unknown = [role for role in self.roles if role not in known]
        if unknown:
            raise ValueError(f"unknown roles {unknown}; known: {sorted(known)}")
