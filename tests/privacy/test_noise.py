"""The secret randomness DP uses: a Gaussian from the OS's generator, released on a grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from meshfed.privacy.dp import OwnNoise
from meshfed.privacy.noise import MAX_DEVIATIONS, SecureRandom, grid_for


def test_the_gaussian_is_a_gaussian_of_the_asked_std() -> None:
    draws = SecureRandom().gaussian(400_001, 2.5)
    assert len(draws) == 400_001
    assert abs(np.mean(draws)) < 5 * 2.5 / math.sqrt(len(draws))
    assert np.std(draws) == pytest.approx(2.5, rel=0.01)
    assert stats.kstest(draws / 2.5, "norm").pvalue > 1e-4
    assert np.abs(draws).max() <= MAX_DEVIATIONS * 2.5


def test_draws_come_from_the_byte_source_and_nothing_else() -> None:
    def source(seed: int) -> SecureRandom:
        stream = np.random.default_rng(seed)
        return SecureRandom(lambda n: stream.bytes(n))

    np.testing.assert_array_equal(source(1).gaussian(100, 1.0), source(1).gaussian(100, 1.0))
    assert not np.array_equal(SecureRandom().gaussian(100, 1.0), SecureRandom().gaussian(100, 1.0))
    sample = SecureRandom().bernoulli(200_000, 0.1)
    assert np.mean(sample) == pytest.approx(0.1, abs=0.003)
    assert SecureRandom().bernoulli(1000, 1.0).all() and not SecureRandom().bernoulli(1000, 0).any()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-100, 100, allow_subnormal=True), min_size=1, max_size=50),
    st.floats(1e-3, 10.0),
)
def test_every_release_lies_on_the_grid_whatever_the_value(values: list[float], std: float) -> None:
    """The least-significant-bit defence: the set of values a release can take is the grid
    g Z, the same for every input, so its low-order bits cannot tell inputs apart."""
    released = SecureRandom().release(np.array(values, np.float32), std)
    grid = grid_for(std)
    assert released.dtype == np.float32
    steps = released.astype(np.float64) / grid
    np.testing.assert_array_equal(steps, np.round(steps))
    assert std / 2**13 < grid <= std / 2**12


def test_own_noise_is_topped_up_to_what_the_next_sum_needs_never_down() -> None:
    noise = OwnNoise(300_000, SecureRandom())
    noise.top_up(0.5)
    first = noise.vector.copy()
    assert np.std(first) == pytest.approx(0.5, rel=0.01)
    noise.top_up(0.2)  # less is asked: what was added stays
    np.testing.assert_array_equal(noise.vector, first)
    noise.top_up(1.5)
    assert noise.std == 1.5 and np.std(noise.vector) == pytest.approx(1.5, rel=0.01)
    assert np.corrcoef(first, noise.vector - first)[0, 1] == pytest.approx(0, abs=0.01)
    values = np.zeros(300_000, np.float32)
    assert np.std(noise.release(values)) == pytest.approx(1.5, rel=0.01)
