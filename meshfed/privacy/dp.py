"""Clipping and Gaussian noise for one peer's model update (DP-FedAvg, McMahan et al. 2018).

A peer's update ``x - base`` is clipped to L2 norm ``clip``, so that no peer moves the sum by
more than ``clip`` (the sensitivity). Noise is *distributed*: each peer adds
``N(0, (noise_multiplier clip)^2 / min_contributors)`` so that a sum over at least
``min_contributors`` peers carries at least ``N(0, (noise_multiplier clip)^2)``, the Gaussian
mechanism the accountant charges. ``min_contributors`` is the fewest peers a group sum can have
(its threshold), never the hoped-for group size: with fewer survivors than hoped, there is more
noise than charged, not less. Secure aggregation keeps each peer's share of the noise hidden.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["clip_update", "privatize"]


def clip_update(update: npt.NDArray[np.float32], clip: float) -> npt.NDArray[np.float32]:
    """``update`` scaled down to L2 norm ``clip`` if it is longer."""
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if norm <= clip or norm == 0.0:
        return update
    return (update * (clip / norm)).astype(np.float32)


def privatize(
    update: npt.NDArray[np.float32],
    *,
    clip: float,
    noise_multiplier: float,
    min_contributors: int,
    rng: np.random.Generator,
) -> npt.NDArray[np.float32]:
    """The clipped update plus this peer's share of the noise."""
    if clip <= 0 or noise_multiplier < 0 or min_contributors < 1:
        raise ValueError("clip > 0, noise_multiplier >= 0, min_contributors >= 1")
    clipped = clip_update(update, clip)
    std = noise_multiplier * clip / math.sqrt(min_contributors)
    noise = rng.normal(0.0, std, clipped.shape).astype(np.float32)
    return clipped + noise
