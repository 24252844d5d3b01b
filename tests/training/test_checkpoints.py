"""Checkpoints in training: the progress policy, and rollback, convergence and resume on real
nodes with real stores."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from meshfed import Node
from meshfed.errors import ConfigError, StoreError
from meshfed.identity import Identity
from meshfed.secagg.driver import Aggregator
from meshfed.store import JobState
from meshfed.training.checkpoints import Continue, Converged, Decision, ProgressPolicy, Rollback
from meshfed.training.job import RoundReport, TrainingPeer
from meshfed.training.spec import (
    AveragingSpec,
    JobSpec,
    PrivacySpec,
    ProgressSpec,
    RobustnessSpec,
    TrainingSpec,
    flattened,
)
from tests.training.nodes import QUICK, memory_nodes

accuracies = st.lists(st.floats(0, 1), min_size=1, max_size=30)


def decisions(policy: ProgressPolicy, values: list[float]) -> list[Decision]:
    return [policy.observe(number, value) for number, value in enumerate(values)]


def test_the_rules_on_a_story() -> None:
    policy = ProgressPolicy(rollback_drop=0.1, rollback_rounds=2, patience=7)
    story = [0.5, 0.8, 0.75, 0.6, 0.65, 0.6, 0.5, 0.79, 0.7]
    assert decisions(policy, story) == [
        Continue(),
        Continue(),
        Continue(),  # 0.75 is within 0.1 of the best 0.8
        Continue(),  # 0.6: first round below 0.7
        Rollback(1),  # 0.65: second: back to round 1 (0.8)
        Continue(),  # the count starts again
        Rollback(1),
        Continue(),
        Converged("plateau"),  # nothing beat 0.8 for 7 rounds
    ]
    assert ProgressPolicy(target_accuracy=0.7).observe(0, 0.7) == Converged("target")
    with pytest.raises(ValueError, match="after round 8"):
        policy.observe(3, 0.9)
    with pytest.raises(ConfigError):
        ProgressPolicy(rollback_drop=1.5)


@given(values=accuracies, target=st.floats(0.01, 1))
def test_the_target_stops_at_the_first_round_that_reaches_it(
    values: list[float], target: float
) -> None:
    policy = ProgressPolicy(target_accuracy=target, rollback_drop=0.05, patience=3)
    for number, value in enumerate(values):
        decision = policy.observe(number, value)
        if value >= target:
            assert decision == Converged("target")
            break
        assert decision != Converged("target")


@given(values=accuracies, drop=st.floats(0.01, 0.5), rounds=st.integers(1, 4))
def test_a_rollback_goes_to_the_best_round_after_k_rounds_below_it(
    values: list[float], drop: float, rounds: int
) -> None:
    policy = ProgressPolicy(rollback_drop=drop, rollback_rounds=rounds)
    last_rollback = -1
    for number, decision in enumerate(decisions(policy, values)):
        if isinstance(decision, Rollback):
            earlier = values[:number]
            best = max(earlier)
            assert decision.to_round == earlier.index(best)  # the earliest best
            window = values[number - rounds + 1 : number + 1]
            assert len(window) == rounds and all(v < best - drop for v in window)
            assert number - last_rollback >= rounds  # the count started again
            last_rollback = number
        else:
            assert decision == Continue()  # no target, no patience: nothing else


@given(
    start=st.floats(0, 0.5),
    steps=st.lists(st.floats(0.011, 0.05), max_size=15),
    patience=st.integers(1, 4),
)
def test_steady_progress_never_stops_or_rolls_back(
    start: float, steps: list[float], patience: int
) -> None:
    values = [start]
    for step in steps:
        values.append(values[-1] + step)
    policy = ProgressPolicy(patience=patience, min_delta=0.01, rollback_drop=0.01)
    assert all(d == Continue() for d in decisions(policy, values))


@given(values=accuracies, patience=st.integers(1, 5), min_delta=st.floats(0, 0.1))
def test_a_plateau_means_patience_rounds_without_a_real_improvement(
    values: list[float], patience: int, min_delta: float
) -> None:
    policy = ProgressPolicy(patience=patience, min_delta=min_delta)
    for number, decision in enumerate(decisions(policy, values)):
        if decision == Converged("plateau"):
            before, window = (
                values[: number + 1 - patience],
                values[number + 1 - patience : number + 1],
            )
            assert before and max(window) <= max(before) + min_delta
            assert len(window) == patience
            break


# -- on real nodes ---------------------------------------------------------------------------


async def run_job(
    nodes: list[Node], spec: JobSpec, *, stores: bool = True, stop_after: int | None = None
) -> tuple[list[TrainingPeer], list[list[RoundReport]], list[list[RoundReport]]]:
    """Every node's part in ``spec``; returns the peers, what ``run`` returned and what
    ``on_round`` saw. ``stop_after``: each node stops once it committed that round."""
    peers = [
        TrainingPeer(
            node,
            spec,
            Aggregator(node, deadlines=QUICK, replace=True),  # run_job runs again on these nodes
            store=node.store if stores else None,
        )
        for node in nodes
    ]
    returned: list[list[RoundReport]] = [[] for _ in nodes]
    seen: list[list[RoundReport]] = [[] for _ in nodes]

    async def one(i: int) -> None:
        with trio.CancelScope() as scope:

            def on_round(report: RoundReport) -> None:
                seen[i].append(report)
                if report.round == stop_after:
                    scope.cancel(reason="the node stops")

            returned[i] = await peers[i].run(on_round)

    async with trio.open_nursery() as nursery:
        for i in range(len(nodes)):
            nursery.start_soon(one, i)
    return peers, returned, seen


def roster_of(nodes: list[Node]) -> tuple[str, ...]:
    return tuple(str(node.peer_id) for node in nodes)


@pytest.mark.parametrize("mode", ["plain", "secure", "dp"])
async def test_a_job_resumed_after_a_restart_ends_as_if_never_stopped(
    tmp_path: Path, mode: str
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = JobSpec(
            job_id="resume",
            roster=roster_of(nodes),
            rounds=6,
            averaging=AveragingSpec(
                secure=mode != "plain",
                clip=16.0 if mode == "dp" else 8.0,  # DP: room for noise shares of std 1.4
            ),
            privacy=PrivacySpec(dp_clip=1.0 if mode == "dp" else 0.0, dp_noise_multiplier=2.0),
        )
        # a DP job needs a store (its charges are committed before each release): the
        # uninterrupted reference runs under another job id
        reference_spec = replace(spec, job_id="resume-reference")
        reference, reference_reports, _ = await run_job(nodes, reference_spec, stores=mode == "dp")
        _, _, before = await run_job(nodes, spec, stop_after=2)
    assert all([r.round for r in seen] == [0, 1, 2] for seen in before)
    async with memory_nodes(tmp_path, 4) as nodes:  # every node restarts with its store
        for node in nodes:
            assert node.store is not None
            job = node.store.job("resume")
            assert job is not None and job.state is JobState.RUNNING
            assert node.store.checkpoint_rounds("resume") == [0, 1, 2]
        peers, returned, after = await run_job(nodes, spec)
        for node in nodes:
            assert node.store is not None
            job = node.store.job("resume")
            assert job is not None and job.state is JobState.FINISHED
            assert node.store.verify() == []
    assert all([r.round for r in seen] == [3, 4, 5] for seen in after)
    for i, peer in enumerate(peers):
        assert [r.round for r in returned[i]] == list(range(6))
        assert returned[i][:3] == before[i]  # the past rounds, from the store
        # Equal up to float rounding: the plain butterfly adds slices in arrival order (two
        # uninterrupted runs differ by ~1e-7 too), and secure aggregation quantizes
        # stochastically with randomness from os.urandom.
        # With differential privacy the noise comes from os.urandom too, but the privacy spent
        # is restored from the store: the same epsilon every round as without a restart.
        assert [r.epsilon for r in returned[i]] == [r.epsilon for r in reference_reports[i]]
        if mode == "dp":
            assert returned[i][-1].epsilon > returned[i][2].epsilon > 0
            continue
        tolerance = 2e-3 if mode == "secure" else 1e-5
        np.testing.assert_allclose(peer.parameters, reference[i].parameters, atol=tolerance)
        assert returned[i][-1].accuracy == pytest.approx(
            reference_reports[i][-1].accuracy, abs=0.02
        )


async def test_a_degrading_job_rolls_back_to_its_best_checkpoint(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        # peer 3 scales its update by 3 and there is no robust aggregation: accuracy swings
        spec = JobSpec(
            job_id="rollback",
            roster=roster_of(nodes),
            rounds=8,
            averaging=AveragingSpec(secure=False),
            robustness=RobustnessSpec(attackers=(3,), attack="scale", attack_scale=3.0),
            progress=ProgressSpec(rollback_drop=0.1, rollback_rounds=1, keep_checkpoints=2),
        )
        models: list[dict[int, np.ndarray]] = [{} for _ in nodes]
        peers = [
            TrainingPeer(node, spec, Aggregator(node, deadlines=QUICK), store=node.store)
            for node in nodes
        ]
        reports: list[list[RoundReport]] = [[] for _ in nodes]

        def keep(i: int) -> Callable[[RoundReport], None]:
            def on_round(report: RoundReport) -> None:
                models[i][report.round] = peers[i].parameters  # the model the next round uses
                reports[i].append(report)

            return on_round

        async with trio.open_nursery() as nursery:
            for i, peer in enumerate(peers):
                nursery.start_soon(peer.run, keep(i))
        stores = [node.store for node in nodes]
        decisions = [[(r.decision, r.rolled_back_to) for r in rs] for rs in reports]
        assert all(d == decisions[0] for d in decisions)  # the same decisions everywhere
        rollbacks = [r for r in reports[0] if r.decision == "rollback"]
        assert rollbacks, [round(r.accuracy, 3) for r in reports[0]]
        for i, store in enumerate(stores):
            assert store is not None
            accuracies = [r.accuracy for r in reports[i]]
            for report in rollbacks:
                best = report.rolled_back_to
                assert best is not None
                assert accuracies[best] == max(accuracies[: report.round])
                assert report.accuracy < accuracies[best] - 0.1
                np.testing.assert_array_equal(models[i][report.round], models[i][best])
            best_checkpoint = store.best_checkpoint("rollback")
            assert best_checkpoint is not None
            assert best_checkpoint.round == accuracies.index(max(accuracies))
            assert len(store.checkpoint_rounds("rollback")) <= 3  # last 2 and the best
            job = store.job("rollback")
            assert job is not None and "rolled back to round" in job.note


async def test_a_job_that_reaches_its_target_stops_everywhere_at_the_same_round(
    tmp_path: Path,
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = JobSpec(
            job_id="target",
            roster=roster_of(nodes),
            rounds=20,
            training=TrainingSpec(lr=0.5),
            progress=ProgressSpec(target_accuracy=0.85),
        )
        peers, returned, _ = await run_job(nodes, spec)
        stops = {len(reports) for reports in returned}
        assert len(stops) == 1 and stops.pop() < 20
        for peer, reports in zip(peers, returned, strict=True):
            assert reports[-1].decision == "target" and reports[-1].accuracy >= 0.85
            assert all(r.accuracy < 0.85 for r in reports[:-1])
            assert peer.state is JobState.CONVERGED
            assert peer.store is not None
            job = peer.store.job("target")
            assert job is not None and job.state is JobState.CONVERGED
        # started again, a converged job runs nothing and returns its rounds
        _, returned_again, seen_again = await run_job(nodes, spec)
        assert returned_again == returned and seen_again == [[] for _ in nodes]


def test_rollback_needs_a_store() -> None:
    roster = tuple(str(Identity.generate().peer_id) for _ in range(4))
    with pytest.raises(ConfigError, match="rollback_drop must be in"):
        JobSpec(job_id="j", roster=roster, progress=ProgressSpec(rollback_drop=2.0))
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        JobSpec(job_id="j", roster=roster, progress=ProgressSpec(keep_checkpoints=0))


async def test_a_job_stored_flat_by_an_older_node_resumes_and_another_job_does_not(
    tmp_path: Path,
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = JobSpec(job_id="upgraded", roster=roster_of(nodes), rounds=2)
        flat = json.dumps(flattened(json.loads(spec.to_json())))  # before the groups
        other = json.dumps({**json.loads(flat), "rounds": 3})
        for node in nodes:
            assert node.store is not None
            node.store.put_job("upgraded", flat)
            node.store.put_job("taken", other.replace("upgraded", "taken"))
        _, returned, _ = await run_job(nodes, spec)
        assert [len(reports) for reports in returned] == [2, 2, 2, 2]
        taken = TrainingPeer(nodes[0], replace(spec, job_id="taken"), store=nodes[0].store)
        with pytest.raises(StoreError, match="the store holds another job called 'taken'"):
            await taken.run()
