"""Push-sum: mass is conserved, estimates converge to the average, bad pushes are refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.averaging.pushsum import PushSumState, push_target


@given(st.integers(2, 40), st.integers(1, 20), st.integers(0, 1000))
def test_gossip_conserves_mass_and_converges_to_the_average(
    peers: int, size: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 1, (peers, size)).astype(np.float32)
    states = [PushSumState(v) for v in values]
    for tick in range(12 * max(1, int(np.ceil(np.log2(peers))))):
        targets = [push_target(i, peers, tick) for i in range(peers)]
        assert all(target != i for i, target in enumerate(targets))
        messages = [state.split() for state in states]
        for target, message in zip(targets, messages, strict=True):
            states[target].absorb(message)
        assert sum(s.weight for s in states) == pytest.approx(peers)
    mean = values.mean(axis=0)
    for state in states:
        np.testing.assert_allclose(state.estimate(), mean, atol=1e-4)


def test_a_push_must_carry_a_positive_finite_weight() -> None:
    state = PushSumState(np.zeros(3, np.float32))
    for bad in ([1, 2, 3, 0], [1, 2, 3, -1], [1, np.nan, 3, 1], [1, 2, 1]):
        with pytest.raises(ValueError):
            state.absorb(np.array(bad, np.float32))
    assert state.weight == 1.0
