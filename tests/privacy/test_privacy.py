"""Differential privacy: clipping, distributed noise, and an accountant that is dp-accounting's."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.privacy.accountant import GaussianEvent, PrivacyAccountant, calibrate_noise
from meshfed.privacy.dp import clip_update, privatize


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.5, 5.0), st.sampled_from([1.0, 0.5, 0.01]), st.integers(1, 50)),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from([1e-5, 1e-6]),
)
def test_epsilon_is_dp_accountings_for_the_same_events(
    events: list[tuple[float, float, int]], delta: float
) -> None:
    accountant = PrivacyAccountant(budget_epsilon=1e9, delta=delta)
    reference = rdp.RdpAccountant()
    for noise, rate, count in events:
        accountant.compose(GaussianEvent(noise, rate), count)
        gaussian = dp_accounting.GaussianDpEvent(noise)
        event = gaussian if rate == 1.0 else dp_accounting.PoissonSampledDpEvent(rate, gaussian)
        reference.compose(event, count)
    assert accountant.epsilon() == pytest.approx(reference.get_epsilon(delta), rel=1e-12)


def test_the_budget_is_checked_before_spending_and_survives_a_restart() -> None:
    accountant = PrivacyAccountant(budget_epsilon=5.5, delta=1e-5)
    event = GaussianEvent(2.0)
    spent = 0
    while not accountant.would_exceed(event):
        accountant.compose(event)
        spent += 1
    assert spent == 5 and accountant.epsilon() <= 5.5  # sigma 2: 5.38 after 5, 5.98 after 6
    restored = PrivacyAccountant(budget_epsilon=1.0, delta=0.5)
    restored.load_state_dict(accountant.state_dict())
    assert restored.epsilon() == accountant.epsilon()
    assert restored.would_exceed(event)
    assert PrivacyAccountant(budget_epsilon=1.0, delta=1e-5).epsilon() == 0.0


@given(st.integers(1, 500), st.floats(0.01, 10.0), st.integers(0, 1000))
def test_clipping_bounds_the_norm_and_keeps_short_updates(
    size: int, clip: float, seed: int
) -> None:
    update = np.random.default_rng(seed).normal(0, 1, size).astype(np.float32)
    clipped = clip_update(update, clip)
    assert np.linalg.norm(clipped) <= clip * (1 + 1e-5)
    if np.linalg.norm(update) <= clip:
        np.testing.assert_array_equal(clipped, update)
    else:  # same direction
        cosine = clipped @ update / (np.linalg.norm(clipped) * np.linalg.norm(update))
        assert cosine == pytest.approx(1.0, abs=1e-5)


def test_each_peer_adds_its_share_of_the_noise_the_sum_is_charged_for() -> None:
    rng = np.random.default_rng(0)
    contributors, clip, sigma = 4, 0.5, 1.5
    shares = [
        privatize(np.zeros(200_000, np.float32), clip=clip, noise_multiplier=sigma,
                  min_contributors=contributors, rng=rng)
        for _ in range(contributors)
    ]  # fmt: skip
    total = np.sum(shares, axis=0)
    assert np.std(total) == pytest.approx(sigma * clip, rel=0.01)
    assert np.std(shares[0]) == pytest.approx(sigma * clip / math.sqrt(contributors), rel=0.01)


@pytest.mark.parametrize(("rate", "count"), [(1.0, 5), (0.1, 100), (0.01, 2000)])
def test_calibrated_noise_is_the_least_that_fits_the_budget(rate: float, count: int) -> None:
    noise = calibrate_noise(epsilon=4.0, delta=1e-5, sampling_rate=rate, count=count)

    def spent(multiplier: float) -> float:
        accountant = PrivacyAccountant(budget_epsilon=100, delta=1e-5)
        accountant.compose(GaussianEvent(multiplier, sampling_rate=rate), count)
        return accountant.epsilon()

    assert spent(noise) <= 4.0 < spent(noise * 0.98)
    with pytest.raises(ValueError, match="do not fit"):
        calibrate_noise(epsilon=1e-3, delta=1e-5, sampling_rate=1.0, count=1000, most=2.0)
