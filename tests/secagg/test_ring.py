"""Quantization: the spec's floor(y + U), bounded error, unbiased rounding, and a ring that never
wraps."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshfed.secagg.prg import expand_mask
from meshfed.secagg.ring import Quantizer, check_capacity

U32 = np.dtype(np.uint32)
floats = hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(-4, 4, width=32))


@given(floats, st.sampled_from([(8, 16), (16, 32), (20, 32)]), st.integers(0, 2**32 - 1))
def test_one_value_comes_back_within_one_step(
    values: np.ndarray, bits: tuple[int, int], seed: int
) -> None:
    q = Quantizer(clip=2.0, levels_bits=bits[0], ring_bits=bits[1])
    levels = q.quantize(values, np.random.default_rng(seed))
    assert levels.dtype == q.dtype and levels.max(initial=0) <= q.top
    back = q.decode(levels, 1)
    step = 2 * q.clip / q.top
    assert np.all(np.abs(back - np.clip(values, -2, 2)) <= step + 1e-6)


@given(st.integers(2, 50), st.integers(0, 2**32 - 1))
def test_sums_of_a_group_are_exact_in_the_ring(group: int, seed: int) -> None:
    q = Quantizer(clip=1.0, levels_bits=8, ring_bits=16)
    check_capacity(group, 8, 16)
    rng = np.random.default_rng(seed)
    inputs = [rng.uniform(-1, 1, 64).astype(np.float32) for _ in range(group)]
    levels = [q.quantize(x, rng) for x in inputs]
    ring_sum = np.zeros(64, q.dtype)
    for level in levels:
        ring_sum += level  # wraps modulo 2^16, like a masked sum
    exact = np.sum([lv.astype(np.int64) for lv in levels], axis=0)
    assert np.array_equal(ring_sum.astype(np.int64), exact)
    mean = q.decode(ring_sum, group, mean=True)
    assert np.all(np.abs(mean - np.mean(inputs, axis=0)) <= 2 * q.clip / q.top + 1e-6)


@settings(deadline=None)
@given(
    floats,
    st.sampled_from([(8, 16), (16, 32), (20, 32), (24, 32)]),
    st.sampled_from([2.0, 0.3, 1e-3]),
    st.integers(0, 2**32 - 1),
)
def test_levels_are_floor_of_y_plus_u_from_the_keystream(
    values: np.ndarray, bits: tuple[int, int], clip: float, seed: int
) -> None:
    q = Quantizer(clip=clip, levels_bits=bits[0], ring_bits=bits[1])
    levels = q.quantize(values, np.random.default_rng(seed))
    # U: 4 keystream bytes per value, keyed by the first 32 bytes drawn from the generator
    words = expand_mask(np.random.default_rng(seed).bytes(32), len(values), dtype=U32)
    c, top = Fraction(clip), q.top
    for value, word, level in zip(values.tolist(), words.tolist(), levels.tolist(), strict=True):
        y = (min(max(Fraction(value), -c), c) + c) * top / (2 * c)
        exact = y + Fraction(word ^ 1 << 31, 1 << 32)
        if abs(exact - round(exact)) > Fraction(2) ** (q.levels_bits - 50):  # float64 rounding
            assert level == math.floor(exact)


def test_long_vectors_draw_u_in_keystream_order() -> None:
    q = Quantizer(clip=1.0, levels_bits=16, ring_bits=32)
    values = np.random.default_rng(1).uniform(-1.5, 1.5, 300_001).astype(np.float32)
    levels = q.quantize(values, np.random.default_rng(2))
    words = expand_mask(np.random.default_rng(2).bytes(32), len(values), dtype=U32)
    y = (np.clip(values.astype(np.float64), -1, 1) + 1) * (q.top / 2)
    exact = y + (words ^ np.uint32(1 << 31)) / 2**32
    close = np.abs(exact - np.round(exact)) < 1e-6
    assert np.array_equal(levels[~close], np.floor(exact[~close]))


def test_nan_is_refused() -> None:
    q = Quantizer(clip=1.0, levels_bits=16, ring_bits=32)
    with pytest.raises(ValueError, match="NaN"):
        q.quantize(np.array([0.5, np.nan], np.float32), np.random.default_rng(0))


@given(st.integers(1, 1 << 16), st.sampled_from([1.0, 0.37, 100.0]), st.integers(0, 2**32 - 1))
def test_a_float32_mean_is_within_a_few_ulps_of_the_exact_one(
    count: int, clip: float, seed: int
) -> None:
    q = Quantizer(clip=clip, levels_bits=16, ring_bits=32)
    total = np.random.default_rng(seed).integers(0, count * q.top, 1000, dtype=np.uint32)
    exact = total.astype(np.float64) * (2 * clip / q.top / count) - clip
    mean = q.decode(total, count, mean=True)
    assert mean.dtype == np.float32
    assert np.all(np.abs(mean - exact) <= 4 * np.spacing(np.float32(clip)))


def test_rounding_is_unbiased() -> None:
    q = Quantizer(clip=1.0, levels_bits=4, ring_bits=16)
    value = np.full(200_000, 0.123, np.float32)
    levels = q.quantize(value, np.random.default_rng(0))
    estimate = levels.mean() * (2 * q.clip / q.top) - q.clip
    assert abs(estimate - 0.123) < 1e-3  # the 4-bit step is 0.133: only unbiased rounding gets here


def test_a_group_too_large_for_the_ring_is_refused() -> None:
    check_capacity(257, 8, 16)
    with pytest.raises(ValueError, match="does not fit Z_2\\^16"):
        check_capacity(258, 8, 16)
    with pytest.raises(ValueError, match="at most 257 peers"):
        check_capacity(1000, 8, 16)
    with pytest.raises(ValueError, match="16 or 32"):
        check_capacity(2, 8, 64)
