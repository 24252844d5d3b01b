"""Fixed-point arithmetic for masked sums: linear stochastic quantization into Z_2^k.

A value ``x`` clipped to ``[-clip, clip]`` maps to an integer level in ``[0, L]`` with
``L = 2^q - 1``: ``y = (x + clip) / (2 clip) * L``, rounded down or up at random with the
probability that makes the rounding unbiased (``E[level] = y``). Levels are summed in the ring
Z_2^k (``k`` = 32, or 16 for the 8-bit mode), where pairwise masks cancel. The sum of ``g``
levels is exact only if it cannot wrap: ``g x L < 2^k``, which :func:`check_capacity` enforces
before any masking starts.

Both directions run a cache-sized chunk at a time with no temporaries: the rounding randomness
is AES-CTR keystream (eight times faster than numpy's float generator), the arithmetic float64
where it decides a level and float32 where it only rescales a mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .prg import Keystream

__all__ = ["Levels", "Quantizer", "check_capacity"]

_DTYPES: dict[int, np.dtype[np.unsignedinteger[Any]]] = {
    16: np.dtype(np.uint16),
    32: np.dtype(np.uint32),
}
Levels = npt.NDArray[np.unsignedinteger[Any]]
_SIGNED: dict[int, np.dtype[np.signedinteger[Any]]] = {  # L < 2^(k-1): levels fit either
    16: np.dtype(np.int16),
    32: np.dtype(np.int32),
}
_CHUNK = 1 << 16  # elements per pass: the float64 scratch arrays stay in L2 (1 MiB here)
_UNIT = 2.0**-32  # U = (r xor 2^31) 2^-32 = int32(r) 2^-32 + 1/2 for a keystream word r


def check_capacity(group_size: int, levels_bits: int, ring_bits: int) -> None:
    """Refuse a configuration whose group sum could wrap around the ring.

    Raises:
        ValueError: saying which limit to lower.
    """
    if ring_bits not in _DTYPES:
        raise ValueError(f"ring_bits must be 16 or 32, not {ring_bits}")
    top = (1 << levels_bits) - 1
    if group_size * top >= 1 << ring_bits:
        raise ValueError(
            f"{group_size} peers x {top} levels does not fit Z_2^{ring_bits}: use at most "
            f"{((1 << ring_bits) - 1) // top} peers per group, or fewer quantization bits"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Quantizer:
    """Linear stochastic quantization of float vectors into ring elements.

    Attributes:
        clip: values are clipped to ``[-clip, clip]`` first (this is also the robustness norm:
            no single peer can move a coordinate by more than ``2 clip / g``).
        levels_bits: ``q``; 8 for the 8-bit mode (summed in Z_2^16), up to 24 in Z_2^32.
        ring_bits: ``k``, 16 or 32.
    """

    clip: float
    levels_bits: int
    ring_bits: int

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, not {self.clip}")
        if not 1 <= self.levels_bits < self.ring_bits:
            raise ValueError(f"levels_bits must be in 1..{self.ring_bits - 1}")
        check_capacity(1, self.levels_bits, self.ring_bits)

    @property
    def top(self) -> int:
        """The largest level, ``L = 2^q - 1``."""
        return (1 << self.levels_bits) - 1

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger[Any]]:
        """The numpy dtype of ring elements (wrap-around arithmetic is the ring's)."""
        return _DTYPES[self.ring_bits]

    def quantize(
        self,
        values: npt.NDArray[np.floating[Any]],
        rng: np.random.Generator,
        *,
        out: Levels | None = None,
    ) -> Levels:
        """As :meth:`quantize_clipped`, without the count."""
        return self.quantize_clipped(values, rng, out=out)[0]

    def quantize_clipped(
        self,
        values: npt.NDArray[np.floating[Any]],
        rng: np.random.Generator,
        *,
        out: Levels | None = None,
    ) -> tuple[Levels, int]:
        """Levels of ``values`` (into ``out``, a flat array of ``dtype``, if given):
        ``floor(y + U)``, which rounds ``y`` up with probability ``frac(y)`` (unbiased), with
        ``U`` uniform on the multiples of 2^-32 in [0, 1), from the AES-256-CTR keystream keyed
        by 32 bytes drawn from ``rng`` (4 bytes per value). Computed in float64: a level differs
        from the exact one only if ``y + U`` lies within 2^(q-50) of an integer. Returns the
        levels and how many values lay beyond ``[-clip, clip]`` (counted only in the chunks
        whose extremes pass it, so a vector inside costs one more pass, a max).

        Raises:
            ValueError: a NaN among ``values``, or a wrong ``out``.
        """
        flat = np.ascontiguousarray(values).reshape(-1)
        levels: Levels = np.empty(flat.shape, dtype=self.dtype) if out is None else out
        if levels.shape != flat.shape or levels.dtype != self.dtype:
            raise ValueError(f"out must be a flat {self.dtype} array of {len(flat)} elements")
        signed = levels.view(_SIGNED[self.ring_bits])  # float64 converts to it faster
        # a numpy float64 scale: float32 values times a Python float would multiply in float32
        scale, shift = np.float64(self.top / (2 * self.clip)), self.top / 2 + 0.5
        stream = Keystream(rng.bytes(32), dtype=np.dtype(np.uint32))
        size = min(_CHUNK, len(flat))
        work, noise, words = np.empty(size), np.empty(size), np.empty(size, np.uint32)
        clipped = 0
        for start in range(0, len(flat), _CHUNK):
            part = flat[start : start + _CHUNK]
            low, high = part.min(), part.max()
            if np.isnan(low):
                raise ValueError("cannot quantize NaN")
            if low < -self.clip or high > self.clip:
                clipped += int(np.count_nonzero(part > self.clip))
                clipped += int(np.count_nonzero(part < -self.clip))
            y, u, r = work[: len(part)], noise[: len(part)], words[: len(part)]
            np.multiply(part, scale, out=y)
            stream.fill(r)
            np.multiply(r.view(np.int32), _UNIT, out=u)
            u += shift
            y += u  # y + U, y unclipped: clipping after the floor gives the same level
            np.clip(y, 0, self.top, out=y)
            np.copyto(signed[start : start + _CHUNK], y, casting="unsafe")  # floor: y >= 0
        return levels.reshape(np.shape(values)), clipped

    def decode(
        self,
        total: Levels,
        count: int,
        *,
        mean: bool = False,
        out: npt.NDArray[np.floating[Any]] | None = None,
    ) -> npt.NDArray[np.floating[Any]]:
        """The float sum (float64) of ``count`` peers' values from the ring sum of their levels,
        or with ``mean`` their mean as float32 (what models use, computed in float32: within a
        few float32 ulps of ``clip``); into ``out`` if given.

        Raises:
            ValueError: if ``count`` peers' levels could have wrapped around the ring, or
                ``out`` does not have ``total``'s shape.
        """
        check_capacity(count, self.levels_bits, self.ring_bits)
        step, offset = 2 * self.clip / self.top, count * self.clip
        if mean:
            step, offset = step / count, self.clip
        result = np.empty(total.shape, np.float32 if mean else np.float64) if out is None else out
        if result.shape != total.shape:
            raise ValueError(f"out has shape {result.shape}, not {total.shape}")
        flat_in, flat_out = total.reshape(-1), result.reshape(-1)
        kind = flat_out.dtype.type
        for start in range(0, len(flat_in), _CHUNK):
            part = flat_out[start : start + _CHUNK]
            np.copyto(part, flat_in[start : start + _CHUNK], casting="unsafe")
            part *= kind(step)
            part -= kind(offset)
        return result
