"""Simulated devices for simulations and testnets: phones, IoT boards, laptops, servers.

A :class:`SimulatedDevice` is a :class:`~meshfed.device.readings.ReadingsSource`. Its state
advances in fixed steps of ``step_s`` up to the time it is read at, so that the same seed, the
same profile and the same calls (reads, load changes, charger) at the same clock times give
the same readings, whatever else runs:

- the battery drains at ``drain_idle_pct_h`` idle and up to ``drain_load_pct_h`` at full
  load, and fills at ``charge_pct_h`` on the charger; an empty battery off the charger turns
  the device off until it charges;
- the temperature relaxes towards ``ambient_c + heat_rise_c * load`` with time constant
  ``heat_tau_s``;
- the charger, the network (Wi-Fi or metered) and crashes switch as two-state processes with
  exponential dwell times (mean ``*_mean_s``; 0: never switches); a crash keeps the device
  down for ``down_s``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .readings import Readings

__all__ = ["PROFILES", "DeviceProfile", "SimulatedDevice"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """How a kind of device behaves (rates per hour, times in seconds; see the module
    docstring). ``battery`` false: mains powered, no battery readings."""

    name: str
    battery: bool = True
    start_battery_pct: float = 80.0
    drain_idle_pct_h: float = 2.0
    drain_load_pct_h: float = 20.0
    charge_pct_h: float = 50.0
    on_battery_mean_s: float = 0.0
    charging_mean_s: float = 0.0
    ambient_c: float = 30.0
    heat_rise_c: float = 20.0
    heat_tau_s: float = 120.0
    wired: bool = False
    wifi_mean_s: float = 0.0
    metered_mean_s: float = 0.0
    owner_cpu_share: float = 0.0
    crash_mean_s: float = 0.0
    down_s: float = 60.0

    def __post_init__(self) -> None:
        rates = (self.drain_idle_pct_h, self.drain_load_pct_h, self.charge_pct_h)
        means = (
            self.on_battery_mean_s,
            self.charging_mean_s,
            self.wifi_mean_s,
            self.metered_mean_s,
            self.crash_mean_s,
            self.down_s,
        )
        if not all(math.isfinite(x) and x >= 0 for x in (*rates, *means)):
            raise ValueError(f"profile {self.name}: rates and times must be finite and >= 0")
        if not (0.0 <= self.start_battery_pct <= 100.0 and 0.0 <= self.owner_cpu_share <= 1.0):
            raise ValueError(f"profile {self.name}: start battery or owner CPU out of range")
        if not (
            self.heat_tau_s > 0
            and self.heat_rise_c >= 0
            and -60.0 <= self.ambient_c <= self.ambient_c + self.heat_rise_c <= 150.0
        ):
            raise ValueError(
                f"profile {self.name}: heat_tau_s > 0, and ambient and ambient + heat_rise "
                "in [-60, 150]"
            )


#: the stock profiles, by name
PROFILES: Mapping[str, DeviceProfile] = MappingProxyType(
    {
        "phone": DeviceProfile(
            name="phone", drain_idle_pct_h=2.0, drain_load_pct_h=25.0, charge_pct_h=60.0,
            on_battery_mean_s=6 * 3600, charging_mean_s=2 * 3600, ambient_c=30.0,
            heat_rise_c=20.0, heat_tau_s=120.0, wifi_mean_s=3600.0, metered_mean_s=1200.0,
            owner_cpu_share=0.1, crash_mean_s=24 * 3600, down_s=60.0,
        ),
        "iot": DeviceProfile(
            name="iot", start_battery_pct=60.0, drain_idle_pct_h=1.0, drain_load_pct_h=10.0,
            charge_pct_h=20.0, on_battery_mean_s=12 * 3600, charging_mean_s=6 * 3600,
            ambient_c=35.0, heat_rise_c=30.0, heat_tau_s=300.0, wifi_mean_s=0.0,
            metered_mean_s=0.0, crash_mean_s=6 * 3600, down_s=30.0,
        ),
        "laptop": DeviceProfile(
            name="laptop", drain_idle_pct_h=8.0, drain_load_pct_h=40.0, charge_pct_h=50.0,
            on_battery_mean_s=3 * 3600, charging_mean_s=4 * 3600, ambient_c=40.0,
            heat_rise_c=45.0, heat_tau_s=60.0, wifi_mean_s=4 * 3600, metered_mean_s=600.0,
            owner_cpu_share=0.2, crash_mean_s=72 * 3600, down_s=120.0,
        ),
        "server": DeviceProfile(
            name="server", battery=False, ambient_c=35.0, heat_rise_c=35.0, heat_tau_s=180.0,
            wired=True, owner_cpu_share=0.05, crash_mean_s=30 * 24 * 3600, down_s=300.0,
        ),
    }
)  # fmt: skip


class SimulatedDevice:
    """One simulated device; deterministic given ``seed`` and the clock it is read with.

    Args:
        profile: how it behaves (a :data:`PROFILES` entry, or your own).
        seed: the seed of its switching processes.
        start: the clock time it starts at.
        step_s: the integration step.
    """

    def __init__(
        self, profile: DeviceProfile, *, seed: int = 0, start: float = 0.0, step_s: float = 1.0
    ) -> None:
        if not step_s > 0:
            raise ValueError(f"step_s must be > 0, not {step_s!r}")
        self.profile = profile
        self.step_s = step_s
        self._rng = random.Random(seed)
        self._now = start
        self._load = 0.0
        self.battery_pct = profile.start_battery_pct
        self.charging = not profile.battery
        self.temperature_c = profile.ambient_c
        self.metered = False
        #: seconds of down time left (a crash, or an empty battery until it charges)
        self.down_for = 0.0
        #: crashes so far (an empty battery is not counted)
        self.crashes = 0

    # -- the ReadingsSource seam ---------------------------------------------------------

    async def read(self, now: float) -> Readings:
        """The readings at ``now`` (see :meth:`advance`)."""
        return self.advance(now)

    def set_load(self, load: float) -> None:
        """The share of the device the node's work keeps busy, from the next step on."""
        if not (math.isfinite(load) and 0.0 <= load <= 1.0):
            raise ValueError(f"load {load!r} outside [0, 1]")
        self._load = load

    # -- driving it ----------------------------------------------------------------------

    def plug(self, charging: bool) -> None:
        """Put the device on (or off) its charger now (no effect without a battery)."""
        if self.profile.battery:
            self.charging = charging

    @property
    def down(self) -> bool:
        """True while crashed or out of battery."""
        return self.down_for > 0 or self._empty()

    def advance(self, now: float) -> Readings:
        """Run the device up to ``now`` in whole steps and return its readings; an earlier
        ``now`` than the last changes nothing."""
        while self._now + self.step_s <= now:
            self._step(self.step_s)
            self._now += self.step_s
        return self.readings()

    def readings(self) -> Readings:
        """The readings as of the last step."""
        profile = self.profile
        return Readings(
            battery_pct=round(self.battery_pct) if profile.battery else None,
            charging=self.charging if profile.battery else None,
            temperature_c=round(self.temperature_c, 1),
            wifi=not profile.wired and not self.metered,
            metered=self.metered,
            cpu_share=profile.owner_cpu_share,
        )

    def _step(self, dt: float) -> None:
        profile, rng = self.profile, self._rng
        # the same draws every step, whatever the state: a run is a function of seed and calls
        flip_charger, flip_network, crash = rng.random(), rng.random(), rng.random()
        load = 0.0 if self.down else self._load
        if profile.battery:
            mean = profile.charging_mean_s if self.charging else profile.on_battery_mean_s
            if _switches(flip_charger, mean, dt):
                self.charging = not self.charging
            if self.charging:
                self.battery_pct = min(100.0, self.battery_pct + profile.charge_pct_h * dt / 3600)
            else:
                rate = profile.drain_idle_pct_h + load * profile.drain_load_pct_h
                self.battery_pct = max(0.0, self.battery_pct - rate * dt / 3600)
        if profile.metered_mean_s and not profile.wired:
            mean = profile.metered_mean_s if self.metered else profile.wifi_mean_s
            if _switches(flip_network, mean, dt):
                self.metered = not self.metered
        target = profile.ambient_c + profile.heat_rise_c * load
        cooled = 1 - math.exp(-dt / profile.heat_tau_s)
        self.temperature_c += (target - self.temperature_c) * cooled
        if self.down_for > 0:
            self.down_for = max(0.0, self.down_for - dt)
        elif _switches(crash, profile.crash_mean_s, dt):
            self.crashes += 1
            self.down_for = profile.down_s

    def _empty(self) -> bool:
        return self.profile.battery and self.battery_pct <= 0.0 and not self.charging


def _switches(draw: float, mean_s: float, dt: float) -> bool:
    """Whether a two-state process with mean dwell ``mean_s`` (0: never) leaves its state in
    a step of ``dt``, given a uniform ``draw``."""
    return mean_s > 0 and draw < 1 - math.exp(-dt / mean_s)
