"""How many survivors a secure group needs, against how many colluding members.

A run needs ``t`` survivors and at most ``c`` members collude (the collusion bound). Colluders
that declare honest members dropped can shrink the survivor set to ``t`` members, ``c`` of them
their own, and learn the sum of the other ``t - c``: so ``t >= c + 2`` keeps at least two honest
inputs inside every sum that is revealed, and ``t`` stays a majority so that two survivor sets
cannot both be signed. A group of ``size`` tolerates ``size - t`` dropouts; a size that
tolerates none is refused.
"""

from __future__ import annotations

from ..errors import ConfigError

__all__ = [
    "DEFAULT_COLLUSION",
    "dropouts_tolerated",
    "honest_survivors",
    "least_threshold",
    "smallest_group",
    "threshold_for",
]

#: colluding members a group resists unless the job says otherwise
DEFAULT_COLLUSION = 1


def smallest_group(collusion: int = DEFAULT_COLLUSION) -> int:
    """The smallest group that resists ``collusion`` members and still tolerates one dropout."""
    return max(collusion + 3, 3)


def least_threshold(size: int, collusion: int = DEFAULT_COLLUSION) -> int:
    """``max(size // 2 + 1, collusion + 2)``: the least threshold that resists ``collusion``
    (it may reach or pass ``size``: :func:`threshold_for` refuses such groups)."""
    return max(size // 2 + 1, collusion + 2)


def threshold_for(size: int, collusion: int = DEFAULT_COLLUSION) -> int:
    """The survivors a group of ``size`` needs: ``max(size // 2 + 1, collusion + 2)``.

    Raises:
        ConfigError: ``collusion`` is negative, or a group of ``size`` would tolerate no
            dropout under it (the message names the smallest size that does).
    """
    if collusion < 0:
        raise ConfigError(f"the collusion bound must be >= 0, not {collusion}")
    threshold = least_threshold(size, collusion)
    if threshold >= size:
        raise ConfigError(
            f"a secure group of {size} against {collusion} colluding member(s) needs all "
            f"{size} to survive (threshold {threshold}): no dropout tolerance is left; use "
            f"groups of {smallest_group(collusion)} or more"
        )
    return threshold


def dropouts_tolerated(size: int, collusion: int = DEFAULT_COLLUSION) -> int:
    """How many members of a group of ``size`` may drop and the run still finish."""
    return size - threshold_for(size, collusion)


def honest_survivors(size: int, collusion: int = DEFAULT_COLLUSION) -> int:
    """The fewest honest inputs inside any sum a group of ``size`` reveals (``t - c``)."""
    return threshold_for(size, collusion) - collusion
