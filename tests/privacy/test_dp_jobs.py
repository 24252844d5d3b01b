"""Differential privacy in real jobs on memory-transport nodes: what leaves a peer carries the
noise the accountant charges, in every mode and schedule, and every release is charged
before it happens (write-ahead), also across a crash."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from meshfed.averaging.groups import Placement
from meshfed.errors import ConfigError
from meshfed.identity import PeerId
from meshfed.node import Node
from meshfed.privacy.accountant import GaussianEvent, PrivacyAccountant
from meshfed.secagg.bounds import DEFAULT_COLLUSION, threshold_for
from meshfed.training.job import JobSpec, TrainingPeer
from tests.privacy.recording import Recording, Sent, recorded_peers, run_all
from tests.training.nodes import job_for, memory_nodes

SIGMA, CLIP = 1.0, 1.0  # the released noise must have std >= SIGMA * CLIP per coordinate
#: peer-level DP whose local training barely moves the model: what leaves a peer is the
#: round's model plus exactly the noise it added
QUIET: dict[str, Any] = {"dp_clip": CLIP, "dp_noise_multiplier": SIGMA, "lr": 1e-9, "rounds": 1}


def noise_of(sent: Sent, base: npt.NDArray[np.float32], spec: JobSpec) -> npt.NDArray[np.float64]:
    """The noise in a recorded vector (``[w x, w]`` with w = 1, or the bare model for robust
    gathers; updates when the job averages them)."""
    released = sent.vector[: len(base)].astype(np.float64)
    return released if spec.averages_updates else released - base


def honest_subsets_carry_the_charged_noise(
    noises: list[npt.NDArray[np.float64]], group: int
) -> None:
    """Whichever ``t - c`` members' shares a revealed sum is left with (the colluders having
    subtracted theirs, the rest dropped), their noise has std >= sigma C."""
    honest = threshold_for(group, DEFAULT_COLLUSION) - DEFAULT_COLLUSION
    for subset in itertools.combinations(noises, honest):
        assert np.std(np.sum(subset, axis=0)) >= 0.97 * SIGMA * CLIP


@pytest.mark.parametrize(
    "options",
    [
        {"secure": False},
        {"secure": False, "compression": "int8"},
        {"secure": False, "robust": "median"},
        {"secure": False, "compression": "topk", "topk_ratio": 0.1},
    ],
    ids=["butterfly", "butterfly-int8", "robust", "topk"],
)
async def test_without_secure_aggregation_each_peer_releases_the_whole_noise(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(nodes, "plain-dp", **QUIET, **options)
        peers, aggregators = recorded_peers(nodes, spec)
        base = peers[0].parameters
        await run_all(peers)
        for peer, aggregator in zip(peers, aggregators, strict=True):
            [sent] = aggregator.sent  # one group of 4, one step
            std = np.std(noise_of(sent, base, spec))
            assert 0.97 * SIGMA * CLIP <= std <= 1.03 * SIGMA * CLIP
            assert peer.accountant is not None
            reference = PrivacyAccountant(budget_epsilon=100, delta=spec.dp_delta)
            reference.compose(GaussianEvent(SIGMA))
            assert peer.accountant.epsilon() == pytest.approx(reference.epsilon())


def groups_of(aggregators: list[Recording], round: int, step: int) -> dict[Any, list[Sent]]:
    """The recorded inputs of one step, by group (its members)."""
    groups: dict[Any, list[Sent]] = {}
    for aggregator in aggregators:
        for sent in aggregator.sent:
            if (sent.round, sent.step) == (round, step):
                groups.setdefault(sent.members, []).append(sent)
    return groups


async def test_exact_schedule_shares_hold_against_colluders_and_a_left_out_peer_adds_it_all(
    tmp_path: Path,
) -> None:
    async with memory_nodes(tmp_path, 16) as nodes:
        spec = job_for(nodes, "exact-dp", max_group=4, **QUIET)  # a 4 x 4 grid
        roster = tuple(PeerId.from_string(p) for p in spec.roster)
        placement = Placement(roster, job=spec.job_id.encode(), round=0, max_group=4)
        _, failing = placement.group(roster[0], 0)  # this step-0 group times out

        def fail(node: Node) -> Any:
            return lambda round, step: node.peer_id in failing and step == 0

        aggregators = [Recording(node, fail=fail(node)) for node in nodes]
        peers = [
            TrainingPeer(node, spec, aggregator, store=node.store)
            for node, aggregator in zip(nodes, aggregators, strict=True)
        ]
        base = peers[0].parameters
        await run_all(peers)
    step0 = groups_of(aggregators, 0, 0)
    assert len(step0) == 3 and all(len(sent) == 4 for sent in step0.values())
    for sent in step0.values():
        noises = [noise_of(s, base, spec) for s in sent]
        for noise in noises:  # a share for h = t - c = 2 honest members
            assert np.std(noise) == pytest.approx(SIGMA * CLIP / math.sqrt(2), rel=0.03)
        honest_subsets_carry_the_charged_noise(noises, 4)
        result = sent[0].result
        assert result is not None and len(result.survivors) == 4
        revealed = result.value[:-1].astype(np.float64) * 4 - 4 * base
        np.testing.assert_allclose(revealed, np.sum(noises, axis=0), atol=1e-3)  # exact
    # the failed group's members enter step 1 with their own update beside group means: only
    # their own noise is counted on there, so they carry the whole of it
    left_out = [a for a, n in zip(aggregators, nodes, strict=True) if n.peer_id in failing]
    assert len(left_out) == 4
    for aggregator in left_out:
        [entered] = [s for s in aggregator.sent if s.step == 1]
        std = np.std(noise_of(entered, base, spec))
        assert 0.97 * SIGMA * CLIP <= std <= 1.03 * SIGMA * CLIP


async def test_moshpit_shares_are_sized_for_each_rounds_own_group(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 24) as nodes:
        # a 6 x 4 grid: round 0 sums in groups of 6 (t = 4, h = 3), round 1 in groups of 4
        # (t = 3, h = 2), where a share sized for round 0's groups would fall short
        spec = job_for(nodes, "moshpit-dp", max_group=6, schedule="moshpit", **QUIET)
        spec = JobSpec(**{**spec.__dict__, "rounds": 2})
        peers, aggregators = recorded_peers(nodes, spec)
        base = peers[0].parameters
        await run_all(peers)
    noises: dict[tuple[int, Any], list[npt.NDArray[np.float64]]] = {}
    for aggregator in aggregators:
        first, second = aggregator.sent  # round 0 on axis 0, round 1 on axis 1
        assert first.result is not None  # the round's mean is where round 1 starts (FedAvg)
        start = first.result.value[:-1].astype(np.float64) / first.result.value[-1]
        for sent, origin in ((first, base), (second, start)):
            released = sent.vector[:-1].astype(np.float64) - origin
            noises.setdefault((sent.round, sent.members), []).append(released)
    assert {(n, len(m)) for n, m in noises} == {(0, 6), (1, 4)}
    for (_, members), group in noises.items():
        assert len(group) == len(members)
        honest_subsets_carry_the_charged_noise(group, len(members))
