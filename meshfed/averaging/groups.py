"""Moshpit groups: who averages with whom, derived from (job, round, roster) alone.

The roster is laid on a virtual grid of ``d`` axes, each at most ``max_group`` long, in an
order drawn from SHA-256(job || round || peer id) (so groups change every round, Moshpit SGD,
Ryabinin et al. 2021). Step ``s`` of a round averages along axis ``s mod d``: a group is the
peers that share every other coordinate. When every cell of the grid is filled and nobody
drops, ``d`` steps of weighted averaging give every peer the exact global weighted mean (the
``exact`` schedule); one step per round (``moshpit``) converges across rounds. A roster no
longer than ``max_group`` is one group: the exact mean in one step.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

from ..identity import PeerId

__all__ = ["Placement", "grid_shape"]


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


class Placement:
    """Where each peer of ``roster`` sits in round ``round`` of ``job`` (immutable; the groups
    of an axis are worked out once, on first use)."""

    def __init__(self, roster: Sequence[PeerId], *, job: bytes, round: int, max_group: int) -> None:
        self.shape = grid_shape(len(roster), max_group)
        salt = job + round.to_bytes(8, "big")
        order = sorted(roster, key=lambda p: hashlib.sha256(salt + p.raw).digest())
        self._coordinates: dict[PeerId, tuple[int, ...]] = {}
        for index, peer in enumerate(order):
            coordinate = []
            for length in reversed(self.shape):
                index, digit = divmod(index, length)
                coordinate.append(digit)
            self._coordinates[peer] = tuple(reversed(coordinate))
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
