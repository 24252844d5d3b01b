"""Codecs for float32 vectors on the wire: fp16, 8-bit stochastic quantization, top-k.

A :class:`Codec` turns a 1-D float32 vector into a *payload* (one array that travels as any
other, SPEC.md "Compressed arrays") and back. ``decode`` is the receive-side check: a payload of
the wrong dtype or length, with a non-finite number or (top-k) an index out of range or
repeated is a :class:`~meshfed.errors.RemoteProtocolError` with reason ``bad_array``;
``encode`` refuses a non-finite input with a :class:`~meshfed.errors.LocalProtocolError`.

- :class:`Float32`: the vector itself (no compression).
- :class:`Float16`: IEEE half precision, values saturated at +-65504; error
  ``|x' - x| <= 2^-11 |x|`` for ``2^-14 <= |x| <= 65504``, ``<= 2^-25`` below.
- :class:`Int8`: per chunk of ``chunk`` elements, ``lo = min``, ``step = (max - min) / 255``
  and one byte per element, ``floor((x - lo) / step + U)`` with ``U`` uniform in [0, 1): the
  rounding is unbiased, ``E[x'] = x``, and ``|x' - x| < step``.
- :class:`TopK`: the ``k`` largest-magnitude entries as (index, value) pairs; every other
  entry decodes as 0. Biased on its own: :class:`ErrorFeedback` carries what was not sent into
  the next round (Stich et al., NeurIPS 2018), so that nothing is lost, only delayed.

Top-k needs every peer's own sparse vector, so it averages by an all-gather, never by the
butterfly (an owner's slice sum is dense again); under secure aggregation only linear
quantization sums correctly inside the masks (:class:`~meshfed.secagg.ring.Quantizer`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import LocalProtocolError, RemoteProtocolError
from ..stats import RejectReason

__all__ = ["Codec", "ErrorFeedback", "Float16", "Float32", "Int8", "TopK", "codec_named"]

Vector = npt.NDArray[np.float32]
Payload = npt.NDArray[Any]
_FP16_MAX = 65504.0
_PASS = 1 << 16  # elements per pass: temporaries stay in cache


class Codec(ABC):
    """How a float32 vector travels. Implementations are immutable and thread-safe."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The codec and its parameters: bound into a run's context, so that peers with
        different codecs never mix their arrays."""

    @abstractmethod
    def encode(self, values: Vector, rng: np.random.Generator) -> Payload:
        """The payload for ``values`` (1-D float32).

        Raises:
            LocalProtocolError: ``values`` holds NaN or infinity.
        """

    @abstractmethod
    def decode(self, payload: Payload, size: int) -> Vector:
        """The float32 vector of ``size`` elements that ``payload`` carries (a new array).

        Raises:
            RemoteProtocolError: ``bad_array``: wrong dtype or length, a non-finite number, or
                an index out of range or repeated.
        """


def _finite(values: Vector) -> None:
    if values.ndim != 1 or values.dtype != np.float32:
        raise ValueError("values must be a 1-D float32 array")
    if not np.isfinite(values).all():
        raise LocalProtocolError("cannot compress a vector holding NaN or infinity")


def _bad(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(detail, reason=RejectReason.BAD_ARRAY)


def _expect(payload: Payload, dtype: str, length: int, what: str) -> None:
    if payload.dtype.str != dtype or payload.shape != (length,):
        raise _bad(f"{what}: {length} elements of {dtype}, not {payload.shape} {payload.dtype.str}")


@dataclass(frozen=True, slots=True)
class Float32(Codec):
    """No compression: the float32 vector itself (what travels when compression is off)."""

    @property
    def name(self) -> str:
        return "none"

    def encode(self, values: Vector, rng: np.random.Generator) -> Payload:
        """``values`` itself (not copied)."""
        return values

    def decode(self, payload: Payload, size: int) -> Vector:
        """The payload, checked to be ``size`` float32 (it is not copied)."""
        _expect(payload, "<f4", size, "uncompressed vector")
        return payload


@dataclass(frozen=True, slots=True)
class Float16(Codec):
    """Half precision, saturating at +-65504 (2 bytes an element)."""

    @property
    def name(self) -> str:
        return "fp16"

    def encode(self, values: Vector, rng: np.random.Generator) -> Payload:
        """``values`` clipped to the fp16 range and rounded to nearest."""
        _finite(values)
        return np.clip(values, -_FP16_MAX, _FP16_MAX).astype("<f2")

    def decode(self, payload: Payload, size: int) -> Vector:
        """The payload as float32."""
        _expect(payload, "<f2", size, "fp16 vector")
        if not np.isfinite(payload).all():
            raise _bad("fp16 vector with NaN or infinity")
        return payload.astype(np.float32)

    @staticmethod
    def bound(values: Vector) -> Vector:
        """The largest error each element may have after a round trip (below saturation)."""
        return np.maximum(np.abs(values) * 2.0**-11, 2.0**-25).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Int8(Codec):
    """Linear stochastic quantization to 255 steps between each chunk's minimum and maximum.

    Payload (``|u1``): for each of ``ceil(n / chunk)`` chunks its ``lo`` and ``step`` as
    ``<f4`` (8 bytes), then one byte per element. About ``4 / (1 + 8 / chunk)`` times smaller
    than float32.

    Attributes:
        chunk: elements that share one scale (smaller: tighter error, more header bytes).
    """

    chunk: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.chunk <= 1 << 24:
            raise ValueError(f"chunk must be in 1..2^24, not {self.chunk}")

    @property
    def name(self) -> str:
        return f"int8/{self.chunk}"

    def payload_bytes(self, size: int) -> int:
        """The payload's length for a vector of ``size`` elements."""
        return 8 * math.ceil(size / self.chunk) + size

    def encode(self, values: Vector, rng: np.random.Generator) -> Payload:
        """Each element rounded up or down to a neighbouring step of its chunk, at random."""
        _finite(values)
        size, chunks = len(values), math.ceil(len(values) / self.chunk)
        payload = np.empty(self.payload_bytes(size), np.uint8)
        scales = payload[: 8 * chunks].view("<f4").reshape(chunks, 2)
        codes = payload[8 * chunks :]
        padded = values
        if size % self.chunk:  # repeat the last value: the chunk's min and max stay the same
            padded = np.concatenate([values, np.full(chunks * self.chunk - size, values[-1])])
        blocks = padded.reshape(chunks, self.chunk)
        lo = blocks.min(axis=1)
        step = (blocks.max(axis=1) - lo) / np.float32(255)
        scales[:, 0], scales[:, 1] = lo, step
        divisor = np.where(step > 0, step, np.float32(1))  # (x - lo) is 0 where step is 0
        rows = max(1, _PASS // self.chunk)
        for start in range(0, chunks, rows):
            part = slice(start, start + rows)
            work = (blocks[part] - lo[part, None]) / divisor[part, None]
            work += rng.random(work.shape, dtype=np.float32)
            np.floor(work, out=work)
            np.clip(work, 0, 255, out=work)
            flat = codes[start * self.chunk : (start + rows) * self.chunk]
            flat[:] = work.reshape(-1)[: len(flat)]
        return payload

    def decode(self, payload: Payload, size: int) -> Vector:
        """``lo + code x step`` of each element's chunk.

        Raises:
            RemoteProtocolError: ``bad_array`` for a wrong length, or a scale that is not
                finite, a negative step, or a chunk whose top step overflows.
        """
        chunks = math.ceil(size / self.chunk)
        _expect(payload, "|u1", self.payload_bytes(size), "int8 vector")
        scales = payload[: 8 * chunks].view("<f4").reshape(chunks, 2)
        lo, step = scales[:, 0], scales[:, 1]
        with np.errstate(over="ignore", invalid="ignore"):
            top = lo + np.float32(255) * step
        if not (np.isfinite(top).all() and (step >= 0).all()):
            raise _bad("int8 vector with a non-finite scale or a negative step")
        codes = payload[8 * chunks :]
        out = np.empty(chunks * self.chunk, np.float32)
        out[:size] = codes
        out[size:] = 0
        blocks = out.reshape(chunks, self.chunk)
        blocks *= step[:, None]
        blocks += lo[:, None]
        return out[:size]

    def bound(self, values: Vector) -> Vector:
        """Each element's error bound: the step of its chunk (times ``1 + 2^-20`` for float32
        rounding)."""
        size, chunks = len(values), math.ceil(len(values) / self.chunk)
        padded = np.concatenate([values, np.full(chunks * self.chunk - size, values[-1])])
        blocks = padded.reshape(chunks, self.chunk)
        step = (blocks.max(axis=1) - blocks.min(axis=1)) / 255
        return np.repeat(step * (1 + 2.0**-20) + 1e-30, self.chunk)[:size].astype(np.float32)


@dataclass(frozen=True, slots=True)
class TopK(Codec):
    """The ``k`` largest-magnitude entries, as sorted indices and their values.

    Payload (``|u1``): ``k`` indices as ``<u4``, strictly increasing, then their ``k`` values as
    ``<f4`` (or ``<f2``, saturating, with ``half``). ``k = min(n, tail + max(1, ceil(ratio
    (n - tail))))``: the last ``tail`` entries are always sent (a weight that must not be
    dropped), the top-k is taken among the others.

    Attributes:
        ratio: the share of entries sent, in (0, 1].
        half: values as fp16 (6 bytes an entry instead of 8).
        tail: trailing entries that are always sent.
    """

    ratio: float = 0.01
    half: bool = False
    tail: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], not {self.ratio}")
        if self.tail < 0:
            raise ValueError("tail must be >= 0")

    @property
    def name(self) -> str:
        return f"topk/{self.ratio!r}/{'f2' if self.half else 'f4'}/{self.tail}"

    def k(self, size: int) -> int:
        """How many entries a vector of ``size`` sends."""
        if size <= self.tail:
            return size
        return min(size, self.tail + max(1, math.ceil(self.ratio * (size - self.tail))))

    def payload_bytes(self, size: int) -> int:
        """The payload's length for a vector of ``size`` elements."""
        return self.k(size) * (6 if self.half else 8)

    def encode(self, values: Vector, rng: np.random.Generator) -> Payload:
        """The top-k of ``values`` (ties broken by numpy's selection, deterministically)."""
        _finite(values)
        size, k = len(values), self.k(len(values))
        head = size - min(self.tail, size)
        chosen = k - (size - head)
        picked = np.empty(0, np.intp)
        if chosen:
            picked = np.argpartition(np.abs(values[:head]), head - chosen)[head - chosen :]
        indices = np.concatenate([np.sort(picked), np.arange(head, size)]).astype("<u4")
        payload = np.empty(self.payload_bytes(size), np.uint8)
        payload[: 4 * k].view("<u4")[:] = indices
        picked_values = values[indices]
        if self.half:
            picked_values = np.clip(picked_values, -_FP16_MAX, _FP16_MAX)
        payload[4 * k :].view("<f2" if self.half else "<f4")[:] = picked_values
        return payload

    def sparse(self, payload: Payload, size: int) -> tuple[npt.NDArray[np.uint32], Vector]:
        """The payload's indices and values (float32), checked.

        Raises:
            RemoteProtocolError: ``bad_array``: wrong length, indices not strictly increasing
                (a repeated index) or out of range, a non-finite value.
        """
        k = self.k(size)
        _expect(payload, "|u1", self.payload_bytes(size), "top-k vector")
        indices = payload[: 4 * k].view("<u4")
        values = payload[4 * k :].view("<f2" if self.half else "<f4")
        if k and (indices[-1] >= size or (np.diff(indices.astype(np.int64)) <= 0).any()):
            raise _bad("top-k indices out of range, repeated or not sorted")
        if not np.isfinite(values).all():
            raise _bad("top-k vector with NaN or infinity")
        return indices, values.astype(np.float32)

    def decode(self, payload: Payload, size: int) -> Vector:
        """The dense vector: the sent entries, zeros elsewhere."""
        indices, values = self.sparse(payload, size)
        out = np.zeros(size, np.float32)
        out[indices] = values
        return out


class ErrorFeedback(Codec):
    """Top-k with error feedback: one peer's codec across rounds (not thread-safe).

    ``encode(x)`` sends the top-k of ``x + residual`` and keeps the rest as the new residual,
    so that over rounds the decoded payloads plus the residual add up to the inputs. The
    codec's ``tail`` entries take no part (their residual stays 0). When a run fails, nothing
    was sent: :meth:`rewind`.

    Args:
        codec: the top-k codec.
        size: the vectors' length.
    """

    def __init__(self, codec: TopK, size: int) -> None:
        self.codec = codec
        self.residual = np.zeros(size, np.float32)
        self._head = size - min(codec.tail, size)

    @property
    def name(self) -> str:
        return self.codec.name

    def encode(self, values: Vector, rng: np.random.Generator) -> Payload:
        """The top-k of ``values + residual``; the residual becomes what was left out."""
        if values.shape != self.residual.shape:
            raise ValueError(f"values must have {len(self.residual)} elements")
        total = values + self.residual
        payload = self.codec.encode(total, rng)
        total -= self.codec.decode(payload, len(total))
        total[self._head :] = 0
        self.residual = total
        return payload

    def decode(self, payload: Payload, size: int) -> Vector:
        """As :meth:`TopK.decode`."""
        return self.codec.decode(payload, size)

    def rewind(self, before: Vector, values: Vector) -> None:
        """The run that was to send ``values`` failed (whether or not it encoded them):
        ``before`` (the residual then) plus ``values`` is carried instead."""
        residual = before + values
        residual[self._head :] = 0
        self.residual = residual


def codec_named(name: str, *, topk_ratio: float = 0.01) -> Codec:
    """The codec a job names: ``none``, ``fp16``, ``int8`` or ``topk`` (one weight in the
    tail, float32 values).

    Raises:
        ValueError: an unknown name.
    """
    codecs: dict[str, Codec] = {"none": Float32(), "fp16": Float16(), "int8": Int8()}
    if name == "topk":
        return TopK(topk_ratio, tail=1)
    if name not in codecs:
        raise ValueError(f"compression must be none, fp16, int8 or topk, not {name!r}")
    return codecs[name]
