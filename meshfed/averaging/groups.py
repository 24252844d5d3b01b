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

import hashlib
import math
from collections.abc import Sequence

from ..identity import PeerId

__all__ = ["Placement", "grid_shape"]


def grid_shape(peers: int, max_group: int) -> tuple[int, ...]:
    """Axis lengths for ``peers``: the fewest axes of at most ``max_group`` each whose
    product holds everyone, as equal as possible.

    Raises:
        ValueError: ``max_group < 2`` or no peers.
    """
    if max_group < 2 or peers < 1:
        raise ValueError("need at least one peer and max_group >= 2")
    axes = 1
    while max_group**axes < peers:
        axes += 1
    side = math.ceil(peers ** (1 / axes) - 1e-9)
    while side**axes < peers:
        side += 1
    shape = [side] * axes
    # Shrink axes while the grid still holds everyone (fewer empty cells, fuller groups).
    for axis in range(axes):
        while shape[axis] > 1 and math.prod(shape) // shape[axis] * (shape[axis] - 1) >= peers:
            shape[axis] -= 1
    return tuple(shape)


class Placement:
    """Where each peer of ``roster`` sits in round ``round`` of ``job``."""

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

    @property
    def steps(self) -> int:
        """Averaging steps for the exact mean (the number of axes)."""
        return len(self.shape)

    def group(self, peer: PeerId, step: int) -> tuple[int, tuple[PeerId, ...]]:
        """``(group index, members)`` of ``peer`` at ``step``; members in grid order."""
        axis = step % len(self.shape)
        mine = self._coordinates[peer]
        key = mine[:axis] + mine[axis + 1 :]
        members = sorted(
            (p for p, c in self._coordinates.items() if c[:axis] + c[axis + 1 :] == key),
            key=lambda p: self._coordinates[p][axis],
        )
        index = 0
        for position, length in zip(key, self.shape[:axis] + self.shape[axis + 1 :], strict=True):
            index = index * length + position
        return index, tuple(members)
