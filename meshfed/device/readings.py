"""What a device reports about itself now: battery, charger, heat, network, how busy it is.

A :class:`ReadingsSource` is the seam between the device policy and the machine: the node
reads the OS through :class:`~meshfed.device.sources.PsutilReadings`; an app on a platform
psutil cannot read (a phone whose battery the app's own API knows) hands in a
:class:`~meshfed.device.sources.ManualReadings` it keeps up to date; simulations and testnets
plug in :class:`~meshfed.device.simulator.SimulatedDevice`. Whatever the source,
:class:`ReadingOverrides` from the ``[device.readings]`` configuration win.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ReadingOverrides",
    "Readings",
    "ReadingsSource",
    "material_change",
]

#: the range a temperature reading is clamped to (the peer record's bounds)
MIN_TEMPERATURE_C, MAX_TEMPERATURE_C = -60.0, 150.0
#: a battery change (percentage points) worth re-signing the peer record for
BATTERY_STEP_PCT = 5
#: a temperature change (degrees) worth re-signing the peer record for
TEMPERATURE_STEP_C = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Readings:
    """The device at one moment. ``None``: the device has no such sensor.

    Attributes:
        battery_pct: charge in percent (0..100).
        charging: on a charger.
        temperature_c: the hottest sensor, in degrees Celsius.
        wifi: a Wi-Fi link is up.
        metered: the link in use is paid by the byte (cellular, a tethered phone).
        cpu_share: the share of the CPU (0..1) programs other than this node keep busy.
    """

    battery_pct: int | None = None
    charging: bool | None = None
    temperature_c: float | None = None
    wifi: bool = False
    metered: bool = False
    cpu_share: float | None = None

    def __post_init__(self) -> None:
        if self.battery_pct is not None and not 0 <= self.battery_pct <= 100:
            raise ValueError(f"battery_pct {self.battery_pct} outside [0, 100]")
        if self.temperature_c is not None and not (
            math.isfinite(self.temperature_c)
            and MIN_TEMPERATURE_C <= self.temperature_c <= MAX_TEMPERATURE_C
        ):
            raise ValueError(
                f"temperature_c {self.temperature_c!r} outside "
                f"[{MIN_TEMPERATURE_C}, {MAX_TEMPERATURE_C}]"
            )
        if self.cpu_share is not None and not (
            math.isfinite(self.cpu_share) and 0.0 <= self.cpu_share <= 1.0
        ):
            raise ValueError(f"cpu_share {self.cpu_share!r} outside [0, 1]")

    @property
    def on_battery(self) -> bool:
        """True when the device runs from its battery (it has one and no charger)."""
        return self.battery_pct is not None and not self.charging


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadingOverrides:
    """Fixed readings that replace whatever a source reports (``None``: not overridden).

    For devices whose sensors psutil cannot read, and for a link the OS does not know is
    metered: ``[device.readings]`` in the node's configuration, e.g. ``metered = true``.
    """

    battery_pct: int | None = None
    charging: bool | None = None
    temperature_c: float | None = None
    wifi: bool | None = None
    metered: bool | None = None
    cpu_share: float | None = None

    def __post_init__(self) -> None:
        self.apply(Readings())  # the same checks as a reading

    def apply(self, readings: Readings) -> Readings:
        """``readings`` with every overridden field replaced."""
        fixed = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None
        }
        return dataclasses.replace(readings, **fixed) if fixed else readings


def material_change(published: Readings, now: Readings) -> bool:
    """True if ``now`` differs from the readings in the published record enough to sign a new
    one: a charger, Wi-Fi or metered link came or went, a sensor appeared or vanished, the
    battery moved :data:`BATTERY_STEP_PCT` points or the heat :data:`TEMPERATURE_STEP_C`
    degrees. (The CPU share is not in the record.)"""
    if (published.charging, published.wifi, published.metered) != (
        now.charging,
        now.wifi,
        now.metered,
    ):
        return True
    if (published.battery_pct is None) != (now.battery_pct is None) or (
        published.temperature_c is None
    ) != (now.temperature_c is None):
        return True
    battery = abs((published.battery_pct or 0) - (now.battery_pct or 0)) >= BATTERY_STEP_PCT
    heat = abs((published.temperature_c or 0.0) - (now.temperature_c or 0.0))
    return battery or heat >= TEMPERATURE_STEP_C


class ReadingsSource(Protocol):
    """Where readings come from. ``now`` is the node's clock (``trio.current_time()``), so a
    simulated device advances with virtual time and stays deterministic."""

    async def read(self, now: float) -> Readings:
        """The readings at ``now``."""
        ...

    def set_load(self, load: float) -> None:
        """The share of the device (0..1) the node's work keeps busy from now on (a simulated
        device heats and drains by it; a real one measures its own)."""
        ...
