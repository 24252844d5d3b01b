"""Masks from a cryptographic PRG: AES-256 in counter mode, straight into ring elements.

A mask is AES-256 keystream keyed by the full 32-byte seed (never a short seed into a
statistical generator: Flower's SecAgg+ feeds 32-bit seeds to numpy's RandomState, which a
curious peer can brute-force), read as little-endian ring elements. Element ``i`` of a mask
occupies keystream bytes ``[i*w, (i+1)*w)`` (``w`` = 2 or 4). The keystream runs in segments of
1 MiB: segment ``j`` is AES-256-CTR from the 128-bit counter block ``u96_be(j) || u32_be(2)``, so
a slice owner regenerates only its slice by starting at its segment (random access discards
less than a segment), and no counter block repeats under one key.

That counter layout is the one AES-GCM uses for the 96-bit nonce ``j``, and GCM's ciphertext
of zeros is exactly that keystream: OpenSSL encrypts GCM with wide vector AES (~23 GB/s per core
here) but CTR with 128-bit AES-NI (~9 GB/s), so the keystream is computed as GCM and its tag
never finalized (``test_prg`` checks it against plain CTR). It is written with ``update_into``
into the caller's buffer (no allocation per call).

:func:`add_masks` is what masking costs: each mask streamed a cache-sized chunk at a time into
one scratch buffer and added (or subtracted) into the vector while both are in L2, so the
vector is read and written once for all its masks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

__all__ = ["SEGMENT", "Keystream", "add_masks", "expand_mask"]

SEGMENT = 1 << 20  # keystream bytes per counter run (GCM nonce)
_ZEROS = memoryview(bytes(SEGMENT))  # a view: slicing bytes would copy them
_CHUNK = 1 << 17  # elements per pass of add_masks: chunk and scratch stay in L2 (1 MiB here)


class Keystream:
    """The mask keyed by ``seed`` from element ``offset`` on, read in order.

    Raises:
        ValueError: a seed that is not 32 bytes.
    """

    def __init__(
        self, seed: bytes, *, dtype: np.dtype[np.unsignedinteger[Any]], offset: int = 0
    ) -> None:
        if len(seed) != 32:
            raise ValueError(f"a mask seed has 32 bytes, not {len(seed)}")
        self.dtype = dtype
        self._aes = algorithms.AES(seed)
        segment, skip = divmod(offset * dtype.itemsize, SEGMENT)
        self._open(segment)
        if skip:
            self._encryptor.update(_ZEROS[:skip])  # discard the start of the segment
            self._left -= skip

    def _open(self, segment: int) -> None:
        self._segment, self._left = segment, SEGMENT
        nonce = modes.GCM(segment.to_bytes(12, "big"))
        self._encryptor: CipherContext = Cipher(self._aes, nonce).encryptor()

    def fill(self, out: npt.NDArray[np.unsignedinteger[Any]]) -> None:
        """Write the next ``len(out)`` elements into ``out`` (C-contiguous, of ``dtype``).

        Raises:
            ValueError: an ``out`` of another dtype, or not contiguous.
        """
        if out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous array of {self.dtype}")
        self._write(out.reshape(-1).view(np.uint8).data)
        if sys.byteorder == "big":  # the keystream is read as little-endian elements everywhere
            out.byteswap(inplace=True)

    def _write(self, target: memoryview) -> None:
        """The next ``len(target)`` keystream bytes into ``target``."""
        done = 0
        while done < len(target):
            if not self._left:
                self._open(self._segment + 1)
            size = min(self._left, len(target) - done)
            self._encryptor.update_into(_ZEROS[:size], target[done : done + size])
            self._left -= size
            done += size


def expand_mask(
    seed: bytes,
    count: int,
    *,
    dtype: np.dtype[np.unsignedinteger[Any]],
    offset: int = 0,
    out: npt.NDArray[np.unsignedinteger[Any]] | None = None,
) -> npt.NDArray[np.unsignedinteger[Any]]:
    """Elements ``[offset, offset + count)`` of the mask keyed by ``seed``.

    Args:
        seed: the 32-byte key (from HKDF over an X25519 secret, or a Shamir-shared self-mask).
        count: how many ring elements.
        dtype: ``uint16`` or ``uint32`` (little-endian on the wire and in the keystream).
        offset: index of the first element (for a slice of a longer mask).
        out: a C-contiguous array of ``count`` elements of ``dtype`` to fill (else allocated).

    Raises:
        ValueError: a seed that is not 32 bytes, or an ``out`` of the wrong shape or dtype.
    """
    stream = Keystream(seed, dtype=dtype, offset=offset)
    if out is None:
        out = np.empty(count, dtype=dtype)
    elif out.shape != (count,) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous ({count},) array of {dtype}")
    stream.fill(out)
    return out


def add_masks(
    target: npt.NDArray[np.unsignedinteger[Any]],
    masks: Sequence[tuple[bytes, int]],
    *,
    offset: int = 0,
    base: Sequence[npt.NDArray[np.unsignedinteger[Any]]] = (),
) -> None:
    """Set ``target`` (flat, contiguous) to ``sum(base) + sum(sign * PRG(seed))`` in the ring,
    the masks taken from element ``offset`` on, for each ``(seed, sign)`` of ``masks`` (sign
    +1 adds, -1 subtracts). ``target`` may be one of ``base``.

    Raises:
        ValueError: a ``base`` array whose shape or dtype differs from ``target``'s, or a bad
            seed.
    """
    if any(part.shape != target.shape or part.dtype != target.dtype for part in base):
        raise ValueError(f"every base array must be a {target.shape} array of {target.dtype}")
    streams = [(Keystream(seed, dtype=target.dtype, offset=offset), sign) for seed, sign in masks]
    scratch = np.empty(min(_CHUNK, len(target)), target.dtype)
    raw = scratch.view(np.uint8).data
    for start in range(0, len(target), _CHUNK):
        part = target[start : start + _CHUNK]
        if base:
            np.copyto(part, base[0][start : start + _CHUNK])
        else:
            part.fill(0)
        for other in base[1:]:
            np.add(part, other[start : start + _CHUNK], out=part)
        keystream, keystream_bytes = scratch[: len(part)], raw[: part.nbytes]
        for stream, sign in streams:
            stream._write(keystream_bytes)
            if sys.byteorder == "big":
                keystream.byteswap(inplace=True)
            (np.add if sign > 0 else np.subtract)(part, keystream, out=part)
