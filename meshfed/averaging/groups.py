"""Moshpit groups: who averages with whom, derived from (job, round, roster) alone.

The roster is laid on a virtual grid of ``d`` axes, each at most ``max_group`` long, in an
order drawn from SHA-256(job || round || peer id) (so groups change every round, Moshpit SGD,
Ryabinin et al. 2021). Step ``s`` of a round averages along axis ``s mod d``: a group is the
peers that share every other coordinate. When every cell of the grid is filled and nobody
drops, ``d`` steps of weighted averaging give every peer the exact global weighted mean (the
``exact`` schedule); one step per round (``moshpit``) converges across rounds. A roster no
longer than ``max_group`` is one group: the exact mean in one step.

Secure groups and the collusion bound ``c`` (:mod:`meshfed.secagg.bounds`, SPEC 7c). Colluders
inside a group can declare honest members dropped until ``t`` survivors remain, and read the sum
of the ``t - c`` honest inputs among them; ``t >= c + 2`` keeps two or more inside it. Which
groups may take which inputs:

- *Individual models* (every group of the ``exact`` schedule's first step, every group of a
  ``moshpit`` step): a group needs ``t >= c + 2`` and, to tolerate a dropout, ``t < size``: at
  least :func:`~meshfed.secagg.bounds.smallest_group` members. :func:`check_secure_grid`
  refuses a job whose first-step groups can be shorter.
- *Aggregates* (later steps of ``exact``): a peer whose step 0 succeeded holds the mean of
  ``>= t - c >= 2`` honest models, known to the members of that step-0 group (maybe
  colluders). A later group of ``size >= c + 2`` keeps ``t = max(majority, c + 2)``: colluders
  inside it number ``c_in``, those outside know at most one member's aggregate each (a step-0
  group meets a later group in one cell), so every revealed sum holds ``>= t - c >= 2`` honest
  inputs unknown to the coalition; a peer whose own model is still its input (its step 0
  failed) may join. A smaller later group (a pair when ``c = 1``) sums aggregates only, with a
  majority of at least 2 against no colluder (whatever it reveals is already a sum of two
  honest models or more), and a peer still holding its own model sits it out (the training
  layer: "a peer not yet inside an aggregate sits out pairs"). :func:`check_secure_grid`
  refuses a grid with later groups of 3 to ``c + 1`` members, which the sit-out rule (pairs
  only) would let such a peer join.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import TypedDict

from ..errors import ConfigError
from ..identity import PeerId
from ..secagg.bounds import least_threshold, smallest_group

__all__ = [
    "Placement",
    "SecureGroup",
    "check_secure_grid",
    "grid_shape",
    "group_sizes",
    "secure_group",
]


def grid_shape(peers: int, max_group: int) -> tuple[int, ...]:
    """Axis lengths for ``peers``: the fewest axes of at most ``max_group`` each whose
    product holds everyone; among those, the fewest empty cells plus the shortest axes (each
    empty cell counts like one more member of an axis), longest axis first.

    Empty cells make some groups short and the ``exact`` mean inexact, so a grid that
    factors ``peers`` exactly wins (200 in groups of at most 8: 8 x 5 x 5, not 6 x 6 x 6 with 16
    empty cells); the axis lengths count as well, since every member of a group sends to every
    other one (and 62 in groups of 32 is 8 x 8 with 2 empty, not 31 x 2 with groups of two).
    The longest axis comes first: step 0 averages the raw models, in the largest groups.

    Raises:
        ValueError: ``max_group < 2`` or no peers.
    """
    if max_group < 2 or peers < 1:
        raise ValueError("need at least one peer and max_group >= 2")
    return _best_shape(peers, max_group)


@functools.lru_cache(maxsize=256)
def _best_shape(peers: int, max_group: int) -> tuple[int, ...]:
    axes = 1
    while max_group**axes < peers:
        axes += 1
    if axes == 1:
        return (peers,)
    best: tuple[int, tuple[int, ...]] | None = None

    def search(prefix: tuple[int, ...], product: int) -> None:
        nonlocal best
        low = prefix[-1] if prefix else 2
        if len(prefix) == axes - 1:  # the last axis: just long enough
            last = max(low, -(-peers // product))
            if last <= max_group:
                shape = (*prefix, last)
                cost = product * last - peers + sum(shape)
                if best is None or cost < best[0]:
                    best = (cost, shape)
            return
        for side in range(low, max_group + 1):
            if product * side * max_group ** (axes - 1 - len(prefix)) >= peers:
                search((*prefix, side), product * side)

    search((), 1)
    assert best is not None  # max_group ** axes >= peers: the all-max grid fits
    return tuple(sorted(best[1], reverse=True))


def _coordinate(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Cell ``index`` of the grid (mixed radix, the last axis fastest)."""
    digits = []
    for length in reversed(shape):
        index, digit = divmod(index, length)
        digits.append(digit)
    return tuple(reversed(digits))


def group_sizes(peers: int, shape: tuple[int, ...]) -> tuple[frozenset[int], ...]:
    """For each axis, the sizes its groups have when ``peers`` fill the first cells of
    ``shape`` (as :class:`Placement` fills it; empty cells shorten some groups)."""
    cells = [_coordinate(index, shape) for index in range(peers)]
    sizes = []
    for axis in range(len(shape)):
        counts = Counter(cell[:axis] + cell[axis + 1 :] for cell in cells)
        sizes.append(frozenset(counts.values()))
    return tuple(sizes)


class SecureGroup(TypedDict):
    """A secure group's :class:`~meshfed.secagg.protocol.GroupSpec` options."""

    threshold: int
    collusion: int


def secure_group(size: int, collusion: int) -> SecureGroup:
    """The threshold of a secure group of ``size`` in a job that resists ``collusion``
    colluding members, and the bound it resists (see the module docstring): ``max(majority,
    c + 2)`` against ``c`` when ``size >= c + 2``; else (a group of aggregates only) a
    majority of at least 2 against none."""
    if size >= collusion + 2:
        return {"threshold": least_threshold(size, collusion), "collusion": collusion}
    return {"threshold": least_threshold(size, 0), "collusion": 0}


def check_secure_grid(peers: int, max_group: int, collusion: int) -> None:
    """Refuse a secure job whose groups would let ``collusion`` members read less than two
    honest models (see the module docstring).

    Raises:
        ConfigError: naming the groups at fault and what would do instead.
    """
    if collusion < 1:
        raise ConfigError(
            f"collusion must be >= 1, not {collusion}: a member reading its own group's sum "
            "already counts as one"
        )
    least = smallest_group(collusion)
    shape = grid_shape(peers, max_group)
    sizes = group_sizes(peers, shape)
    if min(sizes[0]) < least:
        fits = next(
            (size for size in range(max_group + 1, 129) if _first_groups(peers, size) >= least),
            None,
        )
        fix = [f"a job of {least} peers or more" if peers < least else "more peers"]
        if fits is not None:
            fix.append(f"max_group {fits} or more")
        if collusion > 1:
            fix.append("a smaller collusion bound")
        raise ConfigError(
            f"secure aggregation against {collusion} colluding member(s) needs groups of "
            f"{least} or more for the trained models (smaller ones let the colluders read one "
            f"peer's model, or tolerate no dropout): {peers} peers in groups of at most "
            f"{max_group} make groups of {min(sizes[0])}; use {', '.join(fix)}, or "
            "secure=false"
        )
    risky = sorted(s for axis in sizes[1:] for s in axis if 3 <= s < collusion + 2)
    if risky:
        raise ConfigError(
            f"later averaging steps would form groups of {risky[0]}, too few against "
            f"{collusion} colluding member(s) for a peer that still holds its own model: use "
            "another max_group, a smaller collusion bound, or secure=false"
        )


def _first_groups(peers: int, max_group: int) -> int:
    """The shortest first-step group of ``peers`` in groups of at most ``max_group``."""
    return min(group_sizes(peers, grid_shape(peers, max_group))[0])


class Placement:
    """Where each peer of ``roster`` sits in round ``round`` of ``job`` (immutable; the groups
    of an axis are worked out once, on first use)."""

    def __init__(self, roster: Sequence[PeerId], *, job: bytes, round: int, max_group: int) -> None:
        self.shape = grid_shape(len(roster), max_group)
        salt = job + round.to_bytes(8, "big")
        order = sorted(roster, key=lambda p: hashlib.sha256(salt + p.raw).digest())
        self._coordinates = {
            peer: _coordinate(index, self.shape) for index, peer in enumerate(order)
        }
        self._axes: dict[int, dict[tuple[int, ...], tuple[int, tuple[PeerId, ...]]]] = {}

    @classmethod
    @functools.lru_cache(maxsize=8)
    def of(cls, roster: tuple[PeerId, ...], *, job: bytes, round: int, max_group: int) -> Placement:
        """``Placement(...)``, shared by the callers asking for the same one (a simulation's
        peers all place the same roster every round)."""
        return cls(roster, job=job, round=round, max_group=max_group)

    @property
    def steps(self) -> int:
        """Averaging steps for the exact mean (the number of axes)."""
        return len(self.shape)

    def group(self, peer: PeerId, step: int) -> tuple[int, tuple[PeerId, ...]]:
        """``(group index, members)`` of ``peer`` at ``step``; members in grid order."""
        axis = step % len(self.shape)
        mine = self._coordinates[peer]
        groups = self._axes.get(axis)
        if groups is None:
            groups = self._axes[axis] = self._groups_along(axis)
        return groups[mine[:axis] + mine[axis + 1 :]]

    def _groups_along(self, axis: int) -> dict[tuple[int, ...], tuple[int, tuple[PeerId, ...]]]:
        """Every group of ``axis``, by the coordinates its members share."""
        members: dict[tuple[int, ...], list[PeerId]] = {}
        for peer, coordinate in self._coordinates.items():
            members.setdefault(coordinate[:axis] + coordinate[axis + 1 :], []).append(peer)
        others = self.shape[:axis] + self.shape[axis + 1 :]
        groups = {}
        for key, peers in members.items():
            index = 0
            for position, length in zip(key, others, strict=True):
                index = index * length + position
            peers.sort(key=lambda p: self._coordinates[p][axis])
            groups[key] = (index, tuple(peers))
        return groups
