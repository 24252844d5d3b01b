"""Simulated devices: deterministic given a seed and a clock, and each profile behaves."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.device.config import DeviceConfig
from meshfed.device.policy import Governor, PauseReason, ThermalPressure
from meshfed.device.readings import Readings
from meshfed.device.simulator import PROFILES, DeviceProfile, SimulatedDevice

HOUR = 3600.0


def run(device: SimulatedDevice, until: float, every: float) -> list[Readings]:
    return [device.advance(t * every) for t in range(1, int(until / every) + 1)]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_the_same_seed_and_calls_give_the_same_device(name: str) -> None:
    def day(seed: int) -> tuple[list[Readings], int]:
        device = SimulatedDevice(PROFILES[name], seed=seed, step_s=10.0)
        seen = run(device, 6 * HOUR, 600.0)
        device.set_load(1.0)
        seen += [device.advance(7 * HOUR), device.advance(8 * HOUR)]
        return seen, device.crashes

    assert day(7) == day(7)


def test_another_seed_gives_another_phone() -> None:
    def network(seed: int) -> list[bool]:
        device = SimulatedDevice(PROFILES["phone"], seed=seed, step_s=10.0)
        return [r.metered for r in run(device, 12 * HOUR, 300.0)]

    assert network(1) != network(2)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 2 * HOUR), max_size=8), st.integers(0, 2**32))
def test_readings_do_not_depend_on_when_in_between_a_device_was_read(
    reads: list[float], seed: int
) -> None:
    often = SimulatedDevice(PROFILES["laptop"], seed=seed, step_s=5.0)
    for at in sorted(reads):
        often.advance(at)
    once = SimulatedDevice(PROFILES["laptop"], seed=seed, step_s=5.0)
    assert often.advance(2 * HOUR) == once.advance(2 * HOUR)
    assert often.advance(HOUR) == once.readings()  # the clock never runs backwards


def test_a_phone_drains_faster_under_load_and_charges_on_its_charger() -> None:
    steady = dataclasses.replace(
        PROFILES["phone"], on_battery_mean_s=0.0, charging_mean_s=0.0, crash_mean_s=0.0
    )
    idle, busy = SimulatedDevice(steady), SimulatedDevice(steady)
    busy.set_load(1.0)
    idle_now, busy_now = idle.advance(HOUR), busy.advance(HOUR)
    assert idle_now.battery_pct == 78 and busy_now.battery_pct == 53  # 80 - 2, 80 - 27
    assert busy_now.temperature_c is not None and idle_now.temperature_c is not None
    assert busy_now.temperature_c > idle_now.temperature_c + 15
    busy.set_load(0.0)
    busy.plug(True)
    charged = busy.advance(1.5 * HOUR)
    assert charged.charging and charged.battery_pct == 83  # 53 + 60 %/h for half an hour
    assert charged.temperature_c is not None and charged.temperature_c < 31.0  # cooled off


def test_an_empty_battery_turns_the_device_off_until_it_charges() -> None:
    weak = dataclasses.replace(
        PROFILES["iot"], start_battery_pct=1.0, on_battery_mean_s=0.0, crash_mean_s=0.0
    )
    device = SimulatedDevice(weak)
    device.set_load(1.0)
    assert not device.down
    assert device.advance(HOUR).battery_pct == 0 and device.down
    device.plug(True)
    device.advance(HOUR + 1)
    assert not device.down and device.crashes == 0


def test_a_laptop_under_load_heats_into_thermal_pressure_and_the_pause() -> None:
    governor = Governor(DeviceConfig())
    laptop = SimulatedDevice(dataclasses.replace(PROFILES["laptop"], crash_mean_s=0.0), seed=3)
    laptop.plug(True)
    laptop.set_load(1.0)
    levels = [governor.observe(r, minute=600).thermal for r in run(laptop, 900.0, 30.0)]
    assert levels[0] is ThermalPressure.NOMINAL
    assert levels == sorted(levels)  # heating only ever raises the pressure
    assert {ThermalPressure.FAIR, ThermalPressure.SERIOUS} <= set(levels)
    assert PauseReason.TEMPERATURE in governor.decision.reasons


def test_a_server_has_no_battery_and_a_wired_unmetered_link() -> None:
    server = SimulatedDevice(PROFILES["server"], seed=5, step_s=60.0)
    seen = run(server, 48 * HOUR, HOUR)
    assert all(r.battery_pct is None and r.charging is None for r in seen)
    assert not any(r.metered or r.wifi for r in seen)
    assert all(Governor(DeviceConfig()).observe(r, minute=0).allowed for r in seen)


def test_phones_switch_networks_and_iot_boards_crash_and_come_back() -> None:
    phone = SimulatedDevice(PROFILES["phone"], seed=11, step_s=10.0)
    links = {(r.wifi, r.metered) for r in run(phone, 24 * HOUR, 60.0)}
    assert links == {(True, False), (False, True)}
    board = SimulatedDevice(PROFILES["iot"], seed=11, step_s=10.0)
    down = []
    for t in range(1, 48 * 360):
        board.advance(t * 10.0)
        down.append(board.down)
    assert board.crashes >= 2
    first = down.index(True)
    assert not all(down[first:])  # it came back


@pytest.mark.parametrize(
    "changes",
    [{"drain_idle_pct_h": -1.0}, {"heat_tau_s": 0.0}, {"start_battery_pct": 101.0},
     {"ambient_c": 140.0, "heat_rise_c": 20.0}],
)  # fmt: skip
def test_an_impossible_profile_is_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="profile"):
        DeviceProfile(name="odd", **changes)  # type: ignore[arg-type]
