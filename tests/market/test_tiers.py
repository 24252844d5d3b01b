"""Tiers: default weights, overrides, SLA floors, the Pareto front."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.errors import ConfigError, NoBids
from meshfed.market.auction import AuctionTerms, Offer, clear
from meshfed.market.terms import MICRO, Tier
from meshfed.market.tiers import Scoring, dp_default, pareto_front, scoring_for
from tests.market.test_auction import pid


def test_each_tier_has_the_seed_design_weights() -> None:
    small, medium = scoring_for(Tier.SMALL), scoring_for(Tier.MEDIUM)
    large, enterprise = scoring_for(Tier.LARGE), scoring_for(Tier.ENTERPRISE)
    assert (small.cost, small.performance) == (0.9, 0.1)
    assert (medium.cost, medium.performance) == (0.7, 0.3)
    assert (large.cost, large.performance) == (0.5, 0.5)
    # large prefers accelerators more than any smaller tier does
    assert large.accelerator > medium.accelerator > small.accelerator == 0
    # enterprise: cost, speed, reliability and locality, with SLA floors
    assert enterprise.locality > 0 and enterprise.accelerator == 0
    assert (enterprise.min_reliability, enterprise.min_speed) == (0.5, 0.1)
    assert all(s.min_reliability == s.min_speed == 0 for s in (small, medium, large))
    assert [dp_default(tier) for tier in Tier] == [False, False, True, True]


def test_a_large_job_prefers_an_accelerator_a_small_one_the_price() -> None:
    cheap = Offer(pid(1), 400_000)
    fast = Offer(pid(2), 600_000, speed=0.9, accelerator=True)
    for tier, expected in ((Tier.SMALL, pid(1)), (Tier.LARGE, pid(2))):
        terms = AuctionTerms(tier, units=1, min_winners=1, max_winners=1, budget=MICRO)
        assert clear(terms, [cheap, fast]).winners[0].bidder == expected


def test_every_weight_can_be_overridden_and_bad_ones_are_named() -> None:
    assert scoring_for(Tier.SMALL, cost=0.5, performance=0.5).cost == 0.5
    assert scoring_for(Tier.ENTERPRISE, min_reliability=0.9).min_reliability == 0.9
    for field, value in (
        ("cost", 0.0),
        ("speed", -1.0),
        ("reliability", float("nan")),
        ("min_speed", 1.5),
        ("locality", "high"),
    ):
        with pytest.raises(ConfigError, match=rf"scoring\.{field}:"):
            scoring_for(Tier.MEDIUM, **{field: value})
    with pytest.raises(ConfigError, match="unknown fields \\['weight'\\]"):
        scoring_for(Tier.SMALL, weight=1.0)
    with pytest.raises(ConfigError, match=r"scoring\.performance"):
        Scoring(cost=1.0, performance=1.0)  # performance of nothing


def test_enterprise_sla_floors_exclude_offers_whatever_their_price() -> None:
    terms = AuctionTerms(Tier.ENTERPRISE, units=1, min_winners=1, max_winners=2, budget=2 * MICRO)
    free_but_flaky = Offer(pid(1), 0, reliability=0.2)
    slow = Offer(pid(2), 0, speed=0.05)
    sound = Offer(pid(3), 900_000, reliability=0.8)
    clearing = clear(terms, [free_but_flaky, slow, sound])
    assert [w.bidder for w in clearing.winners] == [pid(3)]
    assert clearing.rejected == {
        pid(1): "below an SLA floor: reliability 0.2 below the SLA floor 0.5",
        pid(2): "below an SLA floor: speed 0.05 below the SLA floor 0.1",
    }
    # with the floors lowered they win
    lowered = AuctionTerms(
        Tier.ENTERPRISE,
        units=1,
        min_winners=3,
        max_winners=3,
        budget=3 * MICRO,
        scoring=scoring_for(Tier.ENTERPRISE, min_reliability=0.0, min_speed=0.0),
    )
    assert len(clear(lowered, [free_but_flaky, slow, sound]).winners) == 3
    with pytest.raises(NoBids, match="2 below an SLA floor"):
        clear(AuctionTerms(Tier.ENTERPRISE, 1, 2, 2, 2 * MICRO), [free_but_flaky, slow, sound])


_level = st.sampled_from([0.0, 0.5, 1.0])
_offers = st.lists(
    st.builds(
        lambda n, price, speed, reliability, locality: Offer(
            pid(n), price, speed, reliability, locality
        ),
        st.integers(0, 2**16),
        st.integers(0, 3),
        _level,
        _level,
        _level,
    ),
    max_size=12,
    unique_by=lambda offer: offer.bidder,
)


def dominates(a: Offer, b: Offer) -> bool:
    worse_nowhere = (
        a.price <= b.price
        and a.speed >= b.speed
        and a.reliability >= b.reliability
        and a.locality >= b.locality
    )
    return worse_nowhere and (a.price, a.speed, a.reliability, a.locality) != (
        b.price,
        b.speed,
        b.reliability,
        b.locality,
    )


@given(_offers, st.randoms(use_true_random=False))
def test_the_pareto_front_is_exactly_the_undominated_offers(
    offers: list[Offer], rng: random.Random
) -> None:
    front = pareto_front(offers)
    expected = {o.bidder for o in offers if not any(dominates(p, o) for p in offers)}
    assert {o.bidder for o in front} == expected
    assert len(front) == len(expected)
    assert [o.price for o in front] == sorted(o.price for o in front)
    shuffled = list(offers)
    rng.shuffle(shuffled)
    assert pareto_front(shuffled) == front


def test_pareto_front_example() -> None:
    cheap = Offer(pid(1), 1, speed=0.1, reliability=0.1, locality=0.1)
    fast = Offer(pid(2), 5, speed=1.0, reliability=0.5, locality=0.5)
    dominated = Offer(pid(3), 6, speed=0.9, reliability=0.5, locality=0.5)
    assert pareto_front([dominated, fast, cheap]) == (cheap, fast)
