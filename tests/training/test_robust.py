"""One of eight peers sends sign-flipped, scaled models: a robust mode shrugs it off, the
plain mean collapses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.averaging.robust import centered_clip, krum, median, trimmed_mean
from meshfed.training.spec import JobSpec, RobustnessSpec
from tests.training.nodes import job_for, memory_nodes, peers_for, run_together


async def final_accuracy(tmp_path: Path, name: str, **options: object) -> float:
    async with memory_nodes(tmp_path / name, 8) as nodes:
        spec = job_for(
            nodes,
            name,
            rounds=4,
            epochs=2,
            partition="iid",
            secure=False,
            **options,
        )
        peers = peers_for(nodes, spec)
        reports = await run_together(peers)
    honest = [r[-1].accuracy for i, r in enumerate(reports) if i not in spec.robustness.attackers]
    return float(np.mean(honest))


async def test_robust_aggregation_resists_one_attacker_and_the_mean_does_not(
    tmp_path: Path,
) -> None:
    clean = await final_accuracy(tmp_path, "clean")
    attack = {"attackers": (3,), "attack": "sign_flip", "attack_scale": 10.0}
    collapsed = await final_accuracy(tmp_path, "mean", **attack)
    assert collapsed < clean - 0.3
    for robust, options in [("median", {}), ("krum", {"f": 1, "m": 3}), ("trimmed_mean", {})]:
        accuracy = await final_accuracy(
            tmp_path, robust, robust=robust, robust_options=options, **attack
        )
        assert accuracy >= clean - 0.03, (robust, accuracy, clean)


def test_robust_mode_refuses_secure_aggregation() -> None:
    from meshfed.errors import ConfigError
    from meshfed.identity import Identity

    roster = tuple(str(Identity.generate().peer_id) for _ in range(4))
    with pytest.raises(ConfigError, match="secure"):
        JobSpec(job_id="j", roster=roster, robustness=RobustnessSpec(robust="median"))


@settings(max_examples=40, deadline=None)
@given(st.integers(5, 12), st.integers(1, 50), st.integers(0, 1000), st.floats(10, 1e6))
def test_aggregators_stay_near_the_honest_vectors(
    count: int, size: int, seed: int, magnitude: float
) -> None:
    rng = np.random.default_rng(seed)
    honest = rng.normal(0, 1, (count - 1, size)).astype(np.float32)
    stack = np.vstack([honest, np.full((1, size), magnitude, np.float32)])
    low, high = honest.min(axis=0) - 1e-5, honest.max(axis=0) + 1e-5
    for result in (median(stack), trimmed_mean(stack, 0.2), krum(stack, f=1)):
        assert np.all((result >= low) & (result <= high))
    clipped = centered_clip(stack, center=honest[0], tau=1.0)
    assert np.linalg.norm(clipped - honest[0]) <= 1.0 * 3 + 1e-4  # at most tau per iteration
