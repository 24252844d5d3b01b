"""Pricing: asks that rise with load, drain, heat and demand; estimates and budget checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.errors import BudgetTooLow, ConfigError
from meshfed.market.pricing import (
    DEFAULT_PRICES,
    PROHIBITIVE,
    REFERENCE_PARAMS,
    AskPolicy,
    Conditions,
    asks,
    check_budget,
    estimate,
    unit_price,
)
from meshfed.market.terms import MAX_AMOUNT, Tier, WorkKind
from meshfed.membership.records import PriceAsk

POLICY = AskPolicy()

conditions = st.builds(
    Conditions,
    load=st.floats(0, 1.5),
    battery_pct=st.none() | st.integers(0, 100),
    charging=st.none() | st.booleans(),
    temperature_c=st.none() | st.floats(-40, 120),
    demand=st.floats(0, 1e4),
)


def prices(policy: AskPolicy, now: Conditions) -> dict[tuple[str, str], int]:
    return {(ask.kind, ask.tier): ask.price for ask in asks(policy, now)}


def no_lower(worse: Conditions, better: Conditions) -> None:
    high, low = prices(POLICY, worse), prices(POLICY, better)
    assert all(high[key] >= low[key] for key in low)


@given(conditions, st.floats(0, 1.5))
def test_more_load_never_lowers_an_ask(now: Conditions, more: float) -> None:
    heavier = Conditions(
        load=max(now.load, more),
        battery_pct=now.battery_pct,
        charging=now.charging,
        temperature_c=now.temperature_c,
        demand=now.demand,
    )
    no_lower(heavier, now)


@given(conditions, st.integers(0, 100))
def test_less_battery_never_lowers_an_ask(now: Conditions, level: int) -> None:
    full = Conditions(load=now.load, battery_pct=max(level, now.battery_pct or 0), charging=False)
    drained = Conditions(
        load=now.load, battery_pct=min(level, now.battery_pct or 0), charging=False
    )
    plugged = Conditions(load=now.load, battery_pct=drained.battery_pct, charging=True)
    no_lower(drained, full)
    no_lower(drained, plugged)


@given(conditions, st.floats(-40, 120))
def test_more_heat_never_lowers_an_ask(now: Conditions, other: float) -> None:
    base = now.temperature_c if now.temperature_c is not None else 20.0
    hot = Conditions(load=now.load, temperature_c=max(base, other), demand=now.demand)
    cool = Conditions(load=now.load, temperature_c=min(base, other), demand=now.demand)
    no_lower(hot, cool)


@given(conditions, st.floats(0, 1e4))
def test_more_demand_never_lowers_an_ask(now: Conditions, other: float) -> None:
    busy = Conditions(load=now.load, battery_pct=now.battery_pct, demand=max(now.demand, other))
    quiet = Conditions(load=now.load, battery_pct=now.battery_pct, demand=min(now.demand, other))
    no_lower(busy, quiet)


@given(conditions)
def test_asks_fit_the_record(now: Conditions) -> None:
    published = asks(POLICY, now)
    assert len(published) == 8  # the record holds at most 8 asks
    assert all(0 <= ask.price <= MAX_AMOUNT for ask in published)
    assert {(a.kind, a.tier) for a in published} == {
        (k.value, t.value) for k in WorkKind for t in Tier
    }


def test_an_idle_cool_plugged_device_asks_its_base_less_the_tier_discount() -> None:
    idle = prices(POLICY, Conditions())
    assert idle[("training", "small")] == DEFAULT_PRICES[WorkKind.TRAINING]
    assert idle[("training", "large")] == 9_000
    assert idle[("inference", "enterprise")] == 850
    only_training = AskPolicy(base={WorkKind.TRAINING: 5})
    assert {a.kind for a in asks(only_training, Conditions())} == {"training"}


@pytest.mark.parametrize(
    "limit",
    [
        Conditions(load=1.0),
        Conditions(battery_pct=10, charging=False),
        Conditions(temperature_c=85.0),
    ],
)
def test_a_device_at_its_limits_asks_a_prohibitive_price(limit: Conditions) -> None:
    assert set(prices(POLICY, limit).values()) == {PROHIBITIVE}


def test_a_charging_device_at_low_battery_is_not_at_its_limit() -> None:
    assert prices(POLICY, Conditions(battery_pct=5, charging=True)) == prices(POLICY, Conditions())


def test_policies_are_checked_and_name_the_knob() -> None:
    with pytest.raises(ConfigError, match="hot_c"):
        AskPolicy(warm_c=50, hot_c=40)
    with pytest.raises(ConfigError, match="load_premium"):
        AskPolicy(load_premium=-1)
    with pytest.raises(ConfigError, match=r"base\[training\]"):
        AskPolicy(base={WorkKind.TRAINING: 1.5})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"tier_discounts\[medium\]: missing"):
        AskPolicy(tier_discounts={Tier.SMALL: 0.0})
    with pytest.raises(ValueError, match="load"):
        Conditions(load=float("nan"))


@given(st.integers(0, 10**9), st.integers(0, 10**10), st.integers(0, 10**10))
def test_unit_price_scales_with_model_size_and_never_drops_below_the_ask(
    ask: int, small: int, big: int
) -> None:
    small, big = min(small, big), max(small, big)
    assert ask <= unit_price(ask, small) <= unit_price(ask, big) <= PROHIBITIVE
    assert unit_price(ask, 10 * REFERENCE_PARAMS) == 10 * ask


def ask(price: int, kind: str = "training", tier: str = "small") -> PriceAsk:
    return PriceAsk(kind=kind, tier=tier, price=price)


def test_the_estimate_prefers_clearing_prices_then_asks_then_the_default() -> None:
    seen = [ask(3_000), ask(5_000), ask(9_000), ask(1, tier="large"), ask(PROHIBITIVE)]
    recent = estimate(WorkKind.TRAINING, Tier.SMALL, 4, 10, history=[7_000, 8_000], asks=seen)
    assert (recent.per_unit, recent.total) == (8_000, 320_000)
    assert recent.breakdown["source"] == "recent clearing prices"
    quoted = estimate(WorkKind.TRAINING, Tier.SMALL, 4, 10, asks=seen)
    assert (quoted.per_unit, quoted.breakdown["samples"]) == (5_000, 3)
    assert quoted.breakdown["source"] == "asks in peer records"
    default = estimate(WorkKind.TRAINING, Tier.LARGE, 60, 10)
    assert default.per_unit == 9_000  # 10_000 less the large tier's 10 %
    assert default.breakdown["tier_discount"] == 0.10
    assert default.breakdown["source"] == "default price"
    bigger = estimate(WorkKind.TRAINING, Tier.LARGE, 60, 10, model_params=3 * REFERENCE_PARAMS)
    assert bigger.per_unit == 27_000


def test_a_budget_below_the_estimate_is_refused_with_the_estimate() -> None:
    guess = estimate(WorkKind.TRAINING, Tier.SMALL, 4, 10, history=[20_000])
    check_budget(800_000, guess)  # exactly the estimate is enough
    with pytest.raises(BudgetTooLow) as caught:
        check_budget(799_999, guess)
    error = caught.value
    assert error.estimate == 800_000
    assert error.breakdown == guess.breakdown
    assert error.breakdown["per_unit"] == 20_000
    text = str(error)
    assert "budget 0.799999 is below the estimated 0.8 credits" in text
    assert "4 participants x 10 units x 0.02 per unit (recent clearing prices" in text
