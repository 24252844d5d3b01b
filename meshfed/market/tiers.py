"""How each tier scores offers: the weights of price against performance, and SLA floors.

An offer's *score* (SPEC "Tiers") is ``cost * (1 - price / reserve) + performance * quality``,
divided by ``cost + performance``, where ``quality`` is the mix of the offer's non-price
attributes (speed, reliability, accelerator, locality, each in [0, 1]) weighted by the shares
below. The reserve is fixed by the buyer's budget (:mod:`.auction`), never by the bids.

=========== ========= ============ =================================================
tier        peers     cost / perf  performance made of
=========== ========= ============ =================================================
small       1-10      90 / 10      reliability 0.6, speed 0.4
medium      10-50     70 / 30      reliability 0.5, speed 0.4, accelerator 0.1
large       50-500    50 / 50      speed 0.4, reliability 0.3, accelerator 0.3 (+ DP)
enterprise  500+      40 / 60      reliability 0.4, speed 0.3, locality 0.3; SLA floors
                                   reliability >= 0.5, speed >= 0.1 (+ DP)
=========== ========= ============ =================================================

Every weight and floor can be overridden (:func:`scoring_for`). Enterprise buyers also get the
Pareto front over cost, speed, reliability and locality (:func:`pareto_front`), for reporting:
the auction itself needs one ranking, and the weights give it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .terms import Tier

if TYPE_CHECKING:  # auction.py imports this module; offers are only read here
    from .auction import Offer

__all__ = ["Scoring", "dp_default", "pareto_front", "scoring_for"]

_SHARES = ("speed", "reliability", "accelerator", "locality")
_FLOORS = ("min_speed", "min_reliability", "min_locality")


@dataclass(frozen=True, slots=True, kw_only=True)
class Scoring:
    """The weights an auction ranks offers by.

    Attributes:
        cost: weight of the price (must be above 0: without it the price decides nothing and
            every winner would be paid the reserve).
        performance: weight of the non-price attributes.
        speed, reliability, accelerator, locality: shares of ``performance`` (relative: they
            are divided by their sum).
        min_speed, min_reliability, min_locality: SLA floors in [0, 1]; an offer below any of
            them is not eligible, whatever its price.
    """

    cost: float
    performance: float
    speed: float = 0.0
    reliability: float = 0.0
    accelerator: float = 0.0
    locality: float = 0.0
    min_speed: float = 0.0
    min_reliability: float = 0.0
    min_locality: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cost", "performance", *_SHARES, *_FLOORS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"scoring.{name}: expected a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"scoring.{name}: {value} is not a finite weight >= 0")
        for name in _FLOORS:
            if getattr(self, name) > 1:
                raise ConfigError(
                    f"scoring.{name}: {getattr(self, name)} above 1 (floors are in [0, 1])"
                )
        if self.cost <= 0:
            raise ConfigError(
                "scoring.cost: must be above 0 (with no weight on the price, the price decides "
                "nothing and every winner is paid the reserve)"
            )
        if self.performance > 0 and self._share_total() <= 0:
            raise ConfigError(
                "scoring.performance: weighs performance but speed, reliability, accelerator "
                "and locality are all 0"
            )

    def _share_total(self) -> float:
        return self.speed + self.reliability + self.accelerator + self.locality

    @property
    def quality_ratio(self) -> float:
        """How much a unit of quality is worth against a unit of price: performance / cost."""
        return self.performance / self.cost

    def quality(self, offer: Offer) -> float:
        """The offer's non-price attributes mixed by the shares, in [0, 1]."""
        total = self._share_total()
        if total <= 0:
            return 0.0
        mixed = (
            self.speed * offer.speed
            + self.reliability * offer.reliability
            + self.accelerator * (1.0 if offer.accelerator else 0.0)
            + self.locality * offer.locality
        )
        return min(1.0, mixed / total)

    def score(self, offer: Offer, reserve: int) -> float:
        """The offer's score in [0, 1] against the per-unit ``reserve`` (higher is better).

        For reports; the auction ranks by the equivalent integer
        :func:`~meshfed.market.auction.adjusted_price`.
        """
        price_term = 1.0 - offer.price / reserve if reserve > 0 else 0.0
        weighted = self.cost * price_term + self.performance * self.quality(offer)
        return weighted / (self.cost + self.performance)

    def floor_violation(self, offer: Offer) -> str | None:
        """Which SLA floor the offer misses, said for people, or None if it meets them all."""
        for name in _FLOORS:
            floor = getattr(self, name)
            attribute = name.removeprefix("min_")
            value = getattr(offer, attribute)
            if value < floor:
                return f"{attribute} {value:g} below the SLA floor {floor:g}"
        return None


_DEFAULTS = {
    Tier.SMALL: Scoring(cost=0.9, performance=0.1, speed=0.4, reliability=0.6),
    Tier.MEDIUM: Scoring(cost=0.7, performance=0.3, speed=0.4, reliability=0.5, accelerator=0.1),
    Tier.LARGE: Scoring(cost=0.5, performance=0.5, speed=0.4, reliability=0.3, accelerator=0.3),
    Tier.ENTERPRISE: Scoring(
        cost=0.4,
        performance=0.6,
        speed=0.3,
        reliability=0.4,
        locality=0.3,
        min_speed=0.1,
        min_reliability=0.5,
    ),
}

_DP_DEFAULT = {Tier.SMALL: False, Tier.MEDIUM: False, Tier.LARGE: True, Tier.ENTERPRISE: True}


def scoring_for(tier: Tier, **overrides: Any) -> Scoring:
    """The tier's default scoring with ``overrides`` (any :class:`Scoring` field) applied.

    Raises:
        ConfigError: an unknown field, or a weight out of range (the message names it).
    """
    known = {field.name for field in dataclasses.fields(Scoring)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"scoring: unknown fields {unknown}; known: {sorted(known)}")
    return dataclasses.replace(_DEFAULTS[Tier(tier)], **overrides)


def dp_default(tier: Tier) -> bool:
    """Whether jobs of ``tier`` train with differential privacy unless they say otherwise."""
    return _DP_DEFAULT[Tier(tier)]


def _pareto_key(offer: Offer) -> tuple[int, float, float, float, bytes]:
    return (-offer.price, offer.speed, offer.reliability, offer.locality, offer.bidder.raw)


def _dominates(a: Offer, b: Offer) -> bool:
    """True if ``a`` is at least as good as ``b`` in cost, speed, reliability and locality and
    better in one of them."""
    at_least = (
        a.price <= b.price
        and a.speed >= b.speed
        and a.reliability >= b.reliability
        and a.locality >= b.locality
    )
    return at_least and (
        a.price < b.price
        or a.speed > b.speed
        or a.reliability > b.reliability
        or a.locality > b.locality
    )


def pareto_front(offers: Iterable[Offer]) -> tuple[Offer, ...]:
    """The offers no other offer dominates in cost, speed, reliability and locality,
    cheapest first (ties: faster, more reliable, closer, then by bidder bytes).

    Offers equal in all four are all kept. Sweeps the offers in that order once: an offer can
    only be dominated by one before it, and if by any then by one already on the front.
    """
    ordered = sorted(offers, key=_pareto_key, reverse=True)
    front: list[Offer] = []
    for offer in ordered:
        if not any(_dominates(kept, offer) for kept in front):
            front.append(offer)
    return tuple(front)
