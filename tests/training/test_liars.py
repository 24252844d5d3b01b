"""Lying roster members, with real training peers: a peer that starts late asks the roster
where the job is, and members that answer with a far-ahead round, a made-up model, or a model
that does not match its digest do not move it; it takes the honest quorum's state and ends
with the honest peers' model. Colluders beyond the bound are still stopped by the job's clock
while the job is young."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import trio

from meshfed.errors import MeshfedError
from meshfed.node import Node
from meshfed.secagg.driver import Aggregator, DeadlinePolicy
from meshfed.stats import RejectReason
from meshfed.training.job import RoundReport, TrainingPeer
from meshfed.training.spec import JobSpec
from meshfed.training.sync import (
    StateAnswer,
    StateQuery,
    TrainingState,
    encode_state,
    serve,
    state_digest,
)
from meshfed.wire import Envelope
from tests.training.nodes import job_for, memory_nodes

ROUNDS = 12
DEADLINES = DeadlinePolicy(join_s=1.0, grace_s=0.3, phase_max_s=3.0)
#: the late peer, alone in its first round (the others are ahead), gives up soon
ALONE = replace(DEADLINES, phase_max_s=0.5)

#: what a liar answers: the round it claims, the array it sends if asked, the digest it claims
Lie = tuple[int, npt.NDArray[np.uint8], bytes]


def made_up(peer: TrainingPeer, next_round: int) -> TrainingState:
    """A state of the right shape that no honest peer holds."""
    model = np.random.default_rng(7).normal(size=len(peer.parameters)).astype(np.float32)
    return TrainingState(next_round, model, peer.strategy.state_dict())


def lie_with(liar: TrainingPeer, victim: Node, lie: Callable[[], Lie]) -> None:
    """From now on ``liar`` answers ``victim``'s state queries with ``lie()`` (the others'
    honestly: colluders beyond the bound could take over the honest peers as well)."""
    node, job, honest = liar.node, liar.spec.job_id, liar._sync._answer

    async def answer(envelope: Envelope, query: StateQuery) -> StateAnswer:
        if envelope.sender != victim.peer_id:
            return await honest(envelope, query)
        claimed, array, digest = lie()
        if query.send:
            name = f"trainstate.{job.encode().hex()}:{claimed}"
            with contextlib.suppress(MeshfedError):  # refused, if it does not match the claim
                await node.send_array(envelope.sender, array, name=name)
        return StateAnswer(job=job, next_round=claimed, digest=digest)

    serve(node, job, answer)


def answer_slowly(node: Node, peer: TrainingPeer) -> None:
    """``peer`` answers state queries honestly, with what it holds when asked, 50 ms late
    (so that liars answer first)."""
    honest = peer._sync._answer

    async def answer(envelope: Envelope, query: StateQuery) -> StateAnswer:
        answered = await honest(envelope, query)
        await trio.sleep(0.05)
        return answered

    serve(node, peer.spec.job_id, answer)


async def run_with_a_late_peer(
    nodes: list[Node],
    spec: JobSpec,
    *,
    liars: int,
    lie: Callable[[TrainingPeer], Callable[[], Lie]],
    late_min_round_s: float = 0.02,
    slow_honest: bool = False,
    late_reports: int = ROUNDS,
) -> tuple[list[TrainingPeer], list[list[RoundReport]]]:
    """Every node but the last trains from round 0 (the first ``liars`` of them answer state
    queries with ``lie``); the last starts once the others are in round 2. Returns the peers
    and their reports once the job ends or the late peer made ``late_reports`` reports."""
    late_at = len(nodes) - 1
    peers = [
        TrainingPeer(node, spec, Aggregator(node, deadlines=DEADLINES)) for node in nodes[:late_at]
    ]
    for peer in peers[:liars]:
        lie_with(peer, nodes[late_at], lie(peer))
    if slow_honest:
        for node, peer in zip(nodes[liars:], peers[liars:], strict=False):
            answer_slowly(node, peer)
    reports: list[list[RoundReport]] = [[] for _ in nodes]
    in_round_2 = trio.Event()

    def seen(i: int) -> Callable[[RoundReport], None]:
        def take(report: RoundReport) -> None:
            reports[i].append(report)
            if report.round == 1:
                in_round_2.set()

        return take

    async with trio.open_nursery() as nursery:

        async def late() -> None:
            await in_round_2.wait()
            node = nodes[late_at]
            peer = TrainingPeer(
                node, spec, Aggregator(node, deadlines=ALONE), min_round_s=late_min_round_s
            )
            peers.append(peer)
            take = seen(late_at)

            def take_until(report: RoundReport) -> None:
                take(report)
                if len(reports[late_at]) == late_reports:
                    nursery.cancel_scope.cancel()

            await peer.run(take_until)

        for i, peer in enumerate(peers):
            nursery.start_soon(peer.run, seen(i))
        nursery.start_soon(late)
    return peers, reports


def assert_caught_up_with_the_honest(
    peers: list[TrainingPeer], reports: list[list[RoundReport]], *, liars: int
) -> None:
    honest, victim = peers[liars:-1], peers[-1]
    late_rounds = [r.round for r in reports[-1]]
    assert not any(reports[-1][0].groups)  # alone in round 0: the others were ahead
    assert 2 <= late_rounds[1] < ROUNDS  # it took a round the job had reached, not the end
    assert any(r.groups[0] > 1 for r in reports[-1][1:])  # then trained with the others
    for peer in honest:
        np.testing.assert_array_equal(victim.parameters, peer.parameters)


@pytest.mark.parametrize("lie", ["the_last_round_and_a_made_up_model", "a_model_not_its_digest"])
async def test_a_lying_member_does_not_move_a_late_peer_off_the_honest_state(
    tmp_path: Path, lie: str
) -> None:
    async with memory_nodes(tmp_path, 6) as nodes:
        spec = job_for(nodes, f"liar-{lie}", rounds=ROUNDS, epochs=3, secure=False, partition="iid")

        def skip_to_the_end(liar: TrainingPeer) -> Callable[[], Lie]:
            """The job's last round, with a model of its own (and that model's digest)."""
            array = encode_state(made_up(liar, ROUNDS))
            return lambda: (ROUNDS, array, state_digest(spec.job_id, array))

        def wrong_model(liar: TrainingPeer) -> Callable[[], Lie]:
            """What the honest peers claim (its own state's), but another model if asked."""

            def now() -> Lie:
                claim = liar._sync.offered
                return claim.next_round, encode_state(made_up(liar, claim.next_round)), claim.digest

            return now

        liar = skip_to_the_end if lie == "the_last_round_and_a_made_up_model" else wrong_model
        peers, reports = await run_with_a_late_peer(
            nodes, spec, liars=1, lie=liar, slow_honest=lie == "a_model_not_its_digest"
        )
        assert_caught_up_with_the_honest(peers, reports, liars=1)
        if lie == "a_model_not_its_digest":  # asked first, it sent a state that was refused
            assert nodes[-1].stats.rejected[RejectReason.BAD_ARRAY] >= 1


async def test_colluders_beyond_the_bound_claiming_a_round_past_the_clock_are_ignored(
    tmp_path: Path,
) -> None:
    """Two colluders (collusion 1: a quorum) claim the job's end with one made-up model. The
    late peer knows the job was at round 0 when it started and that no round takes under
    0.1 s: 40 rounds are out of reach for 4 s, so it takes the honest state (the test ends
    there: once the job is old enough the clock no longer rules the claim out; SPEC says
    so)."""
    rounds = 40
    async with memory_nodes(tmp_path, 7) as nodes:
        spec = job_for(nodes, "clock", rounds=rounds, epochs=3, secure=False, partition="iid")
        fake: list[npt.NDArray[np.uint8]] = []

        def collude(liar: TrainingPeer) -> Callable[[], Lie]:
            if not fake:
                fake.append(encode_state(made_up(liar, rounds)))
            digest = state_digest(spec.job_id, fake[0])
            return lambda: (rounds, fake[0], digest)

        _, reports = await run_with_a_late_peer(
            nodes, spec, liars=2, lie=collude, late_min_round_s=0.1, late_reports=2
        )
        assert not any(reports[-1][0].groups)  # alone in round 0: the others were ahead
        caught_up = reports[-1][1]
        assert 2 <= caught_up.round < rounds
        honest = {r.round: r.model_digest for r in reports[2]}
        assert caught_up.model_digest == honest[caught_up.round]
