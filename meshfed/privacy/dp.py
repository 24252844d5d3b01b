"""Clipping and Gaussian noise for one peer's model update (DP-FedAvg, McMahan et al. 2018).

A peer's update ``x - base`` is clipped to L2 norm ``clip``, so that no peer moves a sum by
more than ``clip`` (the sensitivity). The noise lives beside the vector until it leaves:
:class:`OwnNoise` holds what the peer's own vector carries this round and tops it up (an
independent Gaussian of the missing variance) whenever the vector is about to enter a sum
that needs more (:mod:`.policy` says how much); every release is rounded to the noise's grid
(:meth:`.noise.SecureRandom.release`).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from .noise import SecureRandom

__all__ = ["OwnNoise", "clip_update"]


def clip_update(update: npt.NDArray[np.float32], clip: float) -> npt.NDArray[np.float32]:
    """``update`` scaled down to L2 norm ``clip`` if it is longer."""
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if norm <= clip or norm == 0.0:
        return update
    return (update * (clip / norm)).astype(np.float32)


class OwnNoise:
    """The Gaussian noise a peer's own (not yet aggregated) vector of ``size`` carries."""

    def __init__(self, size: int, random: SecureRandom) -> None:
        self._random = random
        self.vector = np.zeros(size, np.float64)
        #: its standard deviation (0: none yet)
        self.std = 0.0

    def top_up(self, std: float) -> None:
        """Make the noise's std at least ``std`` (never less: what was added stays)."""
        if std > self.std:
            missing = math.sqrt(std**2 - self.std**2)
            self.vector += self._random.gaussian(len(self.vector), missing)
            self.std = std

    def release(self, values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``values`` plus this noise, rounded to its grid: what may leave the peer."""
        if self.std == 0:
            return values
        return self._random.release(values, self.std, noise=self.vector)
