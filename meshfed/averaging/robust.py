"""Byzantine-robust aggregation of a group's vectors (outside secure aggregation).

Each function takes the stacked vectors (one row per peer) and returns one vector, so that a
few peers sending arbitrary vectors (scaled, sign-flipped, noise) cannot move the result far:

- :func:`median`: coordinate-wise median (Yin et al. 2018).
- :func:`trimmed_mean`: per coordinate, drop the ``trim`` fraction of largest and smallest
  values, average the rest (Yin et al. 2018).
- :func:`krum`: the vector (or the mean of the ``m`` vectors, multi-Krum) with the smallest sum
  of squared distances to its ``n - f - 2`` nearest others (Blanchard et al. 2017).
- :func:`centered_clip`: self-centred clipping (ClippedGossip, He et al. 2022): start from this
  peer's own vector and move by the mean of everyone's differences, each clipped to norm
  ``tau``, for a few iterations.

All are deterministic functions of their input, so peers that gathered the same vectors agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["AGGREGATORS", "centered_clip", "krum", "median", "trimmed_mean"]

Stack = npt.NDArray[np.float32]
Vector = npt.NDArray[np.float32]


def median(stack: Stack) -> Vector:
    """Coordinate-wise median."""
    return np.median(stack, axis=0).astype(np.float32)


def trimmed_mean(stack: Stack, trim: float = 0.2) -> Vector:
    """Coordinate-wise mean without the ``trim`` fraction at each end (at least one value
    is kept).

    Raises:
        ValueError: unless ``0 <= trim < 0.5``.
    """
    if not 0 <= trim < 0.5:
        raise ValueError("trim must be in [0, 0.5)")
    count = len(stack)
    cut = min(int(trim * count), (count - 1) // 2)
    ordered = np.sort(stack, axis=0)
    kept: Vector = ordered[cut : count - cut].mean(axis=0).astype(np.float32)
    return kept


def krum(stack: Stack, f: int = 1, m: int = 1) -> Vector:
    """(Multi-)Krum for at most ``f`` Byzantine rows: the mean of the ``m`` rows whose
    ``n - f - 2`` nearest neighbours are closest.

    Raises:
        ValueError: fewer than ``2 f + 3`` rows, or ``m`` outside ``1..n``.
    """
    count = len(stack)
    if count < 2 * f + 3 or not 1 <= m <= count:
        raise ValueError(f"Krum needs at least {2 * f + 3} vectors for f={f} and 1 <= m <= n")
    flat = stack.astype(np.float64)
    squared = np.sum(flat * flat, axis=1)
    distances = squared[:, None] + squared[None, :] - 2 * flat @ flat.T
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(distances, axis=1)[:, : count - f - 2]
    scores = nearest.sum(axis=1)
    chosen = np.argsort(scores, kind="stable")[:m]
    best: Vector = stack[chosen].mean(axis=0).astype(np.float32)
    return best


def centered_clip(stack: Stack, center: Vector, tau: float = 1.0, iterations: int = 3) -> Vector:
    """Self-centred clipping around ``center`` (this peer's own vector).

    Raises:
        ValueError: ``tau <= 0``.
    """
    if not tau > 0:
        raise ValueError("tau must be > 0")
    result = center.astype(np.float64)
    for _ in range(iterations):
        differences = stack.astype(np.float64) - result
        norms = np.linalg.norm(differences, axis=1, keepdims=True)
        scale = np.minimum(1.0, tau / np.maximum(norms, 1e-12))
        result = result + (differences * scale).mean(axis=0)
    return result.astype(np.float32)


AGGREGATORS: dict[str, Callable[..., Any]] = {
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "centered_clip": centered_clip,
}
"""The robust aggregators by name (``JobSpec.robust``)."""
