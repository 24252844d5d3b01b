"""Secret randomness for differential privacy: the OS's cryptographic generator, a Gaussian
sampler with the least-significant-bit defence, and Poisson sampling.

Everything here draws from ``os.urandom`` (Linux: ``getrandom``, the kernel's ChaCha20 CSPRNG),
never from a seed a job spec makes public, nor from numpy's PCG64 or torch's MT19937 (whose
state can be recovered from their outputs).

The Gaussian is floating point: Box-Muller on two 53-bit uniforms, in float64 (|z| <= 8.58
standard deviations: ``sqrt(-2 ln 2^-53)``). A floating-point release ``x + z`` reveals ``x``
through its low-order bits (Mironov 2012, the least-significant-bit attack): the set of doubles
that ``x + z`` can be depends on ``x``. :meth:`SecureRandom.release` therefore rounds ``x + z``
to a multiple of a power-of-two grid ``g`` between ``std / 2^13`` and ``std / 2^12`` before it
leaves float64 (snapping, Mironov's defence, here for the Gaussian): every released value is a
multiple of ``g`` whatever ``x`` is, the grid is far coarser than float64's spacing near the
values involved, and far finer than the noise (a Gaussian discretized at ``std / 4096``).
Converting to float32 afterwards is post-processing of that rounded value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_DEVIATIONS", "SecureRandom", "grid_for"]

#: the noise's std spans 2^12 to 2^13 grid steps
_GRID_BITS = 12
#: no Box-Muller draw is further from 0 than this many standard deviations (1 - u >= 2^-53)
MAX_DEVIATIONS = math.sqrt(-2.0 * math.log(2.0**-53))


def grid_for(std: float) -> float:
    """The power-of-two grid a release with noise ``std`` is rounded to."""
    if not std > 0:
        raise ValueError("the noise std must be > 0")
    return math.ldexp(1.0, math.floor(math.log2(std)) - _GRID_BITS)


class SecureRandom:
    """Uniforms, Bernoulli draws and Gaussian noise from a cryptographic byte source.

    Args:
        source: ``n -> n`` random bytes (``os.urandom``; tests may pass another).
    """

    def __init__(self, source: Callable[[int], bytes] = os.urandom) -> None:
        self._source = source

    def uniform(self, count: int) -> npt.NDArray[np.float64]:
        """``count`` uniforms in [0, 1), each a 53-bit integer over 2^53."""
        words = np.frombuffer(self._source(8 * count), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def bernoulli(self, count: int, rate: float) -> npt.NDArray[np.bool_]:
        """``count`` independent draws, each true with probability ``rate`` (to 2^-53)."""
        return self.uniform(count) < rate

    def gaussian(self, count: int, std: float) -> npt.NDArray[np.float64]:
        """``count`` draws of N(0, std^2) (Box-Muller; float64, before any rounding)."""
        pairs = (count + 1) // 2
        radius = np.sqrt(-2.0 * np.log1p(-self.uniform(pairs)))  # 1 - u in (0, 1]
        angle = 2.0 * math.pi * self.uniform(pairs)
        both = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        return both[:count] * std

    def release(
        self,
        values: npt.NDArray[np.floating[Any]],
        std: float,
        *,
        noise: npt.NDArray[np.float64] | None = None,
    ) -> npt.NDArray[np.float32]:
        """``values + N(0, std^2)`` (or ``+ noise``, drawn with that std), rounded to the grid of
        ``std``, as float32: what a peer may let out."""
        if noise is None:
            noise = self.gaussian(values.size, std).reshape(values.shape)
        grid = grid_for(std)
        noisy = values.astype(np.float64) + noise
        released: npt.NDArray[np.float32] = (np.round(noisy / grid) * grid).astype(np.float32)
        return released
