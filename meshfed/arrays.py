"""Chunked transfer of numpy arrays: a signed header, raw little-endian chunks, an empty ack.

SPEC.md, "Array transfer". On a stream of protocol ``/meshfed/array/2`` the sender writes

1. an envelope holding :class:`ArrayHeader` (transfer id, name, dtype, shape, chunk size and
   the CRC-32 of all the bytes);
2. ``ceil(nbytes / chunk_bytes)`` raw frames, each exactly ``chunk_bytes`` long except the
   last, holding the array's bytes in C order, little-endian;

and the receiver answers an empty frame once its handler took the array (the stream is
authenticated: the acknowledgement needs no signature of its own). An array of at most
:data:`INLINE_ARRAY_BYTES` travels instead as one signed one-way message, :class:`InlineArray`
(its header and its bytes): no stream. Different small
arrays of one name for several receivers (a peer's slices, one per owner) can share one
signature: :class:`ArrayParts` names each receiver's part with its SHA-256, and each receiver
gets that same envelope with its own part's bytes beside it (:func:`parts_frame`). The libp2p
transport seals every frame with AES-GCM, so the CRC is not what stops an attacker: it catches
a sender or driver that sends the wrong bytes in the right frames. No pickle: the dtype is one
of :data:`ALLOWED_DTYPES`, and the receiver allocates ``prod(shape) * itemsize`` bytes only
after checking them against its configured maximum.

:class:`ArrayAssembler` is the receive side as a small sans-IO object: the driver asks it where
the next chunk goes, and checks the CRC when the last one is in.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .codec import bounded
from .errors import LocalProtocolError, RemoteProtocolError
from .identity import PeerId
from .stats import RejectReason
from .wire import Message, message

__all__ = [
    "ALLOWED_DTYPES",
    "ArrayAssembler",
    "ArrayHeader",
    "ArrayPart",
    "ArrayParts",
    "INLINE_ARRAY_BYTES",
    "InlineArray",
    "header_for",
    "crc32_of",
    "iter_chunks",
    "parts_frame",
    "split_parts_frame",
]

#: numpy ``dtype.str`` of every dtype that may travel (always little-endian or byte-sized).
ALLOWED_DTYPES = frozenset(
    {"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"}
)
_MAX_DIMS = 32
_MAX_NDARRAY_BYTES = 2**63 - 1
#: arrays up to this many bytes travel inline, in one message (:class:`InlineArray`)
INLINE_ARRAY_BYTES = 64 * 1024


@message("meshfed.array.header")
@dataclass(frozen=True, slots=True)
class ArrayHeader(Message):
    """Announces one array: what it is called, its dtype and shape, the chunk size and the
    CRC-32 of its bytes."""

    transfer_id: bytes = bounded(min_len=16, max_len=16)
    name: str = bounded(max_len=256)
    dtype: str = bounded(max_len=8)
    shape: list[int] = bounded(max_len=_MAX_DIMS)
    chunk_bytes: int = bounded(ge=1, le=2**40)
    crc32: int = bounded(ge=0, le=2**32 - 1)

    def __post_init__(self) -> None:
        if self.dtype not in ALLOWED_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(ALLOWED_DTYPES)}")
        if any(dim < 0 for dim in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")
        # numpy's own rule: even an empty array's other dimensions must fit in memory
        itemsize = np.dtype(self.dtype).itemsize
        if math.prod(max(dim, 1) for dim in self.shape) * itemsize > _MAX_NDARRAY_BYTES:
            raise ValueError(f"shape {self.shape} of {self.dtype} cannot exist in memory")

    @property
    def nbytes(self) -> int:
        """Total bytes of the array."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def chunks(self) -> int:
        """How many raw frames follow the header."""
        return -(-self.nbytes // self.chunk_bytes)


@message("meshfed.array.inline")
@dataclass(frozen=True, slots=True)
class InlineArray(Message):
    """A small array in one message: its header (``chunk_bytes`` unused) and all its bytes."""

    header: ArrayHeader
    data: bytes = bounded(max_len=INLINE_ARRAY_BYTES)

    def __post_init__(self) -> None:
        if len(self.data) != self.header.nbytes:
            raise ValueError(f"{len(self.data)} bytes for an array of {self.header.nbytes}")

    def array(self) -> npt.NDArray[np.generic]:
        """The array (a writable copy: the handler may keep or change it)."""
        flat = np.frombuffer(bytearray(self.data), dtype=np.dtype(self.header.dtype))
        return flat.reshape(self.header.shape)


@dataclass(frozen=True, slots=True)
class ArrayPart:
    """One receiver's part of :class:`ArrayParts`: its length and the SHA-256 of its bytes."""

    to: PeerId
    length: int = bounded(ge=0, le=INLINE_ARRAY_BYTES)
    digest: bytes = bounded(min_len=32, max_len=32)


@message("meshfed.array.parts")
@dataclass(frozen=True, slots=True)
class ArrayParts(Message):
    """Different 1-D arrays of one name and dtype, one per receiver, under one signature; each
    receiver gets this envelope with its own part's bytes beside it (:func:`parts_frame`)."""

    name: str = bounded(max_len=256)
    dtype: str = bounded(max_len=8)
    parts: list[ArrayPart] = bounded(min_len=1, max_len=128)

    def __post_init__(self) -> None:
        if self.dtype not in ALLOWED_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(ALLOWED_DTYPES)}")
        itemsize = np.dtype(self.dtype).itemsize
        if any(part.length * itemsize > INLINE_ARRAY_BYTES for part in self.parts):
            raise ValueError(f"a part is longer than {INLINE_ARRAY_BYTES} bytes")
        if len({part.to for part in self.parts}) != len(self.parts):
            raise ValueError("two parts for one receiver")

    def take(
        self, receiver: PeerId, data: bytes | memoryview, *, transfer_id: bytes
    ) -> tuple[ArrayHeader, npt.NDArray[np.generic]]:
        """``receiver``'s part from the ``data`` that came with this message: its header (named
        ``transfer_id``) and a writable array.

        Raises:
            RemoteProtocolError: no part for ``receiver`` [bad_field], ``data`` of another
                length [bad_field] or digest [bad_array].
        """
        part = next((part for part in self.parts if part.to == receiver), None)
        if part is None:
            raise RemoteProtocolError("no part for this node", reason=RejectReason.BAD_FIELD)
        dtype = np.dtype(self.dtype)
        if len(data) != part.length * dtype.itemsize:
            raise RemoteProtocolError(
                f"{len(data)} bytes for a part of {part.length} x {self.dtype}",
                reason=RejectReason.BAD_FIELD,
            )
        if hashlib.sha256(data).digest() != part.digest:
            raise RemoteProtocolError(
                "the part's bytes do not match its digest", reason=RejectReason.BAD_ARRAY
            )
        header = ArrayHeader(
            transfer_id=transfer_id,
            name=self.name,
            dtype=self.dtype,
            shape=[part.length],
            chunk_bytes=max(1, len(data)),
            crc32=zlib.crc32(data),
        )
        return header, np.frombuffer(bytearray(data), dtype=dtype)


def parts_frame(envelope: bytes, data: bytes) -> bytes:
    """What one receiver of an :class:`ArrayParts` envelope gets: ``u32_be(len(envelope)) ||
    envelope || its part's bytes``."""
    return len(envelope).to_bytes(4, "big") + envelope + data


def split_parts_frame(frame: bytes) -> tuple[bytes, memoryview]:
    """The envelope and the part's bytes of a :func:`parts_frame`.

    Raises:
        RemoteProtocolError: a frame too short for the length it announces [malformed].
    """
    end = 4 + int.from_bytes(frame[:4], "big")
    if len(frame) < 4 or len(frame) < end:
        raise RemoteProtocolError(
            "a parts frame shorter than it says", reason=RejectReason.MALFORMED
        )
    return frame[4:end], memoryview(frame)[end:]


def header_for(
    array: npt.NDArray[np.generic], *, name: str, transfer_id: bytes, chunk_bytes: int
) -> tuple[ArrayHeader, npt.NDArray[np.generic]]:
    """The header for ``array`` and the contiguous little-endian array to send.

    Raises:
        LocalProtocolError: if the dtype cannot travel (object, strings, complex ...).
    """
    wire_dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if wire_dtype.str not in ALLOWED_DTYPES:
        raise LocalProtocolError(
            f"arrays of dtype {array.dtype} cannot be sent; use one of {sorted(ALLOWED_DTYPES)}"
        )
    contiguous = np.ascontiguousarray(array, dtype=wire_dtype)
    header = ArrayHeader(
        transfer_id=transfer_id,
        name=name,
        dtype=wire_dtype.str,
        shape=list(array.shape),
        chunk_bytes=chunk_bytes,
        crc32=crc32_of(contiguous),
    )
    return header, contiguous


def iter_chunks(contiguous: npt.NDArray[np.generic], chunk_bytes: int) -> list[memoryview]:
    """Views of the array's bytes, ``chunk_bytes`` at a time (no copies)."""
    flat = contiguous.reshape(-1).view(np.uint8).data
    return [flat[i : i + chunk_bytes] for i in range(0, len(flat), chunk_bytes)]


class ArrayAssembler:
    """Receives one array announced by ``header`` into a buffer it owns.

    Use: for each of ``header.chunks`` frames, receive into :meth:`next_chunk_buffer` and call
    :meth:`chunk_received` with the length; then :meth:`finish`.

    Args:
        header: the verified header.
        max_bytes: the largest array this node accepts.

    Raises:
        RemoteProtocolError: ``OVERSIZED`` if the array is larger than ``max_bytes``.
    """

    def __init__(self, header: ArrayHeader, *, max_bytes: int) -> None:
        if header.nbytes > max_bytes:
            raise RemoteProtocolError(
                f"array {header.name!r} of {header.nbytes} bytes exceeds {max_bytes}",
                reason=RejectReason.OVERSIZED,
            )
        self.header = header
        self._buffer = np.empty(header.nbytes, dtype=np.uint8)
        self._view = self._buffer.data
        self._offset = 0
        self._crc = 0

    @property
    def complete(self) -> bool:
        """True once every byte has arrived."""
        return self._offset == self.header.nbytes

    def next_chunk_buffer(self) -> memoryview:
        """Where the next frame goes: exactly the expected chunk length."""
        if self.complete:
            raise LocalProtocolError("all chunks already received")
        end = min(self._offset + self.header.chunk_bytes, self.header.nbytes)
        return self._view[self._offset : end]

    def chunk_received(self, length: int) -> None:
        """Record a frame of ``length`` bytes written into :meth:`next_chunk_buffer`.

        Raises:
            RemoteProtocolError: ``BAD_ARRAY`` if the frame is not exactly the expected size.
        """
        expected = min(self.header.chunk_bytes, self.header.nbytes - self._offset)
        if length != expected:
            raise RemoteProtocolError(
                f"chunk of {length} bytes where {expected} were due", reason=RejectReason.BAD_ARRAY
            )
        self._crc = zlib.crc32(self._view[self._offset : self._offset + length], self._crc)
        self._offset += length

    def finish(self) -> npt.NDArray[np.generic]:
        """Check the CRC and return the array (dtype and shape from the header).

        Raises:
            RemoteProtocolError: ``BAD_ARRAY`` on a missing chunk or a CRC mismatch.
        """
        if not self.complete:
            raise RemoteProtocolError("the array is not complete", reason=RejectReason.BAD_ARRAY)
        if self.header.crc32 != self._crc:
            raise RemoteProtocolError(
                f"CRC-32 {self._crc:08x} does not match the header's {self.header.crc32:08x}",
                reason=RejectReason.BAD_ARRAY,
            )
        return self._buffer.view(np.dtype(self.header.dtype)).reshape(self.header.shape)


def crc32_of(contiguous: npt.NDArray[np.generic]) -> int:
    """The CRC-32 the header carries for ``contiguous``."""
    return zlib.crc32(contiguous.reshape(-1).view(np.uint8).data)
