"""Decentralized training over real nodes: every peer ends each round with the same model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import trio

from meshfed.errors import ConfigError
from meshfed.identity import Identity
from meshfed.secagg.driver import Aggregator, DeadlinePolicy
from meshfed.training.job import JobSpec, RoundReport, TrainingPeer
from tests.training.nodes import job_for, memory_nodes, peers_for, run_together


@pytest.mark.parametrize("secure", [True, False])
async def test_peers_train_digits_together_and_hold_the_same_model(
    tmp_path: Path, secure: bool
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(
            nodes,
            f"digits-{secure}",
            rounds=6,
            epochs=2,
            secure=secure,
            partition="dirichlet",
            alpha=0.5,
        )
        peers = peers_for(nodes, spec)
        reports = await run_together(peers)
        first = peers[0].parameters
        for peer in peers[1:]:
            np.testing.assert_array_equal(peer.parameters, first)
        for peer_reports in reports:
            assert [r.round for r in peer_reports] == list(range(6))
            assert all(r.groups == (4,) for r in peer_reports)
            assert peer_reports[-1].accuracy > 0.85
            assert peer_reports[-1].accuracy > peer_reports[0].accuracy - 0.05


def test_a_job_refuses_what_cannot_run() -> None:
    roster = tuple(str(Identity.generate().peer_id) for _ in range(3))
    with pytest.raises(ConfigError, match="schedule"):
        JobSpec(job_id="j", roster=roster, schedule="sometimes")
    with pytest.raises(ConfigError, match="roster"):
        JobSpec(job_id="j", roster=roster[:1])
    with pytest.raises(ConfigError, match="not a job"):
        JobSpec.from_json('{"job_id": "j"}')
    with pytest.raises(ConfigError, match="groups of 2"):
        JobSpec(job_id="j", roster=roster[:2])  # secure: each would see the other's model
    JobSpec(job_id="j", roster=roster[:2], secure=False)
    spec = JobSpec(job_id="j", roster=roster, model="mlp", model_options={"hidden": [32]})
    assert JobSpec.from_json(spec.to_json()) == spec


async def test_a_peer_that_starts_late_takes_the_others_state_and_ends_with_their_model(
    tmp_path: Path,
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(
            nodes,
            "late",
            rounds=8,
            secure=False,
            partition="iid",
        )
        # a peer alone in its round (the others are elsewhere) gives up after phase_max_s
        deadlines = DeadlinePolicy(join_s=1.0, grace_s=0.3, phase_max_s=3.0)
        peers = [TrainingPeer(node, spec, Aggregator(node, deadlines=deadlines)) for node in nodes]
        reports: list[list[RoundReport]] = [[] for _ in nodes]
        others_in_round_2 = trio.Event()

        def early(i: int) -> Callable[[RoundReport], None]:
            def seen(report: RoundReport) -> None:
                reports[i].append(report)
                if report.round == 1:
                    others_in_round_2.set()

            return seen

        async def late() -> None:
            await others_in_round_2.wait()
            reports[3].extend(await peers[3].run())

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(peers[i].run, early(i))
            nursery.start_soon(late)
        late_rounds = [r.round for r in reports[3]]
        assert late_rounds[0] == 0 and not any(reports[3][0].groups)  # nobody else was there
        assert late_rounds[1] >= 3 and late_rounds == sorted(late_rounds)  # it skipped ahead
        assert "caught up at round" in peers[3].note
        assert [r.round for r in reports[0]] == list(range(8))
        for peer in peers[1:]:
            np.testing.assert_array_equal(peer.parameters, peers[0].parameters)


async def test_under_secure_aggregation_no_peer_sums_its_own_model_with_just_one_other(
    tmp_path: Path,
) -> None:
    async with memory_nodes(tmp_path, 7) as nodes:
        # 7 peers in groups of at most 3: a 3 x 3 grid with two empty cells
        spec = job_for(nodes, "pairs", rounds=1, max_group=3)
        peers = peers_for(nodes, spec)
        reports = await run_together(peers)
        placement = peers[0]._placement(0)
        first_groups = [len(placement.group(node.peer_id, 0)[1]) for node in nodes]
        assert 2 in first_groups  # the grid does make pairs on the first axis here
        for size, peer_reports in zip(first_groups, reports, strict=True):
            step_0, step_1 = peer_reports[0].groups
            assert step_0 == (0 if size == 2 else size)  # a pair never sums two own models
            assert step_1 != 2 or step_0 >= 3  # a later pair sums aggregates of 3 or more


async def test_pushsum_gossip_brings_every_peer_close_to_the_same_model(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 5) as nodes:
        spec = job_for(
            nodes,
            "gossip",
            rounds=12,
            epochs=1,
            schedule="pushsum",
            secure=False,
            partition="iid",
        )
        peers = peers_for(nodes, spec)
        reports = await run_together(peers)
        finals = [r[-1].accuracy for r in reports]
        assert min(finals) > 0.85 and max(finals) - min(finals) < 0.05
        # ceil(log2 5) = 3 pushes per tick, each to a different peer; after the last tick,
        # 3 more ticks of mixing alone
        assert all(r.groups == (3,) for peer_reports in reports for r in peer_reports[:-1])
        assert all(peer_reports[-1].groups == (12,) for peer_reports in reports)
        # the gossip conserves mass: the weights still sum to the number of peers
        waiting = sum(float(m[-1]) for peer in peers for m in peer._pushes)
        total = sum(peer._push_state.weight for peer in peers) + waiting
        assert total == pytest.approx(5.0)


async def test_pushsum_peers_wait_for_a_slow_pusher_instead_of_running_ahead(
    tmp_path: Path,
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(
            nodes,
            "slow",
            rounds=10,
            epochs=1,
            local_steps=1,
            schedule="pushsum",
            secure=False,
            partition="dirichlet",
        )
        peers = peers_for(nodes, spec)
        slow = peers[0]
        train = slow._train_locally

        async def slowly(number: int) -> float:
            await trio.sleep(0.1)
            return await train(number)

        slow._train_locally = slowly  # type: ignore[method-assign]
        done: dict[tuple[int, int], float] = {}
        async with trio.open_nursery() as nursery:
            for i, peer in enumerate(peers):

                def note(report: RoundReport, i: int = i) -> None:
                    done[i, report.round] = trio.current_time()

                nursery.start_soon(peer.run, note)
        # nobody got more than the staleness bound (+ one sweep's slack) ahead of the slow peer
        for i in range(1, 4):
            for tick in range(spec.rounds - 4):
                assert done[i, tick + 4] > done[0, tick]
        assert not any(peer._gone for peer in peers)  # slow is not gone
