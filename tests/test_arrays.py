"""Chunked arrays: any numeric array survives the trip exactly; a wrong chunk never passes."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshfed.arrays import (
    ALLOWED_DTYPES,
    ArrayAssembler,
    ArrayHeader,
    InlineArray,
    crc32_of,
    header_for,
    iter_chunks,
    parts_frame,
    split_parts_frame,
)
from meshfed.codec import schema_of
from meshfed.control import Ping
from meshfed.errors import LocalProtocolError, RemoteProtocolError
from meshfed.identity import Identity
from meshfed.stats import RejectReason
from meshfed.wire import SIGNATURE_DOMAIN, ReplayGuard, open_envelope, seal

TID = b"t" * 16


def transfer(array: np.ndarray, chunk_bytes: int) -> np.ndarray:
    header, contiguous = header_for(array, name="a", transfer_id=TID, chunk_bytes=chunk_bytes)
    assembler = ArrayAssembler(header, max_bytes=1 << 30)
    for chunk in iter_chunks(contiguous, chunk_bytes):
        target = assembler.next_chunk_buffer()
        target[: len(chunk)] = chunk
        assembler.chunk_received(len(chunk))
    return assembler.finish()


@given(
    hnp.arrays(
        dtype=st.sampled_from(["<f4", "<f8", ">f4", "<i8", "|u1", "<u2", "|b1", "<f2"]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7),
    ),
    st.integers(1, 64),
)
def test_round_trip_is_exact(array: np.ndarray, chunk_bytes: int) -> None:
    received = transfer(array, chunk_bytes)
    assert received.shape == array.shape
    assert received.dtype.str in ALLOWED_DTYPES
    np.testing.assert_array_equal(received, array)


def test_non_contiguous_and_big_endian_arrays_travel() -> None:
    array = np.arange(60, dtype=">f8").reshape(6, 10)[:, ::3]
    np.testing.assert_array_equal(transfer(array, 16), array)


def test_object_and_string_arrays_are_refused() -> None:
    for array in (np.array([object()]), np.array(["a"]), np.array([1j])):
        with pytest.raises(LocalProtocolError, match="cannot be sent"):
            header_for(array, name="a", transfer_id=TID, chunk_bytes=8)


def test_header_rejects_unknown_dtypes_and_negative_shapes() -> None:
    with pytest.raises(ValueError, match="dtype"):
        ArrayHeader(transfer_id=TID, name="a", dtype="|O", shape=[1], chunk_bytes=8, crc32=0)
    with pytest.raises(ValueError, match="negative"):
        ArrayHeader(transfer_id=TID, name="a", dtype="<f4", shape=[-1], chunk_bytes=8, crc32=0)


def test_oversized_array_is_refused_before_allocating() -> None:
    header = ArrayHeader(
        transfer_id=TID, name="a", dtype="<f8", shape=[2**40], chunk_bytes=8, crc32=0
    )
    with pytest.raises(RemoteProtocolError) as info:
        ArrayAssembler(header, max_bytes=1 << 20)
    assert info.value.reason == RejectReason.OVERSIZED


def test_short_chunk_bad_crc_and_early_finish_are_bad_arrays() -> None:
    array = np.arange(10, dtype="<f4")
    header, contiguous = header_for(array, name="a", transfer_id=TID, chunk_bytes=16)
    assert header.crc32 == crc32_of(contiguous)
    header = replace(header, crc32=header.crc32 ^ 1)
    assembler = ArrayAssembler(header, max_bytes=1 << 20)
    with pytest.raises(RemoteProtocolError, match="not complete") as info:
        assembler.finish()
    assert info.value.reason == RejectReason.BAD_ARRAY
    with pytest.raises(RemoteProtocolError) as info:
        assembler.chunk_received(3)
    assert info.value.reason == RejectReason.BAD_ARRAY
    for chunk in iter_chunks(contiguous, 16):
        assembler.next_chunk_buffer()[:] = chunk
        assembler.chunk_received(len(chunk))
    with pytest.raises(RemoteProtocolError, match="CRC") as info:
        assembler.finish()
    assert info.value.reason == RejectReason.BAD_ARRAY


@given(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=8))
def test_parts_frames_split_back_or_are_malformed(
    envelope: bytes, data: bytes, junk: bytes
) -> None:
    signed, part = split_parts_frame(parts_frame(envelope, data))
    assert (signed, bytes(part)) == (envelope, data)
    try:
        signed, part = split_parts_frame(junk)
    except RemoteProtocolError as exc:
        assert exc.reason == RejectReason.MALFORMED
    else:
        assert 4 + len(signed) + len(part) == len(junk)


SENDER = Identity.generate()


@given(
    st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 4), min_size=1, max_size=32),
    st.sampled_from(sorted(ALLOWED_DTYPES)),
)
def test_any_announced_shape_is_refused_or_builds_its_array(shape: list[int], dtype: str) -> None:
    """A hostile inline array (any shape, e.g. one zero and 2^64 - 1 beside it) is rejected as
    [bad_field] when it is opened, or the array it announces can be built: never an error
    later, in reshape."""
    signed = msgpack.unpackb(msgpack.unpackb(seal(SENDER, Ping(sent_ms=1), now_ms=1)[0])[0])
    signed[1] = InlineArray.TYPE
    size = np.dtype(dtype).itemsize * (0 if 0 in shape else int(np.prod(shape, dtype=object)))
    if size > 4096:
        shape = [0, *shape]  # keep the data small: the shape is what is on trial
        size = 0
    header = [TID, "a", dtype, shape, 1, 0]
    signed[7] = [header, bytes(size)]
    inner = msgpack.packb(signed, use_bin_type=True)
    frame = msgpack.packb([inner, SENDER.sign(SIGNATURE_DOMAIN + inner)], use_bin_type=True)
    guard = ReplayGuard(window_ms=10, max_skew_ms=10, started_ms=0)
    try:
        envelope = open_envelope(
            frame, peer=SENDER.peer_id, now_ms=1, replay=guard, max_bytes=1 << 20
        )
    except RemoteProtocolError as exc:
        assert exc.reason == RejectReason.BAD_FIELD
        assert 0 in shape
        return
    assert isinstance(envelope.body, InlineArray)
    assert envelope.body.array().shape == tuple(shape)
    assert ArrayAssembler(envelope.body.header, max_bytes=1 << 20).header.nbytes == size


def test_one_zero_dimension_beside_huge_ones_is_a_bad_field() -> None:
    for shape in ([0, 2**64 - 1], [2**63, 0], [0, 2**32, 2**31]):
        with pytest.raises(ValueError, match="cannot exist"):
            ArrayHeader(transfer_id=TID, name="a", dtype="<f4", shape=shape, chunk_bytes=1, crc32=0)
        fields = [TID, "a", "<f4", shape, 1, 0]
        with pytest.raises(RemoteProtocolError) as info:
            schema_of(ArrayHeader).decode(fields)
        assert info.value.reason == RejectReason.BAD_FIELD
