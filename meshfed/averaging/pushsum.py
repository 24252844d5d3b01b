"""Push-sum gossip (Kempe et al. 2003; Stochastic Gradient Push, Assran et al. 2019).

Each peer holds a numerator ``x`` and a weight ``w`` (1 at the start). At every tick it keeps
half of both and pushes the other half to one peer; whatever arrives is added. The sums of
``x`` and of ``w`` over the mesh never change, and every peer's estimate ``x / w`` converges to
the average, with no rounds, no barrier and no group: the mode for meshes with heavy churn. A
local training step moves the estimate: ``x += w (z' - z)`` where ``z = x / w`` before the step
and ``z'`` after it.

Peers push along a time-varying exponential graph (peer ``i`` pushes to ``i + 2^k`` for
``k = tick mod ceil(log2 n)``), which mixes in O(log n) ticks (SGP's choice).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["PushSumState", "push_target"]

Vector = npt.NDArray[np.float32]


class PushSumState:
    """One peer's push-sum numerator and weight."""

    def __init__(self, initial: Vector) -> None:
        self.x = initial.astype(np.float64)
        self.weight = 1.0

    def estimate(self) -> Vector:
        """The de-biased value ``x / w``."""
        estimate: Vector = (self.x / self.weight).astype(np.float32)
        return estimate

    def move_to(self, new_estimate: Vector) -> None:
        """Make the estimate ``new_estimate`` (after local training), keeping the weight."""
        self.x = new_estimate.astype(np.float64) * self.weight

    def split(self) -> Vector:
        """Keep half; return the other half as one message ``[x / 2, w / 2]`` (float32)."""
        self.x /= 2
        self.weight /= 2
        message = np.empty(len(self.x) + 1, np.float32)
        message[:-1] = self.x
        message[-1] = self.weight
        return message

    def absorb(self, message: Vector) -> None:
        """Add a pushed half.

        Raises:
            ValueError: a message of the wrong length, or a weight that is not a positive,
                finite number (a peer must not be able to poison the estimate with 0 or NaN).
        """
        if message.shape != (len(self.x) + 1,):
            raise ValueError(f"a push carries {len(self.x) + 1} values, not {message.shape}")
        weight = float(message[-1])
        if not (math.isfinite(weight) and weight > 0) or not np.all(np.isfinite(message)):
            raise ValueError("a push needs finite values and a positive weight")
        self.x += message[:-1]
        self.weight += weight


def push_target(index: int, peers: int, tick: int) -> int:
    """Whom peer ``index`` of ``peers`` pushes to at ``tick`` (never itself for peers >= 2)."""
    hops = max(1, math.ceil(math.log2(peers)))
    return (index + (1 << (tick % hops))) % peers
