"""Argument checks shared by the market's stored books (ledger, leases, reputation): what a
row may hold, checked at their public edge with ``ValueError`` before anything is written."""

from __future__ import annotations

import math

from .terms import MAX_AMOUNT

# internal to the market's books, which import the module (``from . import _checks as check``)
__all__: list[str] = []

#: the longest job id kept
MAX_JOB_LEN = 128
#: the largest signed envelope (an award, a debit note or acknowledgement) kept with a row
MAX_ENVELOPE = 64 * 1024
#: the largest unit number (and number of units in a lease)
MAX_UNIT = 2**40


def amount(value: int, what: str = "an amount") -> int:
    """``value`` if it is an int in (0, MAX_AMOUNT] micro-credits, else ValueError."""
    if type(value) is not int or not 0 < value <= MAX_AMOUNT:
        raise ValueError(f"{what} is an int in (0, {MAX_AMOUNT}] micro-credits: {value!r}")
    return value


def job_id(value: str) -> str:
    """``value`` if it is a job id of 1 to MAX_JOB_LEN characters, else ValueError."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_JOB_LEN:
        raise ValueError(f"a job id is a str of 1 to {MAX_JOB_LEN} characters: {value!r}")
    return value


def unit(value: int, *, least: int = 0) -> int:
    """``value`` if it is an int in [least, MAX_UNIT], else ValueError."""
    if type(value) is not int or not least <= value <= MAX_UNIT:
        raise ValueError(f"a unit count or number is an int in [{least}, {MAX_UNIT}]: {value!r}")
    return value


def envelope(value: bytes, *, required: bool = True) -> bytes:
    """``value`` if it is bytes of at most MAX_ENVELOPE (and not empty if ``required``), else
    ValueError."""
    if not isinstance(value, bytes) or not int(required) <= len(value) <= MAX_ENVELOPE:
        raise ValueError(
            f"a signed envelope kept here is bytes, {int(required)} to {MAX_ENVELOPE} long"
        )
    return value


def instant(value: float) -> float:
    """``value`` as a float if it is a finite time (seconds since the epoch), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"a time is a finite number of seconds: {value!r}")
    return float(value)
