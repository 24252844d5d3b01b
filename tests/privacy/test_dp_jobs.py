"""Differential privacy in real jobs on memory-transport nodes: what leaves a peer carries the
noise the accountant charges, in every mode and schedule, and every release is charged
before it happens (write-ahead), also across a crash."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
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
from meshfed.training.job import TrainingPeer
from meshfed.training.spec import JobSpec
from tests.privacy.recording import Recording, Sent, recorded_peers, run_all
from tests.training.nodes import job_for, memory_nodes, run_together

SIGMA, CLIP = 1.0, 1.0  # the released noise must have std >= SIGMA * CLIP per coordinate
#: peer-level DP whose local training barely moves the model: what leaves a peer is the
#: round's model plus exactly the noise it added
QUIET: dict[str, Any] = {"dp_clip": CLIP, "dp_noise_multiplier": SIGMA, "lr": 1e-9, "rounds": 1}


def noise_of(sent: Sent, base: npt.NDArray[np.float32], spec: JobSpec) -> npt.NDArray[np.float64]:
    """The noise in a recorded vector (``[w x, w]`` with w = 1, or the bare model for robust
    gathers; updates when the job averages them)."""
    released = sent.vector[: len(base)].astype(np.float64)
    return released if spec.averaging.averages_updates else released - base


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
            reference = PrivacyAccountant(budget_epsilon=100, delta=spec.privacy.dp_delta)
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


async def test_exact_schedule_shares_hold_against_colluders_and_a_failed_group_sends_no_more(
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
    # the failed group's members sit out step 1 (what they hold is not what a group holds)
    # and take the model the others agree on: nothing of theirs leaves them after step 0
    left_out = [a for a, n in zip(aggregators, nodes, strict=True) if n.peer_id in failing]
    assert len(left_out) == 4
    for aggregator in left_out:
        assert not [s for s in aggregator.sent if s.step == 1]
    for peer in peers[1:]:
        np.testing.assert_array_equal(peer.parameters, peers[0].parameters)


async def test_moshpit_shares_are_sized_for_each_rounds_own_group(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 24) as nodes:
        # a 6 x 4 grid: round 0 sums in groups of 6 (t = 4, h = 3), round 1 in groups of 4
        # (t = 3, h = 2), where a share sized for round 0's groups would fall short
        spec = job_for(nodes, "moshpit-dp", max_group=6, schedule="moshpit", **QUIET)
        spec = replace(spec, rounds=2)
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


def record_pushes(
    monkeypatch: pytest.MonkeyPatch, node: Node, into: list[tuple[str, npt.NDArray[Any]]]
) -> None:
    """Keep every array ``node`` sends (what leaves it), by name."""
    send = node.send_array

    async def sending(peer: PeerId, array: npt.NDArray[Any], **options: Any) -> None:
        into.append((options["name"], np.array(array)))
        await send(peer, array, **options)

    monkeypatch.setattr(node, "send_array", sending)


async def test_push_sum_with_peer_level_dp_pushes_noisy_clipped_models_and_charges_each_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        reference = PrivacyAccountant(budget_epsilon=100, delta=1e-5)
        reference.compose(GaussianEvent(SIGMA), 2)
        spec = job_for(
            nodes,
            "gossip-dp",
            **{**QUIET, "rounds": 3},
            secure=False,
            schedule="pushsum",
            local_steps=1,
            dp_epsilon=reference.epsilon() + 0.01,  # two ticks fit, a third does not
        )
        pushes: list[tuple[str, npt.NDArray[Any]]] = []
        record_pushes(monkeypatch, nodes[0], pushes)
        peers, _ = recorded_peers(nodes, spec)
        base = peers[0].parameters
        outcomes = await run_all(peers)
    per_tick = peers[0]._pushes_per_tick
    training = [a for name, a in pushes if int(name.rsplit(":", 1)[1]) < 2 * per_tick]
    assert len(training) == 2 * per_tick
    for message in training:  # [x / 2, w / 2]: the estimate x / w is what it releases
        estimate = message[:-1].astype(np.float64) / float(message[-1])
        assert np.std(estimate - base) >= 0.97 * SIGMA * CLIP
    for reports in outcomes:
        assert isinstance(reports, list)
        assert [r.contributed for r in reports] == [True, True, False]
        assert reports[-1].epsilon == pytest.approx(reference.epsilon())


async def test_push_sum_with_dp_sgd_charges_every_tick_its_sampled_steps(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(
            nodes,
            "gossip-dp-sgd",
            rounds=3,
            secure=False,
            schedule="pushsum",
            partition="iid",
            dp_mode="sample",
            dp_clip=1.0,
            dp_noise_multiplier=1.0,
        )
        peers, _ = recorded_peers(nodes, spec)
        outcomes = await run_all(peers)
    for peer, reports in zip(peers, outcomes, strict=True):
        assert isinstance(reports, list) and all(r.contributed for r in reports)
        event, steps = peer.trainer.event(len(peer.shard))  # type: ignore[union-attr]
        reference = PrivacyAccountant(budget_epsilon=100, delta=spec.privacy.dp_delta)
        reference.compose(event, 3 * steps)
        assert reports[-1].epsilon == pytest.approx(reference.epsilon())
        assert reports[-1].epsilon > 0


async def test_a_peer_killed_between_release_and_commit_is_charged_for_every_release(
    tmp_path: Path,
) -> None:
    spec_options = {**QUIET, "rounds": 3, "dp_epsilon": 50.0}
    releases = [0] * 4
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(nodes, "crash-dp", **spec_options)
        # every node dies right after round 1's sum came back, before it committed the round
        peers, aggregators = recorded_peers(nodes, spec, crash=lambda r, s: r == 1)
        outcomes = await run_all(peers)
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        for i, aggregator in enumerate(aggregators):
            releases[i] += sum(1 for s in aggregator.sent if s.vector[-1] > 0)
            store = nodes[i].store
            assert store is not None and [r.round for r in store.rounds("crash-dp")] == [0]
    async with memory_nodes(tmp_path, 4) as nodes:  # restarted, same stores
        peers, aggregators = recorded_peers(nodes, spec)
        outcomes = await run_all(peers)
        for i, (peer, aggregator) in enumerate(zip(peers, aggregators, strict=True)):
            reports = outcomes[i]
            assert isinstance(reports, list) and [r.round for r in reports] == [0, 1, 2]
            releases[i] += sum(1 for s in aggregator.sent if s.vector[-1] > 0)
            covered = PrivacyAccountant(budget_epsilon=100, delta=spec.privacy.dp_delta)
            covered.compose(GaussianEvent(SIGMA), releases[i])
            assert peer.accountant is not None
            assert peer.accountant.epsilon() >= covered.epsilon() * (1 - 1e-9)
            assert reports[-1].epsilon == peer.accountant.epsilon()
            # round 1 was charged before the crash: its re-run goes without this peer's data
            assert [r.contributed for r in reports] == [True, False, True]
            assert releases[i] == 3  # rounds 0 and 1 before the crash, 2 after


async def test_a_dp_job_needs_a_store_and_room_for_its_noise(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(nodes, "no-store", dp_clip=1.0)
        with pytest.raises(ConfigError, match="store"):
            TrainingPeer(nodes[0], spec)
        # secure: shares of std up to 2 x 2 / sqrt(2) = 2.8 would be cut by clip 8
        with pytest.raises(ConfigError, match="quantizer"):
            job_for(nodes, "cut", dp_clip=2.0, dp_noise_multiplier=2.0)
        job_for(nodes, "room", dp_clip=2.0, dp_noise_multiplier=2.0, clip=32.0)
        job_for(nodes, "plain", dp_clip=2.0, dp_noise_multiplier=2.0, secure=False)
        with pytest.raises(ConfigError, match="dp_delta"):
            job_for(nodes, "delta", dp_clip=1.0, dp_delta=1.0)


async def test_with_dp_each_peer_spends_its_budget_then_stops_contributing(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(
            nodes,
            "dp",
            rounds=7,
            dp_clip=1.0,
            dp_noise_multiplier=2.0,
            clip=16.0,  # room for noise shares of std 2 / sqrt(2) beside the parameters
            dp_epsilon=5.5,  # sigma 2: five rounds fit (epsilon 5.38), a sixth would not (5.98)
            dp_delta=1e-5,
        )
        peers, aggregators = recorded_peers(nodes, spec)
        reports = await run_together(peers)
        for peer in peers[1:]:
            np.testing.assert_array_equal(peer.parameters, peers[0].parameters)
        for peer_reports in reports:
            assert [r.contributed for r in peer_reports] == [True] * 5 + [False] * 2
            epsilons = [r.epsilon for r in peer_reports]
            assert epsilons == sorted(epsilons) and 5.3 < epsilons[-1] <= 5.5
            assert epsilons[5] == epsilons[4]  # nothing spent once it stopped
            assert 0.0 <= peer_reports[-1].accuracy <= 1.0
        # a peer out of budget sends weight 0 but still its noise share, no data: it counts
        # toward the group's threshold, so the sum must not miss its share
        for aggregator in aggregators:
            for sent in aggregator.sent[5:]:
                assert sent.vector[-1] == 0
                assert np.std(sent.vector[:-1]) == pytest.approx(2.0 / math.sqrt(2), rel=0.03)


async def test_with_dp_sgd_each_example_is_protected_and_the_job_still_learns(
    tmp_path: Path,
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(
            nodes,
            "dp-sgd",
            rounds=4,
            partition="iid",
            lr=0.5,
            dp_mode="sample",
            dp_clip=1.0,
            dp_noise_multiplier=1.0,
            dp_epsilon=5.0,  # three rounds of ~12 sampled steps fit (epsilon 4.67), four do not
        )
        peers, _ = recorded_peers(nodes, spec)
        reports = await run_together(peers)
        for peer, peer_reports in zip(peers, reports, strict=True):
            assert [r.contributed for r in peer_reports] == [True] * 3 + [False]
            event, steps = peer.trainer.event(len(peer.shard))  # type: ignore[union-attr]
            reference = PrivacyAccountant(budget_epsilon=100, delta=spec.privacy.dp_delta)
            reference.compose(event, 3 * steps)
            assert peer_reports[-1].epsilon == pytest.approx(reference.epsilon())
            assert peer_reports[2].accuracy > 0.6  # chance is 0.1


async def test_a_peer_left_out_of_every_step_keeps_only_a_fully_noised_model(
    tmp_path: Path,
) -> None:
    """What a left-out peer keeps is its next round's base and what it offers a peer that
    catches up: it must not hold its update with less than the whole noise (``moshpit``: with
    ``exact`` a round that failed everywhere goes back to its starting model)."""
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(nodes, "left-out", **QUIET, secure=False, schedule="moshpit")
        left_out = nodes[0].peer_id
        aggregators = [
            Recording(node, fail=lambda r, s, me=node.peer_id: me == left_out) for node in nodes
        ]
        peers = [
            TrainingPeer(node, spec, aggregator, store=node.store)
            for node, aggregator in zip(nodes, aggregators, strict=True)
        ]
        base = peers[0].parameters
        outcomes = await run_all(peers)
    reports = outcomes[0]
    assert isinstance(reports, list) and reports[0].groups == (0,)
    std = np.std(peers[0].parameters.astype(np.float64) - base)
    assert 0.97 * SIGMA * CLIP <= std <= 1.03 * SIGMA * CLIP


async def test_a_round_the_budget_refuses_is_in_the_audit_log(tmp_path: Path) -> None:
    """``meshfed-node run --job`` and leased work take part through ``take_part``: each round
    that ran without this node's data, its budget spent, is an audit entry."""
    import trio

    from meshfed.audit import AuditKind, AuditLog
    from meshfed.training.participation import take_part

    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(
            nodes, "audited", rounds=4, partition="iid", lr=0.5, dp_mode="sample", dp_clip=1.0,
            dp_noise_multiplier=1.0, dp_epsilon=5.0,  # three rounds fit, the fourth does not
        )  # fmt: skip
        events: list[tuple[str, dict[str, Any]]] = []
        for i, node in enumerate(nodes):  # the roster waits for its peers' connections
            for other in nodes[i + 1 :]:
                await node.connect(other.listen_addrs[0])
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(
                    lambda n: take_part(n, spec, lambda *e: events.append(e), roster_wait=30), node
                )
        rounds = [doc for name, doc in events if name == "round"]
        assert sum(1 for doc in rounds if not doc["contributed"]) == 4  # each node's fourth
        for node in nodes:
            assert node.store is not None
            await node.audit_trail.flush()
            refused = AuditLog(node.store).entries(kind=AuditKind.PRIVACY_REFUSED)
            assert [(e.fields["job"], e.fields["round"]) for e in refused] == [("audited", 3)]
