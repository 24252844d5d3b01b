"""The ``[device]`` section of a node's configuration: when the device lends itself to work.

::

    [device]
    refresh_s = 30.0             # how often readings are taken (0: once, at start)
    min_battery_pct = 20         # on battery, pause below this charge (0: never)
    max_temperature_c = 85.0     # pause at or above this temperature
    warm_temperature_c = 65.0    # thermal pressure (smaller batches) starts here
    pause_on_metered = true      # no work on a metered link
    max_cpu_share = 1.0          # pause while other programs keep more of the CPU busy
    quiet_hours = ["23:00-07:00"]   # local time; a window may cross midnight

    [device.readings]            # fixed readings, for what psutil cannot read
    metered = true
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .readings import ReadingOverrides

__all__ = ["DeviceConfig", "QuietWindow"]

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
MINUTES_PER_DAY = 24 * 60


@dataclass(frozen=True, slots=True)
class QuietWindow:
    """Minutes of the local day ``[start, end)`` with no work; ``end < start`` crosses
    midnight (``23:00-07:00``)."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> QuietWindow:
        """``"HH:MM-HH:MM"`` (24-hour local time).

        Raises:
            ConfigError: not that form, or an empty window (start equals end).
        """
        found = _WINDOW.match(text)
        if found is None:
            raise ConfigError(f"device.quiet_hours: {text!r} is not HH:MM-HH:MM (24-hour)")
        h1, m1, h2, m2 = (int(part) for part in found.groups())
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise ConfigError(f"device.quiet_hours: {text!r} is empty (start equals end)")
        return cls(start, end)

    def contains(self, minute: int) -> bool:
        """True if ``minute`` of the day (0..1439) falls in the window."""
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


@dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    """When this device works. See the module docstring for the keys and their defaults.

    Raises:
        ConfigError: a value out of range, named ``device.<key>``.
    """

    refresh_s: float = 30.0
    min_battery_pct: int = 20
    max_temperature_c: float = 85.0
    warm_temperature_c: float = 65.0
    pause_on_metered: bool = True
    max_cpu_share: float = 1.0
    quiet_hours: list[str] = field(default_factory=list)
    readings: ReadingOverrides = field(default_factory=ReadingOverrides)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.refresh_s) and self.refresh_s >= 0):
            raise ConfigError(f"device.refresh_s: must be >= 0 seconds, got {self.refresh_s!r}")
        if not 0 <= self.min_battery_pct <= 100:
            raise ConfigError(f"device.min_battery_pct: {self.min_battery_pct} outside [0, 100]")
        if not (
            math.isfinite(self.warm_temperature_c)
            and math.isfinite(self.max_temperature_c)
            and -60.0 <= self.warm_temperature_c < self.max_temperature_c <= 150.0
        ):
            raise ConfigError(
                f"device.max_temperature_c: {self.max_temperature_c!r} must be above "
                f"warm_temperature_c {self.warm_temperature_c!r}, both in [-60, 150]"
            )
        if not (math.isfinite(self.max_cpu_share) and 0.0 < self.max_cpu_share <= 1.0):
            raise ConfigError(f"device.max_cpu_share: {self.max_cpu_share!r} outside (0, 1]")
        for window in self.quiet_hours:
            QuietWindow.parse(window)

    @property
    def quiet_windows(self) -> tuple[QuietWindow, ...]:
        """``quiet_hours``, parsed."""
        return tuple(QuietWindow.parse(window) for window in self.quiet_hours)

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any], source: str) -> DeviceConfig:
        """The section as TOML or JSON gives it (``readings`` a nested table).

        Raises:
            ConfigError: an unknown key or a wrong type, naming ``device.<key>`` and
                ``source``.
        """
        values: dict[str, Any] = {}
        for key, value in document.items():
            if key == "readings":
                if not isinstance(value, Mapping):
                    raise ConfigError(f"device.readings (from {source}): expected a table")
                values[key] = _build(ReadingOverrides, value, "device.readings", source)
            else:
                values[key] = value
        return _build(cls, values, "device", source)

    def to_toml(self) -> str:
        """The section as TOML (what :meth:`from_mapping` reads back)."""
        lines = ["[device]"]
        for item in dataclasses.fields(self):
            if item.name != "readings":
                lines.append(f"{item.name} = {_toml(getattr(self, item.name))}")
        fixed = [
            f"{item.name} = {_toml(getattr(self.readings, item.name))}"
            for item in dataclasses.fields(self.readings)
            if getattr(self.readings, item.name) is not None
        ]
        if fixed:
            lines += ["", "[device.readings]", *fixed]
        return "\n".join(lines) + "\n"


T = typing.TypeVar("T")


def _build(kind: type[T], values: Mapping[str, Any], prefix: str, source: str) -> T:
    hints = typing.get_type_hints(kind)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"{prefix}.{key} (from {source}): unknown key; known: {', '.join(hints)}"
            )
        if not _fits(hints[key], value):
            raise ConfigError(f"{prefix}.{key} (from {source}): {value!r} is not a {hints[key]}")
    fixed = {
        key: float(value) if float in _options(hints[key]) and type(value) is int else value
        for key, value in values.items()
    }
    try:
        return kind(**fixed)
    except ValueError as exc:  # ReadingOverrides checks ranges with ValueError
        raise ConfigError(f"{prefix} (from {source}): {exc}") from None


def _options(hint: Any) -> set[Any]:
    """The types ``hint`` admits (``int | None``: ``{int}``; a float field takes an int)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = set(typing.get_args(hint)) if union else {hint}
    options.discard(type(None))
    return options | {int} if float in options else options


def _fits(hint: Any, value: Any) -> bool:
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return type(value) in _options(hint)  # exact: a bool is no int here


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return repr(value)
