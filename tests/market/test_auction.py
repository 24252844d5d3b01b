"""The auction: winners by score, threshold payments, the budget, truthfulness, replacements."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.errors import BudgetExceeded, ConfigError, NoBids
from meshfed.identity import PeerId
from meshfed.market.auction import (
    AuctionTerms,
    Clearing,
    Offer,
    Winner,
    adjusted_price,
    clear,
    replace,
)
from meshfed.market.terms import MAX_AMOUNT, MICRO, Tier
from meshfed.market.tiers import scoring_for


def pid(number: int) -> PeerId:
    return PeerId(b"\x00\x24\x08\x01\x12\x20" + number.to_bytes(32, "big"))


def tie_key(salt: bytes, peer: PeerId) -> bytes:
    return hashlib.sha256(salt + peer.raw).digest()


# Few distinct values, so that equal prices, equal attributes and equal scores are common.
_levels = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])


@st.composite
def auctions(draw: st.DrawFn) -> tuple[AuctionTerms, list[Offer]]:
    max_winners = draw(st.integers(1, 6))
    units = draw(st.integers(1, 5))
    reserve = draw(st.sampled_from([0, 1, 7, 100, 1_000, MICRO]))
    budget = reserve * max_winners * units + draw(st.integers(0, max_winners * units - 1))
    terms = AuctionTerms(
        tier=draw(st.sampled_from(list(Tier))),
        units=units,
        min_winners=draw(st.integers(1, max_winners)),
        max_winners=max_winners,
        budget=budget,
        salt=draw(st.binary(max_size=8)),
    )
    count = draw(st.integers(0, 12))
    top = max(2 * reserve, 4)
    prices = st.sampled_from([0, reserve // 2, reserve, reserve + 1, top]) | st.integers(0, top)
    offers = [
        Offer(
            pid(number),
            draw(prices),
            speed=draw(_levels),
            reliability=draw(_levels),
            locality=draw(_levels),
            accelerator=draw(st.booleans()),
        )
        for number in range(count)
    ]
    return terms, offers


def outcome(terms: AuctionTerms, offers: list[Offer]) -> Clearing | None:
    try:
        return clear(terms, offers)
    except NoBids:
        return None


def paid(clearing: Clearing | None, bidder: PeerId) -> int | None:
    if clearing is None:
        return None
    return next((w.price for w in clearing.winners if w.bidder == bidder), None)


def with_price(offers: list[Offer], index: int, price: int) -> list[Offer]:
    changed = list(offers)
    changed[index] = dataclasses.replace(offers[index], price=price)
    return changed


@given(auctions())
def test_winners_are_the_best_by_the_tier_scoring(case: tuple[AuctionTerms, list[Offer]]) -> None:
    terms, offers = case
    clearing = outcome(terms, offers)
    scoring = scoring_for(terms.tier)
    reserve = terms.reserve
    eligible = [o for o in offers if o.price <= reserve and scoring.floor_violation(o) is None]
    if clearing is None:
        assert len(eligible) < terms.min_winners
        return
    assert clearing.reserve == reserve == terms.budget // (terms.max_winners * terms.units)
    assert len(clearing.winners) == min(terms.max_winners, len(eligible))
    by_bidder = {o.bidder: o for o in offers}
    winners = [by_bidder[w.bidder] for w in clearing.winners]
    assert {o.bidder for o in winners} | {o.bidder for o in clearing.standby} == {
        o.bidder for o in eligible
    }
    assert set(clearing.rejected) == {o.bidder for o in offers} - {o.bidder for o in eligible}
    # by the float score of tiers.py, up to the bonus rounded down to a micro-credit
    slack = scoring.cost / (reserve * (scoring.cost + scoring.performance)) if reserve else 0
    for winner in winners:
        for other in clearing.standby:
            won, lost = scoring.score(winner, reserve), scoring.score(other, reserve)
            assert won >= lost - slack - 1e-9
    ordered = [*winners, *clearing.standby]
    keys = [
        (adjusted_price(scoring, o, reserve), -scoring.quality(o), tie_key(terms.salt, o.bidder))
        for o in ordered
    ]
    assert keys == sorted(keys)


@settings(deadline=None)  # two auctions per winner
@given(auctions())
def test_each_winner_is_paid_its_threshold_price(case: tuple[AuctionTerms, list[Offer]]) -> None:
    terms, offers = case
    clearing = outcome(terms, offers)
    if clearing is None:
        return
    index = {o.bidder: i for i, o in enumerate(offers)}
    for winner in clearing.winners:
        bid = offers[index[winner.bidder]].price
        assert bid <= winner.price <= clearing.reserve
        # still wins at its payment, others fixed, and is paid the same: its bid sets nothing
        at_threshold = clear(terms, with_price(offers, index[winner.bidder], winner.price))
        assert paid(at_threshold, winner.bidder) == winner.price
        # one micro-credit above it, it loses
        above = outcome(terms, with_price(offers, index[winner.bidder], winner.price + 1))
        assert paid(above, winner.bidder) is None


@given(auctions())
def test_the_total_never_exceeds_the_budget(case: tuple[AuctionTerms, list[Offer]]) -> None:
    terms, offers = case
    clearing = outcome(terms, offers)
    if clearing is not None:
        assert clearing.total == sum(w.price for w in clearing.winners) * terms.units
        assert clearing.total <= terms.budget


@given(auctions(), st.lists(st.integers(0, 3), max_size=5))
def test_offers_that_cannot_win_move_nothing(
    case: tuple[AuctionTerms, list[Offer]], kinds: list[int]
) -> None:
    """A bidder (or the buyer's shill) cannot shift the reserve or anyone's payment with offers
    above the reserve or below an SLA floor: the reserve is the budget's, not the bids'."""
    terms, offers = case
    reserve = terms.reserve
    hopeless = [
        Offer(pid(1000 + n), MAX_AMOUNT if kind < 2 else reserve + 1 + kind)
        if kind != 3 or terms.tier != Tier.ENTERPRISE
        else Offer(pid(1000 + n), 0, reliability=0.0)
        for n, kind in enumerate(kinds)
    ]
    before, after = outcome(terms, offers), outcome(terms, offers + hopeless)
    if before is None:
        assert after is None
        return
    assert after is not None
    assert (after.winners, after.standby, after.reserve) == (
        before.winners,
        before.standby,
        before.reserve,
    )
    assert set(after.rejected) == set(before.rejected) | {o.bidder for o in hopeless}


def utility(terms: AuctionTerms, offers: list[Offer], index: int, bid: int, cost: int) -> int:
    """Payment minus true cost if the bidder wins bidding ``bid``, else 0 (per unit)."""
    payment = paid(outcome(terms, with_price(offers, index, bid)), offers[index].bidder)
    return 0 if payment is None else payment - cost


@settings(max_examples=60, deadline=None)  # ~40 auctions per example, on a shared machine
@given(auctions(), st.data())
def test_bidding_the_true_cost_is_best(
    case: tuple[AuctionTerms, list[Offer]], data: st.DataObject
) -> None:
    terms, offers = case
    if not offers:
        return
    index = data.draw(st.integers(0, len(offers) - 1))
    cost = offers[index].price
    truthful = utility(terms, offers, index, cost, cost)
    assert truthful >= 0
    reserve = terms.reserve
    deviations = {0, cost // 2, cost - 1, cost + 1, 2 * cost, reserve - 1, reserve, reserve + 1}
    for other in offers:  # around every other bid, where the ranking can flip
        deviations |= {other.price - 1, other.price, other.price + 1}
    clearing = outcome(terms, offers)
    for winner in clearing.winners if clearing else ():
        deviations |= {winner.price - 1, winner.price, winner.price + 1}
    for bid in sorted(b for b in deviations if 0 <= b <= MAX_AMOUNT):
        assert utility(terms, offers, index, bid, cost) <= truthful, bid


@given(auctions(), st.randoms(use_true_random=False))
def test_the_order_of_offers_changes_nothing(
    case: tuple[AuctionTerms, list[Offer]], rng: random.Random
) -> None:
    terms, offers = case
    shuffled = list(offers)
    rng.shuffle(shuffled)
    assert outcome(terms, offers) == outcome(terms, shuffled)


@given(st.binary(max_size=16), st.integers(2, 12), st.integers(1, 5))
def test_equal_offers_are_ranked_by_the_salted_hash(salt: bytes, count: int, winners: int) -> None:
    offers = [Offer(pid(n), 500) for n in range(count)]
    terms = AuctionTerms(
        Tier.SMALL, units=1, min_winners=1, max_winners=winners, budget=1000 * winners, salt=salt
    )
    clearing = clear(terms, offers)
    expected = sorted(offers, key=lambda o: tie_key(salt, o.bidder))
    assert [w.bidder for w in clearing.winners] == [o.bidder for o in expected[:winners]]
    assert list(clearing.standby) == expected[winners:]


def test_a_cheap_reliable_offer_wins_and_is_paid_up_to_the_next_adjusted_price() -> None:
    terms = AuctionTerms(Tier.SMALL, units=10, min_winners=1, max_winners=1, budget=10 * MICRO)
    cheap, dear = Offer(pid(1), 300_000, reliability=0.9), Offer(pid(2), 600_000)
    clearing = clear(terms, [dear, cheap])
    assert clearing.reserve == MICRO
    # small: quality = 0.4 speed + 0.6 reliability, worth reserve * 0.1 / 0.9 per unit of it:
    # cheap 0.74 -> bonus 82_222, dear 0.5 -> 55_555. Paid dear's adjusted price + its bonus.
    assert clearing.winners == (Winner(pid(1), 600_000 - 55_555 + 82_222),)
    assert clearing.standby == (dear,)
    assert clearing.total == 6_266_670


def test_between_equal_attributes_the_tie_at_the_threshold_costs_one_micro_credit() -> None:
    terms = AuctionTerms(Tier.SMALL, units=1, min_winners=1, max_winners=1, budget=MICRO)
    cheap, dear = Offer(pid(1), 300_000), Offer(pid(2), 600_000)
    clearing = clear(terms, [dear, cheap])
    wins_tie = tie_key(b"", pid(1)) < tie_key(b"", pid(2))
    assert clearing.winners == (Winner(pid(1), 600_000 if wins_tie else 599_999),)


def test_alone_a_winner_is_paid_the_reserve() -> None:
    terms = AuctionTerms(Tier.MEDIUM, units=4, min_winners=1, max_winners=2, budget=8 * MICRO)
    clearing = clear(terms, [Offer(pid(1), 10)])
    assert clearing.winners == (Winner(pid(1), MICRO),)
    assert clearing.total == 4 * MICRO <= terms.budget


def test_no_bids_says_how_many_were_eligible_asked_and_why_not() -> None:
    terms = AuctionTerms(Tier.ENTERPRISE, units=1, min_winners=3, max_winners=4, budget=4 * MICRO)
    offers = [
        Offer(pid(1), MICRO // 2, reliability=0.9),
        Offer(pid(2), 2 * MICRO, reliability=0.9),
        Offer(pid(3), MICRO // 2, reliability=0.1),
    ]
    with pytest.raises(NoBids) as caught:
        clear(terms, offers)
    text = str(caught.value)
    assert "1 eligible offers of 3 bidders, 3 needed" in text
    assert "1 above the reserve" in text and "1 below an SLA floor" in text
    assert "reserve 1 per unit" in text


def test_a_bidder_offering_twice_is_rejected_whatever_the_order() -> None:
    terms = AuctionTerms(Tier.SMALL, units=1, min_winners=1, max_winners=2, budget=2 * MICRO)
    offers = [Offer(pid(1), 10), Offer(pid(1), 20), Offer(pid(2), 30)]
    for ordering in (offers, offers[::-1]):
        clearing = clear(terms, ordering)
        assert [w.bidder for w in clearing.winners] == [pid(2)]
        assert clearing.rejected == {pid(1): "more than one offer: 2 offers"}


def test_bad_terms_name_the_field() -> None:
    with pytest.raises(ConfigError, match="max_winners"):
        AuctionTerms(Tier.SMALL, units=1, min_winners=3, max_winners=2, budget=1)
    with pytest.raises(ConfigError, match="units"):
        AuctionTerms(Tier.SMALL, units=0, min_winners=1, max_winners=2, budget=1)
    with pytest.raises(ConfigError, match="budget"):
        AuctionTerms(Tier.SMALL, units=1, min_winners=1, max_winners=2, budget=-1)
    with pytest.raises(ConfigError, match="tier"):
        huge: Tier = "huge"  # type: ignore[assignment]
        AuctionTerms(huge, units=1, min_winners=1, max_winners=2, budget=1)
    with pytest.raises(ValueError, match="price"):
        Offer(pid(1), 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="speed"):
        Offer(pid(1), 1, speed=float("nan"))


def test_replacements_come_from_standby_at_their_threshold() -> None:
    price_only = scoring_for(Tier.SMALL, performance=0.0)  # quality only breaks equal prices
    terms = AuctionTerms(
        Tier.SMALL, units=2, min_winners=1, max_winners=1, budget=2 * MICRO, scoring=price_only
    )
    offers = [Offer(pid(n), 100_000 * n, reliability=1 - n / 10) for n in range(1, 6)]
    clearing = clear(terms, offers)
    assert clearing.winners == (Winner(pid(1), 200_000),)
    # pid(2) declined; pid(3) replaces, paid up to pid(4)'s price
    assert replace(terms, clearing, {pid(2)}, 1, budget_left=MICRO) == (Winner(pid(3), 400_000),)
    # the last one standing is paid the reserve
    gone = {pid(2), pid(3), pid(4)}
    assert replace(terms, clearing, gone, 1, budget_left=2 * MICRO) == (Winner(pid(5), MICRO),)
    with pytest.raises(BudgetExceeded, match="left in the budget"):
        replace(terms, clearing, gone, 1, budget_left=2 * MICRO - 1)
    with pytest.raises(NoBids, match="2 replacements needed, 1 standby offers left"):
        replace(terms, clearing, gone, 2, budget_left=10 * MICRO)


@given(auctions(), st.data())
def test_replacements_are_the_best_standby_within_the_reserve(
    case: tuple[AuctionTerms, list[Offer]], data: st.DataObject
) -> None:
    terms, offers = case
    clearing = outcome(terms, offers)
    if clearing is None or not clearing.standby:
        return
    gone = set(data.draw(st.lists(st.sampled_from([o.bidder for o in clearing.standby]))))
    left = [o for o in clearing.standby if o.bidder not in gone]
    needed = data.draw(st.integers(0, len(left)))
    chosen = replace(terms, clearing, gone, needed, budget_left=MAX_AMOUNT)
    assert [w.bidder for w in chosen] == [o.bidder for o in left[:needed]]
    bids = {o.bidder: o.price for o in left}
    assert all(bids[w.bidder] <= w.price <= clearing.reserve for w in chosen)
    cost = sum(w.price for w in chosen) * terms.units
    assert replace(terms, clearing, gone, needed, budget_left=cost) == chosen
    if cost > 0:
        with pytest.raises(BudgetExceeded):
            replace(terms, clearing, gone, needed, budget_left=cost - 1)


def test_500_bidders_clear_well_within_50_ms() -> None:
    rng = random.Random(7)
    offers = [
        Offer(
            pid(n),
            rng.randrange(2 * MICRO),
            rng.random(),
            rng.random(),
            rng.random(),
            rng.random() < 0.3,
        )
        for n in range(500)
    ]
    terms = AuctionTerms(Tier.LARGE, units=10, min_winners=50, max_winners=100, budget=1000 * MICRO)
    best = min(_timed(terms, offers) for _ in range(3))
    assert best < 0.05


def _timed(terms: AuctionTerms, offers: list[Offer]) -> float:
    start = time.perf_counter()
    clear(terms, offers)
    return time.perf_counter() - start
