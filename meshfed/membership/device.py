"""What this machine can do, read from the OS (psutil), for the node's peer record."""

from __future__ import annotations

import os

import psutil

from .records import Capabilities, DatasetOffer

__all__ = ["probe_capabilities"]


def probe_capabilities(
    *,
    roles: list[str],
    models: list[str] | None = None,
    datasets: list[DatasetOffer] | None = None,
) -> Capabilities:
    """Capabilities from the running machine: cores, clock, memory, battery, temperature."""
    frequency = psutil.cpu_freq()
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    temperature: float | None = None
    readings = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
    hottest = [t.current for sensors in readings.values() for t in sensors if t.current]
    if hottest:
        temperature = max(-60.0, min(150.0, float(max(hottest))))
    return Capabilities(
        cpu_cores=os.cpu_count() or 0,
        cpu_ghz=round(frequency.max / 1000, 2) if frequency and frequency.max else 0.0,
        memory_mb=psutil.virtual_memory().total // (1024 * 1024),
        battery_pct=None if battery is None else round(battery.percent),
        charging=None if battery is None else bool(battery.power_plugged),
        temperature_c=temperature,
        models=models or [],
        datasets=datasets or [],
        roles=roles,
    )
