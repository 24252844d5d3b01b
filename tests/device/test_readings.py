"""Readings, their overrides, the ``[device]`` section, and what counts as a material change."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from meshfed.config import NodeConfig
from meshfed.device.config import DeviceConfig
from meshfed.device.probe import probe_capabilities, published_readings, with_readings
from meshfed.device.readings import ReadingOverrides, Readings, material_change
from meshfed.device.sources import ManualReadings, PsutilReadings
from meshfed.errors import ConfigError


def test_overrides_replace_only_what_they_set() -> None:
    phone = Readings(battery_pct=40, charging=False, temperature_c=31.0, wifi=True, cpu_share=0.2)
    hotspot = ReadingOverrides(metered=True, wifi=False)
    assert hotspot.apply(phone) == dataclasses.replace(phone, metered=True, wifi=False)
    assert ReadingOverrides().apply(phone) is phone


@pytest.mark.parametrize(
    "fields", [{"battery_pct": 101}, {"temperature_c": 151.0}, {"cpu_share": 1.5}]
)
def test_out_of_range_readings_and_overrides_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Readings(**fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ReadingOverrides(**fields)  # type: ignore[arg-type]


def test_the_device_table_loads_from_a_file_with_its_readings(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        "mdns = false\n[device]\nmin_battery_pct = 30\nmax_temperature_c = 70\n"
        'quiet_hours = ["23:00-07:00"]\n[device.readings]\nmetered = true\nbattery_pct = 50\n'
    )
    config = NodeConfig.load(toml_path=toml, env={})
    assert config.device == DeviceConfig(
        min_battery_pct=30,
        max_temperature_c=70.0,
        quiet_hours=["23:00-07:00"],
        readings=ReadingOverrides(metered=True, battery_pct=50),
    )
    printed = tmp_path / "printed.toml"
    printed.write_text(config.to_toml())  # `meshfed-node config` prints a loadable file
    assert NodeConfig.load(toml_path=printed, env={}) == config


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("min_battery_pct = 120", "device.min_battery_pct: 120 outside"),
        ("min_battery = 20", "device.min_battery (from file"),
        ("pause_on_metered = 1", "device.pause_on_metered (from file"),
        ("max_cpu_share = 0", "device.max_cpu_share"),
        ("warm_temperature_c = 90.0", "device.max_temperature_c"),
        ("readings = 3", "device.readings (from file"),
        ("[device.readings]\nbattery_pct = 200", "battery_pct 200 outside"),
        ("[device.readings]\nvoltage = 3", "device.readings.voltage (from file"),
    ],
)
def test_a_bad_device_key_is_named_with_its_source(
    tmp_path: Path, section: str, message: str
) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(f"[device]\n{section}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        NodeConfig.load(toml_path=toml, env={})


def test_a_device_table_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('device = "phone"\n')
    with pytest.raises(ConfigError, match=r"device \(from file .*\): expected a \[device\] table"):
        NodeConfig.load(toml_path=toml, env={})


@given(
    st.integers(0, 100),
    st.integers(-4, 4),
    st.floats(0.0, 100.0),
    st.floats(-1.9, 1.9),
)
def test_small_drifts_are_not_material_and_flips_are(
    battery: int, drift: int, heat: float, warmer: float
) -> None:
    before = Readings(battery_pct=battery, charging=False, temperature_c=heat, wifi=True)
    after = dataclasses.replace(
        before, battery_pct=max(0, min(100, battery + drift)), temperature_c=heat + warmer
    )
    assert not material_change(before, after)
    for flip in ({"charging": True}, {"wifi": False}, {"metered": True}, {"battery_pct": None}):
        assert material_change(before, dataclasses.replace(after, **flip))  # type: ignore[arg-type]
    assert material_change(before, dataclasses.replace(before, battery_pct=(battery + 5) % 101))
    assert material_change(before, dataclasses.replace(before, temperature_c=heat + 2.5))


def test_the_record_carries_the_readings_but_the_cpu_share() -> None:
    now = Readings(battery_pct=12, charging=False, temperature_c=44.5, metered=True, cpu_share=0.3)
    capabilities = probe_capabilities(roles=["trainer"], readings=now)
    assert capabilities.cpu_cores >= 1 and capabilities.memory_mb > 0
    assert published_readings(capabilities) == dataclasses.replace(now, cpu_share=None)
    charged = with_readings(capabilities, Readings(battery_pct=90, charging=True))
    assert (charged.battery_pct, charged.charging, charged.metered) == (90, True, False)
    assert charged.roles == ["trainer"] and charged.memory_mb == capabilities.memory_mb


async def test_an_application_sets_its_own_readings() -> None:
    source = ManualReadings()
    source.set(battery_pct=14, charging=False)
    assert await source.read(0.0) == Readings(battery_pct=14, charging=False)
    with pytest.raises(ValueError):
        source.set(battery_pct=-1)
    assert (await source.read(1.0)).battery_pct == 14  # a refused change changes nothing


async def test_this_machine_is_read_within_the_bounds() -> None:
    source = PsutilReadings()
    await trio.sleep(0.05)
    now = await source.read(trio.current_time())
    assert now.cpu_share is not None and 0.0 <= now.cpu_share <= 1.0
    assert (now.battery_pct is None) == (now.charging is None)
