"""The device policy core: readings and the minute of the day in, a decision out."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.device.config import DeviceConfig, QuietWindow
from meshfed.device.policy import (
    BATTERY_MARGIN_PCT,
    TEMPERATURE_MARGIN_C,
    DeviceDecision,
    Governor,
    PauseReason,
    ThermalPressure,
)
from meshfed.device.readings import Readings
from meshfed.errors import ConfigError

NOON = 12 * 60

readings = st.builds(
    Readings,
    battery_pct=st.none() | st.integers(0, 100),
    charging=st.none() | st.booleans(),
    temperature_c=st.none() | st.floats(-60.0, 150.0),
    wifi=st.booleans(),
    metered=st.booleans(),
    cpu_share=st.none() | st.floats(0.0, 1.0),
)
configs = st.builds(
    DeviceConfig,
    min_battery_pct=st.integers(0, 100),
    max_temperature_c=st.floats(0.0, 150.0),
    warm_temperature_c=st.just(-60.0),
    pause_on_metered=st.booleans(),
    max_cpu_share=st.floats(0.05, 1.0),
    quiet_hours=st.lists(st.sampled_from(["23:00-07:00", "12:00-13:30", "00:00-00:01"])),
)


@given(configs, st.lists(readings, max_size=6), st.integers(0, 100), st.integers(0, 1439))
def test_a_charger_always_overrides_the_minimum_battery(
    config: DeviceConfig, history: list[Readings], charge: int, minute: int
) -> None:
    governor = Governor(config)
    for earlier in history:  # whatever came before (a battery pause held, say)
        governor.observe(earlier, minute=minute)
    decision = governor.observe(Readings(battery_pct=charge, charging=True), minute=minute)
    assert PauseReason.BATTERY not in decision.reasons


@given(configs, st.lists(readings, min_size=1, max_size=6), st.integers(0, 1439))
def test_a_decision_is_allowed_exactly_when_no_limit_holds(
    config: DeviceConfig, history: list[Readings], minute: int
) -> None:
    governor = Governor(config)
    for now in history:
        decision = governor.observe(now, minute=minute)
        assert decision.allowed == (decision.reasons == ())
        assert decision == governor.decision
        assert list(decision.reasons) == sorted(set(decision.reasons), key=list(PauseReason).index)
        if now.on_battery and (now.battery_pct or 0) < config.min_battery_pct:
            assert not decision.allowed  # below the limit is never allowed, held or not
        if config.pause_on_metered and now.metered:
            assert PauseReason.METERED in decision.reasons
        if now.temperature_c is not None and now.temperature_c >= config.max_temperature_c:
            assert PauseReason.TEMPERATURE in decision.reasons


def test_battery_below_the_limit_pauses_and_clears_with_a_margin_or_a_charger() -> None:
    governor = Governor(DeviceConfig(min_battery_pct=20))
    on_battery = Readings(battery_pct=20, charging=False)
    assert governor.observe(on_battery, minute=NOON).allowed
    low = governor.observe(dataclasses.replace(on_battery, battery_pct=19), minute=NOON)
    assert low.reasons == (PauseReason.BATTERY,)
    # back at the limit, and just under the margin: still paused (no flapping)
    for pct in (20, 20 + BATTERY_MARGIN_PCT - 1):
        again = governor.observe(dataclasses.replace(on_battery, battery_pct=pct), minute=NOON)
        assert again.reasons == (PauseReason.BATTERY,)
    back = dataclasses.replace(on_battery, battery_pct=20 + BATTERY_MARGIN_PCT)
    assert governor.observe(back, minute=NOON).allowed
    governor.observe(dataclasses.replace(on_battery, battery_pct=3), minute=NOON)
    assert governor.observe(Readings(battery_pct=3, charging=True), minute=NOON).allowed


def test_no_battery_and_a_zero_minimum_never_pause_for_battery() -> None:
    assert Governor(DeviceConfig()).observe(Readings(), minute=NOON).allowed
    empty = Readings(battery_pct=0, charging=False)
    assert Governor(DeviceConfig(min_battery_pct=0)).observe(empty, minute=NOON).allowed


def test_heat_raises_pressure_then_pauses_and_clears_below_the_margin() -> None:
    config = DeviceConfig(warm_temperature_c=60.0, max_temperature_c=80.0)
    governor = Governor(config)

    def at(temperature: float) -> DeviceDecision:
        return governor.observe(Readings(temperature_c=temperature), minute=NOON)

    assert at(59.9).thermal is ThermalPressure.NOMINAL and at(59.9).batch_scale == 1.0
    assert at(60.0).thermal is ThermalPressure.FAIR
    assert at(70.0).thermal is ThermalPressure.SERIOUS and at(70.0).allowed
    hot = at(80.0)
    assert hot.thermal is ThermalPressure.CRITICAL and hot.reasons == (PauseReason.TEMPERATURE,)
    assert not at(80.0 - TEMPERATURE_MARGIN_C + 0.1).allowed
    cooled = at(80.0 - TEMPERATURE_MARGIN_C)
    assert cooled.allowed and cooled.batch_scale == 0.5


@given(st.floats(-60.0, 150.0), st.floats(-60.0, 150.0))
def test_more_heat_never_means_less_pressure_or_a_bigger_batch(t1: float, t2: float) -> None:
    cool, hot = sorted((t1, t2))
    config = DeviceConfig(warm_temperature_c=50.0, max_temperature_c=90.0)
    first = Governor(config).observe(Readings(temperature_c=cool), minute=NOON)
    second = Governor(config).observe(Readings(temperature_c=hot), minute=NOON)
    assert first.thermal <= second.thermal
    assert 0 < second.batch_scale <= first.batch_scale <= 1


def test_metered_links_and_busy_cpus_pause_when_configured() -> None:
    metered = Readings(metered=True)
    assert Governor(DeviceConfig()).observe(metered, minute=NOON).reasons == (PauseReason.METERED,)
    assert Governor(DeviceConfig(pause_on_metered=False)).observe(metered, minute=NOON).allowed
    governor = Governor(DeviceConfig(max_cpu_share=0.5))
    assert governor.observe(Readings(cpu_share=0.5), minute=NOON).allowed
    assert governor.observe(Readings(cpu_share=0.6), minute=NOON).reasons == (PauseReason.CPU,)
    assert not governor.observe(Readings(cpu_share=0.45), minute=NOON).allowed  # the margin
    assert governor.observe(Readings(cpu_share=0.4), minute=NOON).allowed


def test_every_reason_is_given_at_once() -> None:
    config = DeviceConfig(quiet_hours=["22:00-06:00"], max_cpu_share=0.5)
    worst = Readings(battery_pct=1, charging=False, temperature_c=99.0, metered=True, cpu_share=1.0)
    decision = Governor(config).observe(worst, minute=23 * 60)
    assert decision.reasons == tuple(PauseReason)
    assert decision.describe() == "device paused: battery, temperature, metered, cpu, quiet_hours"
    assert DeviceDecision().describe() == "device allowed"
    assert decision.to_json() == {
        "allowed": False,
        "reasons": [reason.value for reason in PauseReason],
        "thermal": "critical",
        "batch_scale": 0.25,
    }


@given(st.integers(0, 1439), st.integers(0, 1439), st.integers(0, 1439))
def test_quiet_windows_hold_the_minutes_from_start_up_to_end_across_midnight(
    start: int, end: int, minute: int
) -> None:
    if start == end:
        return
    text = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
    window = QuietWindow.parse(text)
    inside, walk = set(), start
    while walk != end:  # walk the clock forward from start, wrapping at midnight
        inside.add(walk)
        walk = (walk + 1) % 1440
    assert window.contains(minute) == (minute in inside)
    decision = Governor(DeviceConfig(quiet_hours=[text])).observe(Readings(), minute=minute)
    assert decision.allowed == (minute not in inside)


def test_a_window_across_midnight() -> None:
    window = QuietWindow.parse("23:00-07:00")
    assert window.contains(23 * 60) and window.contains(0) and window.contains(7 * 60 - 1)
    assert not window.contains(7 * 60) and not window.contains(NOON)


@pytest.mark.parametrize("text", ["7:00-8:00", "24:00-01:00", "10:00-10:00", "10:00", ""])
def test_a_bad_quiet_window_is_refused_by_name(text: str) -> None:
    with pytest.raises(ConfigError, match=r"device\.quiet_hours"):
        DeviceConfig(quiet_hours=[text])


def test_a_minute_outside_the_day_is_the_callers_error() -> None:
    with pytest.raises(ValueError, match="minute"):
        Governor(DeviceConfig()).observe(Readings(), minute=1440)
