"""Readings sources: the running machine (psutil) and readings an application sets itself."""

from __future__ import annotations

import dataclasses

import psutil

from .readings import MAX_TEMPERATURE_C, MIN_TEMPERATURE_C, Readings

__all__ = ["ManualReadings", "PsutilReadings"]

#: interface name prefixes of cellular modems (Linux wwan, Android rmnet/ccmni/pdp): metered
_CELLULAR = ("wwan", "rmnet", "ccmni", "pdp", "ppp")
#: interface name prefixes of Wi-Fi adapters (Linux wlan0, wlp2s0; Android wlan0)
_WIFI = ("wl",)


class ManualReadings:
    """Readings an application sets itself (:meth:`set`), for platforms psutil cannot read."""

    def __init__(self, readings: Readings | None = None) -> None:
        self.readings = readings or Readings()

    def set(self, **fields: object) -> None:
        """Change some readings, e.g. ``set(battery_pct=14, charging=False)``.

        Raises:
            ValueError: a reading out of range (nothing changes).
        """
        self.readings = dataclasses.replace(self.readings, **fields)  # type: ignore[arg-type]

    async def read(self, now: float) -> Readings:
        """The readings last set."""
        return self.readings

    def set_load(self, load: float) -> None:
        """Nothing: the application reports what its device does."""


class PsutilReadings:
    """The running machine's readings, from psutil, where the platform has them.

    Battery and charger from ``sensors_battery``, the hottest of ``sensors_temperatures``, Wi-Fi
    and cellular links from the names of the interfaces that are up (``wl*``; ``wwan*``,
    ``rmnet*``, ``ccmni*``, ``pdp*``, ``ppp*`` count as metered), and the CPU share of every
    other program (the whole machine's less this process's) since the previous read. A link
    the OS cannot name as metered (a phone's hotspot over Wi-Fi) needs the override.
    """

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._last = self._cpu_times()

    def _cpu_times(self) -> tuple[float, float, float]:
        """The machine's busy and total CPU seconds, and this process's (own counters, not
        psutil's shared ``cpu_percent`` state: many nodes may share one process)."""
        machine = psutil.cpu_times()
        total = sum(machine)
        idle = machine.idle + getattr(machine, "iowait", 0.0)
        own = self._process.cpu_times()
        return total - idle, total, own.user + own.system

    async def read(self, now: float) -> Readings:
        """Read the sensors now (a fraction of a millisecond: on the loop, so that virtual
        clocks do not run on while a worker thread reads)."""
        return self.read_now()

    def set_load(self, load: float) -> None:
        """Nothing: the machine's own load is measured."""

    def read_now(self) -> Readings:
        """The readings, read synchronously."""
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        temperature: float | None = None
        sensors = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
        hottest = [t.current for group in sensors.values() for t in group if t.current]
        if hottest:
            temperature = max(MIN_TEMPERATURE_C, min(MAX_TEMPERATURE_C, float(max(hottest))))
        up = [name for name, stats in psutil.net_if_stats().items() if stats.isup]
        busy, total, own = self._cpu_times()
        last_busy, last_total, last_own = self._last
        self._last = (busy, total, own)
        spent = total - last_total  # CPU seconds of every core together
        others = (busy - last_busy - (own - last_own)) / spent if spent > 0 else 0.0
        return Readings(
            battery_pct=None if battery is None else max(0, min(100, round(battery.percent))),
            charging=None if battery is None else bool(battery.power_plugged),
            temperature_c=temperature,
            wifi=any(name.startswith(_WIFI) for name in up),
            metered=any(name.startswith(_CELLULAR) for name in up),
            cpu_share=max(0.0, min(1.0, others)),
        )
