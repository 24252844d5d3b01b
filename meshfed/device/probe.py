"""What this machine is, read from the OS (psutil), for the node's peer record."""

from __future__ import annotations

import dataclasses
import os

import psutil

from ..membership.records import Capabilities, DatasetOffer
from .readings import Readings

__all__ = ["probe_capabilities", "published_readings", "with_readings"]


def probe_capabilities(
    *,
    roles: list[str],
    readings: Readings,
    models: list[str] | None = None,
    datasets: list[DatasetOffer] | None = None,
) -> Capabilities:
    """Capabilities from the running machine (cores, clock, memory) and ``readings``."""
    frequency = psutil.cpu_freq()
    capabilities = Capabilities(
        cpu_cores=os.cpu_count() or 0,
        cpu_ghz=round(frequency.max / 1000, 2) if frequency and frequency.max else 0.0,
        memory_mb=psutil.virtual_memory().total // (1024 * 1024),
        models=models or [],
        datasets=datasets or [],
        roles=roles,
    )
    return with_readings(capabilities, readings)


def with_readings(capabilities: Capabilities, readings: Readings) -> Capabilities:
    """``capabilities`` with the readings a peer record carries (battery, charger, heat,
    Wi-Fi, metered) replaced by ``readings``."""
    return dataclasses.replace(
        capabilities,
        battery_pct=readings.battery_pct,
        charging=readings.charging,
        temperature_c=readings.temperature_c,
        wifi=readings.wifi,
        metered=readings.metered,
    )


def published_readings(capabilities: Capabilities) -> Readings:
    """The readings a record carries (its CPU share unknown: records do not carry it), in the
    form :func:`~meshfed.device.readings.material_change` compares."""
    return Readings(
        battery_pct=capabilities.battery_pct,
        charging=capabilities.charging,
        temperature_c=capabilities.temperature_c,
        wifi=capabilities.wifi,
        metered=capabilities.metered,
    )
