"""Masks: deterministic per seed, random access to any slice, uniform over the ring, and
added in one pass exactly as one by one."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshfed.secagg.prg import SEGMENT, Keystream, add_masks, expand_mask

U32, U16 = np.dtype(np.uint32), np.dtype(np.uint16)


@given(
    st.binary(min_size=32, max_size=32),
    st.integers(0, 5000),
    st.integers(0, 3000),
    st.sampled_from([U16, U32]),
)
def test_a_slice_equals_the_full_mask_sliced(
    seed: bytes, offset: int, count: int, dtype: np.dtype
) -> None:
    full = expand_mask(seed, offset + count, dtype=dtype)
    part = expand_mask(seed, count, dtype=dtype, offset=offset)
    assert np.array_equal(full[offset:], part)


def ctr_keystream(seed: bytes, start: int, size: int) -> bytes:
    """SPEC 7b.1 with plain AES-256-CTR: segment j from counter block u96_be(j) || u32_be(2)."""
    out = b""
    for segment in range(start // SEGMENT, (start + size) // SEGMENT + 1):
        block = segment.to_bytes(12, "big") + (2).to_bytes(4, "big")
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(block)).encryptor()
        out += encryptor.update(bytes(SEGMENT))
    return out[start % SEGMENT :][:size]


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(0, 3 * SEGMENT), st.integers(0, 50_000))
@example(b"s" * 32, SEGMENT - 6, 10)  # across a segment boundary
def test_the_mask_is_aes_256_ctr_in_segments(seed: bytes, start: int, size: int) -> None:
    offset, count = start // 2, size // 2
    mask = expand_mask(seed, count, dtype=U16, offset=offset)
    assert mask.astype("<u2").tobytes() == ctr_keystream(seed, 2 * offset, 2 * count)


def test_same_seed_same_mask_other_seed_other_mask() -> None:
    a = expand_mask(b"a" * 32, 1000, dtype=U32)
    assert np.array_equal(a, expand_mask(b"a" * 32, 1000, dtype=U32))
    assert not np.array_equal(a, expand_mask(b"b" * 32, 1000, dtype=U32))


def test_fills_a_caller_buffer_in_place() -> None:
    buffer = np.zeros(3_000_000, U32)
    result = expand_mask(b"k" * 32, len(buffer), dtype=U32, out=buffer)
    assert result is buffer and buffer.any()
    with pytest.raises(ValueError, match="contiguous"):
        expand_mask(b"k" * 32, 10, dtype=U32, out=np.zeros(20, U32)[::2])
    with pytest.raises(ValueError, match="32 bytes"):
        expand_mask(b"short", 10, dtype=U32)


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("shift", [0, 8])
def test_masks_look_uniform_over_the_ring(shift: int) -> None:
    values = expand_mask(b"u" * 32, 1_000_000, dtype=U16)
    counts = np.bincount((values >> shift) & 0xFF, minlength=256)
    # 255 degrees of freedom: mean 255, sd 22.6; above 5 sd would be p < 1e-6
    assert chi_square(counts) < 255 + 5 * 22.6
    skewed = np.bincount(np.minimum(values >> 8, 200), minlength=256)
    assert chi_square(skewed) > 1000  # the test can tell a non-uniform source


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.sampled_from([1, -1])), max_size=4),
    st.integers(0, 3),
    st.integers(1, 80_000),
    st.integers(0, 5000),
    st.sampled_from([U16, U32]),
    st.integers(0, 2**32 - 1),
)
@example([(b"a" * 32, 1), (b"b" * 32, -1)], 2, 300_001, 3, U16, 0)  # over chunk boundaries
@example([(b"a" * 32, -1)], 0, 1 << 18, 4097, U32, 1)
def test_add_masks_equals_the_masks_added_one_by_one(
    masks: list[tuple[bytes, int]],
    bases: int,
    count: int,
    offset: int,
    dtype: np.dtype,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    base = [rng.integers(0, np.iinfo(dtype).max, count, dtype=dtype, endpoint=True)]
    base += [rng.integers(0, 2**16, count, dtype=dtype) for _ in range(bases)]
    expected = np.zeros(count, dtype)
    for part in base:
        expected += part  # wraps: ring arithmetic
    for key, sign in masks:
        mask = expand_mask(key, count, dtype=dtype, offset=offset)
        expected = expected + mask if sign > 0 else expected - mask
    target = np.empty(count, dtype)
    add_masks(target, masks, offset=offset, base=base)
    assert np.array_equal(target, expected)
    add_masks(base[0], masks, offset=offset, base=base)  # in place over its first base
    assert np.array_equal(base[0], expected)


def test_add_masks_refuses_a_base_of_another_shape() -> None:
    with pytest.raises(ValueError, match="base"):
        add_masks(np.zeros(10, U32), [(b"k" * 32, 1)], base=[np.zeros(9, U32)])


@given(st.lists(st.integers(0, 999), min_size=1, max_size=6), st.integers(0, 99))
def test_a_keystream_read_in_pieces_is_the_mask(sizes: list[int], offset: int) -> None:
    stream = Keystream(b"p" * 32, dtype=U16, offset=offset)
    pieces = []
    for size in sizes:
        piece = np.empty(size, U16)
        stream.fill(piece)
        pieces.append(piece)
    expected = expand_mask(b"p" * 32, sum(sizes), dtype=U16, offset=offset)
    assert np.array_equal(np.concatenate(pieces), expected)
