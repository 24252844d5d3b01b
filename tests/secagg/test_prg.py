"""Masks: deterministic per seed, random access to any slice, uniform over the ring."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.secagg.prg import expand_mask

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
