"""The device policy: readings and the local time in, a decision out (sans-IO).

A :class:`Governor` holds the configuration (:class:`~meshfed.device.config.DeviceConfig`) and
its last decision. :meth:`Governor.observe` takes readings and the minute of the local day and
answers whether the device lends itself to work now, and if not, every reason why:

- ``battery``: on battery (not charging) below ``min_battery_pct``. A charger always clears
  it, whatever the charge;
- ``temperature``: at or above ``max_temperature_c``;
- ``metered``: ``pause_on_metered`` and the link is metered;
- ``cpu``: other programs keep more than ``max_cpu_share`` of the CPU busy;
- ``quiet_hours``: the minute falls in a quiet window.

A limit, once crossed, clears only with a margin (:data:`BATTERY_MARGIN_PCT`,
:data:`TEMPERATURE_MARGIN_C`, :data:`CPU_MARGIN`), so that a reading that wavers at the limit
does not pause and resume the node at every refresh. The decision also carries the thermal
pressure, from ``warm_temperature_c`` up: local training scales its batch by
:attr:`DeviceDecision.batch_scale`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import MINUTES_PER_DAY, DeviceConfig
from .readings import Readings

__all__ = [
    "BATTERY_MARGIN_PCT",
    "CPU_MARGIN",
    "TEMPERATURE_MARGIN_C",
    "DeviceDecision",
    "Governor",
    "PauseReason",
    "ThermalPressure",
]

#: a battery pause clears at ``min_battery_pct`` plus this (or on a charger)
BATTERY_MARGIN_PCT = 5
#: a temperature pause clears at ``max_temperature_c`` less this
TEMPERATURE_MARGIN_C = 5.0
#: a CPU pause clears at ``max_cpu_share`` less this
CPU_MARGIN = 0.1


class PauseReason(enum.StrEnum):
    """Why the device takes no work now."""

    #: on battery, below ``min_battery_pct``
    BATTERY = "battery"
    #: at or above ``max_temperature_c``
    TEMPERATURE = "temperature"
    #: on a metered link with ``pause_on_metered``
    METERED = "metered"
    #: other programs keep the CPU busier than ``max_cpu_share``
    CPU = "cpu"
    #: in a quiet window of the local day
    QUIET_HOURS = "quiet_hours"


class ThermalPressure(enum.IntEnum):
    """How hot the device runs, between ``warm_temperature_c`` and ``max_temperature_c``."""

    #: below warm, or no sensor
    NOMINAL = 0
    #: in the lower half of the warm range
    FAIR = 1
    #: in the upper half of the warm range
    SERIOUS = 2
    #: at or above the maximum (paused)
    CRITICAL = 3


#: the share of its batch local training keeps at each pressure
_BATCH_SCALE = {
    ThermalPressure.NOMINAL: 1.0,
    ThermalPressure.FAIR: 0.75,
    ThermalPressure.SERIOUS: 0.5,
    ThermalPressure.CRITICAL: 0.25,
}


@dataclass(frozen=True, slots=True)
class DeviceDecision:
    """Whether the device takes work now: ``reasons`` empty means allowed."""

    reasons: tuple[PauseReason, ...] = ()
    thermal: ThermalPressure = ThermalPressure.NOMINAL

    @property
    def allowed(self) -> bool:
        """True when no limit holds the device back."""
        return not self.reasons

    @property
    def batch_scale(self) -> float:
        """The share (0..1] of its configured batch size local training uses now."""
        return _BATCH_SCALE[self.thermal]

    def describe(self) -> str:
        """One line for a log, a decline's detail or a status: ``device paused: battery``."""
        if self.allowed:
            return "device allowed"
        return "device paused: " + ", ".join(reason.value for reason in self.reasons)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form, for logs and status."""
        return {
            "allowed": self.allowed,
            "reasons": [reason.value for reason in self.reasons],
            "thermal": self.thermal.name.lower(),
            "batch_scale": self.batch_scale,
        }


class Governor:
    """The policy's state: the configuration and the last decision (for the margins).

    Args:
        config: the ``[device]`` section.
    """

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self._windows = config.quiet_windows
        self.decision = DeviceDecision()

    def observe(self, readings: Readings, *, minute: int) -> DeviceDecision:
        """Decide on ``readings`` at ``minute`` of the local day (0..1439); the decision is
        also kept in :attr:`decision`.

        Raises:
            ValueError: ``minute`` is not a minute of a day.
        """
        if not 0 <= minute < MINUTES_PER_DAY:
            raise ValueError(f"minute {minute} is not in 0..{MINUTES_PER_DAY - 1}")
        config, held = self.config, set(self.decision.reasons)
        reasons: set[PauseReason] = set()
        if readings.on_battery and config.min_battery_pct > 0:
            floor = config.min_battery_pct
            if PauseReason.BATTERY in held:
                floor += BATTERY_MARGIN_PCT
            if (readings.battery_pct or 0) < floor:
                reasons.add(PauseReason.BATTERY)
        if readings.temperature_c is not None:
            ceiling = config.max_temperature_c
            if PauseReason.TEMPERATURE in held:
                ceiling -= TEMPERATURE_MARGIN_C
                if readings.temperature_c > ceiling:
                    reasons.add(PauseReason.TEMPERATURE)
            elif readings.temperature_c >= ceiling:
                reasons.add(PauseReason.TEMPERATURE)
        if config.pause_on_metered and readings.metered:
            reasons.add(PauseReason.METERED)
        if readings.cpu_share is not None:
            busiest = config.max_cpu_share
            if PauseReason.CPU in held:
                busiest -= CPU_MARGIN
            if readings.cpu_share > busiest:
                reasons.add(PauseReason.CPU)
        if any(window.contains(minute) for window in self._windows):
            reasons.add(PauseReason.QUIET_HOURS)
        self.decision = DeviceDecision(
            tuple(reason for reason in PauseReason if reason in reasons), self._thermal(readings)
        )
        return self.decision

    def _thermal(self, readings: Readings) -> ThermalPressure:
        heat = readings.temperature_c
        warm, hot = self.config.warm_temperature_c, self.config.max_temperature_c
        if heat is None or heat < warm:
            return ThermalPressure.NOMINAL
        if heat >= hot:
            return ThermalPressure.CRITICAL
        return ThermalPressure.FAIR if heat < (warm + hot) / 2 else ThermalPressure.SERIOUS
