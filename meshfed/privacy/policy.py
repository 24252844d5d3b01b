"""Which differentially private jobs can keep their guarantee, and how much noise each vector
a peer lets out must carry.

Peer-level DP (``dp_mode = update``) clips a peer's update to ``dp_clip = C`` and needs every
release that holds it to carry Gaussian noise of std at least ``sigma C`` (``sigma`` =
``dp_noise_multiplier``), the mechanism the accountant charges:

- a vector that others see on its own (plain butterfly, ``robust``, ``topk``, push-sum), or
  that enters a secure sum as the only input counted on for it (a peer left out of its
  round's first sum), carries all of it: :func:`share_std` ``= sigma C``;
- in the round's first secure sum, of a group of ``g``, each member adds only a share,
  ``sigma C / sqrt(h)``, ``h = honest_survivors(g, c)`` (:mod:`..secagg.bounds`): any sum the
  group reveals holds at least ``h`` honest members' inputs, so at least ``sigma C`` of noise
  that the ``c`` colluders cannot subtract. A group whose size leaves no such bound gets the
  whole noise from each member.

A share is exact only if the sum is: the secure quantizer clips each value to
``[-clip, clip]``, so before its share is added a peer clamps its vector to ``clip`` minus the
sampler's largest draw (:func:`clamp_bound`), and a job with no room left is refused.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..secagg.bounds import DEFAULT_COLLUSION, honest_survivors
from .noise import MAX_DEVIATIONS, grid_for

if TYPE_CHECKING:
    from ..training.spec import JobSpec

__all__ = ["check", "clamp_bound", "honest_floor", "share_std"]


def honest_floor(size: int, collusion: int = DEFAULT_COLLUSION) -> int:
    """The honest inputs counted on in a secure sum of a group of ``size`` (1 when the group
    guarantees none beyond the peer itself)."""
    try:
        return max(1, honest_survivors(size, collusion))
    except ConfigError:
        return 1


def share_std(spec: JobSpec, size: int, *, first: bool) -> float:
    """The noise std a peer's own vector needs to enter a sum in a group of ``size``:
    a share when the job is secure and the sum is the round's first, else all of it."""
    full = spec.privacy.dp_noise_multiplier * spec.privacy.dp_clip
    if not (spec.averaging.secure and first):
        return full
    return full / math.sqrt(honest_floor(size, spec.averaging.collusion))


def clamp_bound(spec: JobSpec, std: float) -> float:
    """How far from 0 a coordinate may be before a share of ``std`` is added, so that the
    quantizer never clips the noisy value (the sum stays exact)."""
    return spec.averaging.clip - MAX_DEVIATIONS * std - grid_for(std)


def check(spec: JobSpec) -> None:
    """Refuse a differentially private job whose guarantee would not hold (its budget is
    checked by :class:`~meshfed.training.spec.PrivacySpec`).

    Raises:
        ConfigError: secure peer-level DP leaves the quantizer no room for the noise share
            of the smallest secure group.
    """
    if not spec.privacy.dp_clip:
        return
    if spec.averaging.secure and spec.privacy.dp_mode == "update":
        # shares are used only where h >= 2, so none exceeds sigma C / sqrt(2)
        largest = spec.privacy.dp_noise_multiplier * spec.privacy.dp_clip / math.sqrt(2)
        if clamp_bound(spec, largest) <= 0:
            raise ConfigError(
                f"secure peer-level DP adds noise shares of std up to {largest:.3g}, which the "
                f"quantizer's clip {spec.averaging.clip} would cut (the sum must be exact for the "
                f"shares to add up): set clip above {MAX_DEVIATIONS * largest:.3g}, or lower "
                "dp_noise_multiplier x dp_clip"
            )
