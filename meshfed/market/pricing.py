"""Prices: the asks a seller publishes in its record, and the buyer's estimate of a job.

A seller's ask for one kind of work in one tier (SPEC "Pricing") is, in micro-credits per unit
at the reference model size (:data:`REFERENCE_PARAMS`)::

    ask = ceil(base[kind] * (1 - tier_discount[tier]) * load_f * battery_f * heat_f * demand_f)

    load_f    = 1 + load_premium * load                      (load = running leases / capacity)
    battery_f = 1 + battery_premium * (100 - battery_pct) / 100   (on battery, not charging)
    heat_f    = 1 + heat_premium * clamp((t - warm_c) / (hot_c - warm_c), 0, 1)
    demand_f  = 1 + demand_premium * d / (d + demand_scale)  (d = RFQs seen per minute)

Each factor is at least 1 and never falls when its condition worsens, so more load, less
battery, more heat or more demand never lower an ask. A device at its limits (load >= 1,
battery below ``min_battery_pct`` while not charging, ``t >= hot_c``) asks :data:`PROHIBITIVE`
instead of claiming less capacity than it has: it stays truthful and simply never wins.

The buyer's estimate takes, in this order, the median of recent clearing prices for the kind
and tier, else the median of the asks seen in peer records for them, else the default price
less the tier's discount, and multiplies by units and participants.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import BudgetTooLow, ConfigError
from ..membership.records import PriceAsk
from .terms import MAX_AMOUNT, Tier, WorkKind, credits

__all__ = [
    "DEFAULT_PRICES",
    "PROHIBITIVE",
    "REFERENCE_PARAMS",
    "AskPolicy",
    "Conditions",
    "Estimate",
    "asks",
    "check_budget",
    "estimate",
    "tier_discount",
    "unit_price",
]

#: the ask of a device at its limits: more than any budget holds
PROHIBITIVE = MAX_AMOUNT
#: the model size (parameters) asks are quoted for; :func:`unit_price` scales from it
REFERENCE_PARAMS = 1_000_000
#: micro-credits per unit when nothing better is known: a peer-round, an inference request
DEFAULT_PRICES: Mapping[WorkKind, int] = MappingProxyType(
    {WorkKind.TRAINING: 10_000, WorkKind.INFERENCE: 1_000}
)

_TIER_DISCOUNTS = {Tier.SMALL: 0.0, Tier.MEDIUM: 0.05, Tier.LARGE: 0.10, Tier.ENTERPRISE: 0.15}


def tier_discount(tier: Tier) -> float:
    """The volume discount of ``tier`` on the default price (a share in [0, 1))."""
    return _TIER_DISCOUNTS[Tier(tier)]


@dataclass(frozen=True, slots=True, kw_only=True)
class AskPolicy:
    """How a seller prices its work; every knob can be set, all are checked at construction.

    Attributes:
        base: micro-credits per unit per kind at the reference model size, before any factor.
            A kind left out is not offered.
        tier_discounts: the share off ``base`` per tier (default: :func:`tier_discount`).
        load_premium: the ask at full load is ``1 + load_premium`` times the idle ask.
        battery_premium: the ask on an empty battery is ``1 + battery_premium`` times a full one.
        min_battery_pct: below this, on battery, the ask is :data:`PROHIBITIVE`.
        warm_c, hot_c: heat starts to cost at ``warm_c``; at ``hot_c`` the ask is prohibitive.
        heat_premium: the ask just below ``hot_c`` is ``1 + heat_premium`` times a cool one.
        demand_premium, demand_scale: demand adds up to ``demand_premium``, half of it at
            ``demand_scale`` RFQs per minute.
    """

    base: dict[WorkKind, int] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    tier_discounts: dict[Tier, float] = field(default_factory=lambda: dict(_TIER_DISCOUNTS))
    load_premium: float = 1.0
    battery_premium: float = 1.0
    min_battery_pct: int = 20
    warm_c: float = 45.0
    hot_c: float = 80.0
    heat_premium: float = 1.0
    demand_premium: float = 0.5
    demand_scale: float = 10.0

    def __post_init__(self) -> None:
        for kind, price in self.base.items():
            WorkKind(kind)
            if (
                isinstance(price, bool)
                or not isinstance(price, int)
                or not 0 <= price <= MAX_AMOUNT
            ):
                raise ConfigError(
                    f"ask_policy.base[{kind}]: {price!r} is not micro-credits in [0, {MAX_AMOUNT}]"
                )
        for tier in Tier:
            share = self.tier_discounts.get(tier)
            if share is None:
                raise ConfigError(f"ask_policy.tier_discounts[{tier}]: missing (give every tier)")
            if not 0.0 <= share < 1.0:
                raise ConfigError(
                    f"ask_policy.tier_discounts[{tier}]: {share!r} is not a share in [0, 1)"
                )
        for name in ("load_premium", "battery_premium", "heat_premium", "demand_premium"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"ask_policy.{name}: {value!r} is not a finite premium >= 0")
        if not 0 <= self.min_battery_pct <= 100:
            raise ConfigError(
                f"ask_policy.min_battery_pct: {self.min_battery_pct} outside [0, 100]"
            )
        if not (
            math.isfinite(self.warm_c) and math.isfinite(self.hot_c) and self.warm_c < self.hot_c
        ):
            raise ConfigError(f"ask_policy.hot_c: {self.hot_c} must be above warm_c {self.warm_c}")
        if not (math.isfinite(self.demand_scale) and self.demand_scale > 0):
            raise ConfigError(f"ask_policy.demand_scale: {self.demand_scale} must be above 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Conditions:
    """What the device is going through now.

    Attributes:
        load: running leases / capacity (0 idle, 1 full; above 1 overcommitted).
        battery_pct: charge, None without a battery.
        charging: on a charger (a charging device prices as if without a battery).
        temperature_c: the hottest sensor, None without one.
        demand: RFQs seen per minute lately.
    """

    load: float = 0.0
    battery_pct: int | None = None
    charging: bool | None = None
    temperature_c: float | None = None
    demand: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.load) and self.load >= 0):
            raise ValueError(f"load {self.load!r} must be a finite share >= 0")
        if self.battery_pct is not None and not 0 <= self.battery_pct <= 100:
            raise ValueError(f"battery_pct {self.battery_pct} outside [0, 100]")
        if self.temperature_c is not None and not math.isfinite(self.temperature_c):
            raise ValueError(f"temperature_c {self.temperature_c!r} is not a number")
        if not (math.isfinite(self.demand) and self.demand >= 0):
            raise ValueError(f"demand {self.demand!r} must be a finite rate >= 0")


def _factor(policy: AskPolicy, now: Conditions) -> float | None:
    """The product of the condition factors, or None when the device is at its limits."""
    if now.load >= 1.0:
        return None
    factor = 1.0 + policy.load_premium * now.load
    if now.battery_pct is not None and not now.charging:
        if now.battery_pct < policy.min_battery_pct:
            return None
        factor *= 1.0 + policy.battery_premium * (100 - now.battery_pct) / 100
    if now.temperature_c is not None:
        if now.temperature_c >= policy.hot_c:
            return None
        heat = (now.temperature_c - policy.warm_c) / (policy.hot_c - policy.warm_c)
        factor *= 1.0 + policy.heat_premium * min(1.0, max(0.0, heat))
    return factor * (1.0 + policy.demand_premium * now.demand / (now.demand + policy.demand_scale))


def asks(policy: AskPolicy, conditions: Conditions) -> list[PriceAsk]:
    """The asks to publish in the peer record: one per kind offered and tier (at most 8)."""
    factor = _factor(policy, conditions)
    published = []
    for kind, base in policy.base.items():
        for tier in Tier:
            if factor is None:
                price = PROHIBITIVE
            else:
                raw = math.ceil(base * (1.0 - policy.tier_discounts[tier]) * factor)
                price = min(PROHIBITIVE, raw)
            published.append(PriceAsk(kind=WorkKind(kind).value, tier=tier.value, price=price))
    return published


def unit_price(ask: int, model_params: int) -> int:
    """``ask`` (micro-credits per unit at :data:`REFERENCE_PARAMS`) for a model of
    ``model_params`` parameters: linear above the reference size (a round's compute and its
    secure-aggregation traffic both grow with the parameter count), never below the ask itself
    for smaller models (a unit has fixed costs). Rounded up, at most :data:`PROHIBITIVE`."""
    if model_params < 0:
        raise ValueError(f"model_params {model_params} < 0")
    scaled = -(-ask * max(model_params, REFERENCE_PARAMS) // REFERENCE_PARAMS)
    return min(PROHIBITIVE, scaled)


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a job is expected to cost.

    Attributes:
        total: micro-credits for all participants and all units.
        per_unit: micro-credits per unit.
        breakdown: how: ``source``, ``samples``, ``tier``, ``tier_discount``, ``model_params``,
            ``per_unit``, ``units``, ``participants``, ``total``.
    """

    total: int
    per_unit: int
    breakdown: dict[str, object]


def estimate(
    kind: WorkKind,
    tier: Tier,
    participants: int,
    units: int,
    *,
    history: Iterable[int] = (),
    asks: Iterable[PriceAsk] = (),
    model_params: int | None = None,
) -> Estimate:
    """What ``participants`` peers doing ``units`` units each of ``kind`` in ``tier`` cost.

    Args:
        history: recent clearing prices per unit for this kind and tier (the node's store);
            taken as they are, they were paid for real units.
        asks: asks seen in peer records (any kind and tier; the matching ones are used,
            prohibitive ones are not).
        model_params: the model's size; asks and the default are scaled by :func:`unit_price`.
    """
    if participants < 1 or units < 1:
        raise ValueError(f"participants ({participants}) and units ({units}) must be >= 1")
    kind, tier = WorkKind(kind), Tier(tier)
    paid = list(history)
    quoted = [
        ask.price
        for ask in asks
        if ask.kind == kind.value and ask.tier == tier.value and ask.price < PROHIBITIVE
    ]
    discount = 0.0
    if paid:
        source, samples, per_unit = "recent clearing prices", len(paid), _median(paid)
    else:
        if quoted:
            source, samples, base = "asks in peer records", len(quoted), _median(quoted)
        else:
            discount = tier_discount(tier)
            source, samples = "default price", 0
            base = math.ceil(DEFAULT_PRICES[kind] * (1.0 - discount))
        per_unit = base if model_params is None else unit_price(base, model_params)
    total = per_unit * units * participants
    breakdown: dict[str, object] = {
        "source": source,
        "samples": samples,
        "kind": kind.value,
        "tier": tier.value,
        "tier_discount": discount,
        "model_params": model_params,
        "per_unit": per_unit,
        "units": units,
        "participants": participants,
        "total": total,
    }
    return Estimate(total=total, per_unit=per_unit, breakdown=breakdown)


def _median(prices: Sequence[int]) -> int:
    """The upper median: an amount someone actually paid or asked, never between two."""
    return int(statistics.median_high(prices))


def check_budget(budget: int, estimate: Estimate) -> None:
    """Refuse, before anything is posted, a budget below the estimate.

    Raises:
        BudgetTooLow: carrying the estimate and its breakdown.
    """
    if budget >= estimate.total:
        return
    b = estimate.breakdown
    raise BudgetTooLow(
        f"budget {credits(budget)} is below the estimated {credits(estimate.total)} credits: "
        f"{b['participants']} participants x {b['units']} units x {credits(estimate.per_unit)} "
        f"per unit ({b['source']}, {b['samples']} samples, {b['kind']}/{b['tier']}); "
        f"raise the budget or ask for fewer participants or units",
        estimate=estimate.total,
        breakdown=b,
    )
