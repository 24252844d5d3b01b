"""Differential privacy: clipping, distributed noise, and an accountant that is dp-accounting's."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.errors import ConfigError, StoreError
from meshfed.identity import Identity
from meshfed.privacy.accountant import GaussianEvent, PrivacyAccountant, calibrate_noise
from meshfed.privacy.dp import clip_update
from meshfed.privacy.policy import honest_floor, share_std
from meshfed.secagg.bounds import threshold_for
from meshfed.store import Store
from meshfed.training.spec import AveragingSpec, JobSpec, PrivacySpec


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


def test_a_round_is_charged_once_and_its_charge_survives_a_restart(tmp_path: Path) -> None:
    accountant = PrivacyAccountant(budget_epsilon=10, delta=1e-5)
    accountant.charge(0, GaussianEvent(2.0))
    accountant.charge(1, GaussianEvent(0.5, 0.1), 20)
    with pytest.raises(ValueError, match="already charged"):
        accountant.charge(1, GaussianEvent(2.0))
    with Store.open(tmp_path / "store.sqlite3") as store:
        store.put_job("j", "{}")
        store.commit_privacy("j", accountant.state_dict())
        earlier = PrivacyAccountant(budget_epsilon=10, delta=1e-5)
        earlier.charge(0, GaussianEvent(2.0))
        with pytest.raises(StoreError, match="never rolled back"):
            store.commit_privacy("j", earlier.state_dict())
    with Store.open(tmp_path / "store.sqlite3") as store:  # reopened: the charges are there
        state = store.privacy("j")
    assert state is not None
    restored = PrivacyAccountant(budget_epsilon=1, delta=0.5)
    restored.load_state_dict(state)
    assert restored.charged(0) and restored.charged(1) and not restored.charged(2)
    assert restored.epsilon() == accountant.epsilon()


@given(st.integers(2, 128), st.integers(0, 4))
def test_a_share_is_sized_so_that_the_fewest_honest_survivors_carry_the_charge(
    size: int, collusion: int
) -> None:
    honest = honest_floor(size, collusion)
    try:
        threshold = threshold_for(size, collusion)
    except ConfigError:  # no dropout tolerated: no secure group, every member adds it all
        assert honest == 1
        return
    assert honest == threshold - collusion >= 2  # so a share is sigma C / sqrt(t - c)


def test_shares_only_in_a_secure_jobs_first_sum() -> None:
    roster = tuple(str(Identity.generate().peer_id) for _ in range(4))
    dp = PrivacySpec(dp_clip=0.5, dp_noise_multiplier=2.0)
    secure = JobSpec(job_id="j", roster=roster, privacy=dp)
    plain = JobSpec(job_id="j", roster=roster, privacy=dp, averaging=AveragingSpec(secure=False))
    assert share_std(secure, 4, first=True) == pytest.approx(1.0 / math.sqrt(2))  # t 3, c 1
    assert share_std(secure, 16, first=True) == pytest.approx(1.0 / math.sqrt(8))  # t 9
    assert share_std(secure, 3, first=True) == 1.0  # t = 3 = g: no bound, all of it
    assert share_std(secure, 4, first=False) == 1.0
    assert share_std(plain, 4, first=True) == 1.0
