"""The auction: a uniform-price reverse auction with score adjustment (SPEC "Auction").

Theory of operation. The buyer fixes a per-unit *reserve* from its budget alone::

    reserve = budget // (max_winners * units)

An offer is eligible when its price is at most the reserve and it meets the scoring's SLA
floors. Each eligible offer gets an integer *bonus* for its non-price attributes, from its own
attributes and the reserve only (:func:`quality_bonus`), and is ranked by its *adjusted price*
``price - bonus``, lowest first. Equal adjusted prices rank by the higher quality (the bonus is
rounded down to a micro-credit, the quality is not), then by ``sha256(salt + bidder)``. This
is the tier's score (:meth:`~meshfed.market.tiers.Scoring.score`) in micro-credits:
``score * reserve * (cost + performance) / cost = reserve - price + bonus``, up to the
rounding of the bonus.

The best ``max_winners`` eligible offers win (at least ``min_winners``, else :class:`NoBids`).
Every winner is paid its *threshold price*: the highest price at which it would still have won,
the others' bids fixed. That is the first loser's adjusted price plus the winner's own bonus
(minus one micro-credit when the winner would lose the tie at that price), capped by the
reserve; the reserve itself when no eligible offer lost. In adjusted prices every winner
receives the same, (k+1)-th, price: a uniform-price auction.

Why bidding one's true cost is best (Myerson): winning is monotone in the price (asking less
never turns a win into a loss) and a winner is paid its threshold, which its own bid does not
move. Bidding above the true cost can only lose auctions that would have paid more than the
cost; bidding below can only win auctions that pay less than the cost. The reserve is fixed by
the budget, never a statistic of the bids, or a bidder could move every score.

Why the total stays within the budget: each winner is paid at most the reserve per unit, so
``total <= max_winners * units * reserve <= budget`` (floor division).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ..errors import BudgetExceeded, ConfigError, NoBids
from ..identity import PeerId
from .terms import MAX_AMOUNT, Tier, credits
from .tiers import Scoring, scoring_for

__all__ = [
    "AuctionTerms",
    "Clearing",
    "Offer",
    "Winner",
    "adjusted_price",
    "clear",
    "quality_bonus",
    "replace",
]


@dataclass(frozen=True, slots=True)
class Offer:
    """One bid as the auction sees it.

    Attributes:
        bidder: the peer that bid.
        price: micro-credits per unit asked (the bid), 0..MAX_AMOUNT.
        speed: [0, 1], higher is faster (throughput normalised by the buyer).
        reliability: [0, 1], from the buyer's reputation book.
        locality: [0, 1], higher is closer.
        accelerator: the bidder offers an accelerator.
    """

    bidder: PeerId
    price: int
    speed: float = 0.5
    reliability: float = 0.5
    locality: float = 0.5
    accelerator: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.price, bool) or not isinstance(self.price, int):
            raise ValueError(f"offer price must be int micro-credits, not {self.price!r}")
        if not 0 <= self.price <= MAX_AMOUNT:
            raise ValueError(f"offer price {self.price} outside [0, {MAX_AMOUNT}]")
        for name in ("speed", "reliability", "locality"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise ValueError(f"offer {name} {value!r} outside [0, 1]")


@dataclass(frozen=True, slots=True)
class AuctionTerms:
    """What the buyer auctions.

    Attributes:
        tier: picks the default scoring.
        units: units per winner (rounds of training, or inference requests).
        min_winners: fewer eligible offers than this and nobody wins (:class:`NoBids`).
        max_winners: at most this many win.
        budget: total micro-credits the buyer pays, all winners, all units.
        scoring: None for the tier's defaults (:func:`~meshfed.market.tiers.scoring_for`).
        salt: ties are broken by ``sha256(salt + bidder bytes)``; the job id.
    """

    tier: Tier
    units: int
    min_winners: int
    max_winners: int
    budget: int
    scoring: Scoring | None = None
    salt: bytes = b""

    def __post_init__(self) -> None:
        for name in ("units", "min_winners", "max_winners", "budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"auction.{name}: expected an int, got {value!r}")
        if self.units < 1:
            raise ConfigError(f"auction.units: {self.units} < 1")
        if self.min_winners < 1:
            raise ConfigError(f"auction.min_winners: {self.min_winners} < 1")
        if self.max_winners < self.min_winners:
            raise ConfigError(
                f"auction.max_winners: {self.max_winners} < min_winners {self.min_winners}"
            )
        if not 0 <= self.budget <= MAX_AMOUNT:
            raise ConfigError(f"auction.budget: {self.budget} outside [0, {MAX_AMOUNT}]")
        if self.tier not in set(Tier):
            raise ConfigError(
                f"auction.tier: {self.tier!r} is not one of {[t.value for t in Tier]}"
            )

    @property
    def reserve(self) -> int:
        """The per-unit price the budget allows each of ``max_winners``."""
        return self.budget // (self.max_winners * self.units)

    def effective_scoring(self) -> Scoring:
        """``scoring``, or the tier's defaults."""
        return self.scoring if self.scoring is not None else scoring_for(self.tier)


@dataclass(frozen=True, slots=True)
class Winner:
    """A bidder that won, and the micro-credits per unit it is paid (its threshold, >= bid)."""

    bidder: PeerId
    price: int


@dataclass(frozen=True, slots=True)
class Clearing:
    """The auction's outcome.

    Attributes:
        winners: best first.
        standby: eligible offers that did not win, best first (the replacements).
        rejected: ineligible offers and why.
        reserve: the per-unit reserve price the budget allowed.
        units: units per winner (as in the terms).
    """

    winners: tuple[Winner, ...]
    standby: tuple[Offer, ...]
    rejected: dict[PeerId, str]
    reserve: int
    units: int

    @property
    def total(self) -> int:
        """Micro-credits paid to all winners for all units (never above the budget)."""
        return sum(winner.price for winner in self.winners) * self.units


def quality_bonus(scoring: Scoring, offer: Offer, reserve: int) -> int:
    """Micro-credits per unit the offer's non-price attributes are worth, rounded down:
    ``reserve * performance / cost * quality``. Depends on the offer's own attributes and the
    fixed reserve only, never on any price."""
    return math.floor(reserve * scoring.quality_ratio * scoring.quality(offer))


def adjusted_price(scoring: Scoring, offer: Offer, reserve: int) -> int:
    """The offer's price less its :func:`quality_bonus` (lower ranks better)."""
    return offer.price - quality_bonus(scoring, offer, reserve)


@dataclass(frozen=True, slots=True)
class _Ranked:
    adjusted: int
    #: what decides between equal adjusted prices: quality (exact, not rounded), then the hash
    tie: tuple[float, bytes]
    bonus: int
    offer: Offer


def _ranked(scoring: Scoring, offers: Iterable[Offer], reserve: int, salt: bytes) -> list[_Ranked]:
    """The offers best first; ``offers`` must be eligible and from distinct bidders."""
    ranked = []
    for offer in offers:
        bonus = quality_bonus(scoring, offer, reserve)
        tie = (-scoring.quality(offer), hashlib.sha256(salt + offer.bidder.raw).digest())
        ranked.append(_Ranked(offer.price - bonus, tie, bonus, offer))
    ranked.sort(key=lambda entry: (entry.adjusted, entry.tie))
    return ranked


def _threshold(winner: _Ranked, first_loser: _Ranked | None, reserve: int) -> int:
    """The highest price at which ``winner`` still beats ``first_loser``, capped by the reserve."""
    if first_loser is None:
        return reserve
    highest = first_loser.adjusted + winner.bonus
    if winner.tie > first_loser.tie:  # at an equal adjusted price it would lose the tie
        highest -= 1
    return min(highest, reserve)


def _paid(chosen: list[_Ranked], first_loser: _Ranked | None, reserve: int) -> tuple[Winner, ...]:
    return tuple(
        Winner(entry.offer.bidder, _threshold(entry, first_loser, reserve)) for entry in chosen
    )


def clear(terms: AuctionTerms, offers: Iterable[Offer]) -> Clearing:
    """Choose the winners among ``offers`` and what each is paid per unit.

    Order of ``offers`` does not matter. A bidder with more than one offer is rejected.

    Raises:
        NoBids: fewer than ``terms.min_winners`` offers are eligible; the message says how many
            were, how many were asked for, and why the others were rejected.
    """
    scoring = terms.effective_scoring()
    reserve = terms.reserve
    received = list(offers)
    per_bidder = Counter(offer.bidder for offer in received)
    rejected: dict[PeerId, str] = {}
    why: Counter[str] = Counter()
    eligible = []
    for offer in received:
        if per_bidder[offer.bidder] > 1:
            reason, detail = "more than one offer", f"{per_bidder[offer.bidder]} offers"
        elif offer.price > reserve:
            reason = "above the reserve"
            detail = f"asks {credits(offer.price)} per unit, the reserve is {credits(reserve)}"
        elif (violation := scoring.floor_violation(offer)) is not None:
            reason, detail = "below an SLA floor", violation
        else:
            eligible.append(offer)
            continue
        if offer.bidder not in rejected:
            why[reason] += 1
        rejected[offer.bidder] = f"{reason}: {detail}"
    ranked = _ranked(scoring, eligible, reserve, terms.salt)
    if len(ranked) < terms.min_winners:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(why.items()))
        raise NoBids(
            f"{len(ranked)} eligible offers of {len(per_bidder)} bidders, "
            f"{terms.min_winners} needed (min_winners)"
            + (f"; rejected: {reasons}" if reasons else "")
            + f" [reserve {credits(reserve)} per unit = budget {credits(terms.budget)}"
            f" / ({terms.max_winners} winners x {terms.units} units)]"
        )
    count = min(terms.max_winners, len(ranked))
    first_loser = ranked[count] if count < len(ranked) else None
    return Clearing(
        winners=_paid(ranked[:count], first_loser, reserve),
        standby=tuple(entry.offer for entry in ranked[count:]),
        rejected=rejected,
        reserve=reserve,
        units=terms.units,
    )


def replace(
    terms: AuctionTerms,
    clearing: Clearing,
    gone: Collection[PeerId],
    needed: int,
    budget_left: int,
) -> tuple[Winner, ...]:
    """``needed`` replacements from ``clearing.standby``, best first, minus ``gone``.

    Each is paid its threshold price against the standby offers left (the same rule as
    :func:`clear`, against the same reserve). ``gone`` names standby peers that are no longer
    available (declined, failed, or already taken by an earlier replacement). The cost is
    ``sum(prices) * terms.units``: pass ``dataclasses.replace(terms, units=...)`` for the units
    still to do.

    Raises:
        NoBids: fewer than ``needed`` standby offers are left.
        BudgetExceeded: the replacements would cost more than ``budget_left``.
    """
    if needed < 0:
        raise ValueError(f"needed must be >= 0, not {needed}")
    left = [offer for offer in clearing.standby if offer.bidder not in gone]
    if len(left) < needed:
        raise NoBids(
            f"{needed} replacements needed, {len(left)} standby offers left"
            f" ({len(clearing.standby) - len(left)} of {len(clearing.standby)} gone)"
        )
    ranked = _ranked(terms.effective_scoring(), left, clearing.reserve, terms.salt)
    first_loser = ranked[needed] if needed < len(ranked) else None
    chosen = _paid(ranked[:needed], first_loser, clearing.reserve)
    cost = sum(winner.price for winner in chosen) * terms.units
    if cost > budget_left:
        raise BudgetExceeded(
            f"{needed} replacements cost {credits(cost)} ({terms.units} units), "
            f"{credits(budget_left)} left in the budget"
        )
    return chosen
