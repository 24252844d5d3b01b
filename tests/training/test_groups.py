"""Moshpit grid groups: the exact global mean after d averaging steps."""

from __future__ import annotations

import math
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from meshfed import NodeConfig, open_node
from meshfed.averaging.groups import (
    Placement,
    check_secure_grid,
    grid_shape,
    group_sizes,
    secure_group,
)
from meshfed.errors import ConfigError, RequestFailed
from meshfed.identity import Identity
from meshfed.secagg.driver import Aggregator, DeadlinePolicy
from meshfed.secagg.keys import context_digest
from meshfed.secagg.messages import AdvertiseKeys
from meshfed.training.job import TrainingPeer
from meshfed.training.spec import AveragingSpec, DataSpec, JobSpec
from meshfed.transports.memory import MemoryNetwork
from meshfed.wire import Scope


@given(st.integers(1, 5000), st.integers(2, 64))
def test_the_grid_holds_everyone_in_the_fewest_axes_no_longer_than_a_group(
    peers: int, max_group: int
) -> None:
    shape = grid_shape(peers, max_group)
    assert math.prod(shape) >= peers
    assert all(1 <= side <= max_group for side in shape)
    assert len(shape) == 1 or max_group ** (len(shape) - 1) < peers
    assert list(shape) == sorted(shape, reverse=True)  # step 0 averages in the largest groups


@pytest.mark.parametrize(
    ("peers", "max_group", "shape"),
    [
        (200, 8, (8, 5, 5)),  # not 6 x 6 x 6 with 16 empty cells
        (200, 32, (20, 10)),  # not 15 x 14 with 10 empty cells
        (62, 32, (9, 7)),  # one empty cell, rather than groups of two (31 x 2)
        (9, 3, (3, 3)),
        (5, 8, (5,)),
    ],
)
def test_the_grid_prefers_few_empty_cells_and_short_axes(
    peers: int, max_group: int, shape: tuple[int, ...]
) -> None:
    assert grid_shape(peers, max_group) == shape


@given(st.integers(2, 200), st.integers(2, 16), st.integers(0, 10))
def test_each_step_splits_the_roster_into_groups(peers: int, max_group: int, round: int) -> None:
    roster = [Identity.generate().peer_id for _ in range(peers)]
    placement = Placement(roster, job=b"job", round=round, max_group=max_group)
    for step in range(placement.steps):
        groups = {placement.group(peer, step) for peer in roster}
        members = [peer for _, group in groups for peer in group]
        assert sorted(members, key=lambda p: p.raw) == sorted(roster, key=lambda p: p.raw)
        assert all(len(group) <= max_group for _, group in groups)
        assert len({index for index, _ in groups}) == len(groups)


@given(st.integers(1, 300), st.integers(2, 12))
def test_group_sizes_are_the_sizes_of_the_placed_groups(peers: int, max_group: int) -> None:
    roster = [Identity.generate().peer_id for _ in range(peers)]
    placement = Placement(roster, job=b"job", round=1, max_group=max_group)
    sizes = group_sizes(peers, placement.shape)
    for step in range(placement.steps):
        placed = {len(members) for _, members in {placement.group(p, step) for p in roster}}
        assert placed == sizes[step]


@pytest.mark.parametrize(
    ("size", "collusion", "threshold", "resists"),
    [
        (2, 1, 2, 0),  # a pair of aggregates: a peer with its own model sits it out
        (3, 1, 3, 1),  # every member must survive
        (4, 1, 3, 1),
        (5, 1, 3, 1),
        (8, 1, 5, 1),
        (3, 2, 2, 0),
        (4, 2, 4, 2),
        (5, 2, 4, 2),
        (9, 3, 5, 3),
    ],
)
def test_a_secure_group_keeps_two_honest_inputs_in_every_sum_it_reveals(
    size: int, collusion: int, threshold: int, resists: int
) -> None:
    assert secure_group(size, collusion) == {"threshold": threshold, "collusion": resists}
    assert threshold - resists >= 2


@pytest.mark.parametrize(
    ("peers", "max_group", "collusion", "refused"),
    [
        (2, 32, 1, "a job of 4 peers or more"),
        (3, 32, 1, "groups of 4 or more"),
        (4, 32, 1, None),
        (4, 32, 2, "groups of 5 or more"),
        (9, 3, 1, "max_group 9 or more"),  # 3 x 3
        (8, 4, 1, None),  # 4 x 2: pairs of aggregates at step 1
        (16, 4, 1, None),
        (25, 5, 2, None),  # 5 x 5
        (15, 5, 2, "later averaging steps would form groups of 3"),  # 5 x 3
        (30, 6, 3, None),  # 6 x 5: later groups of 5 = c + 2 take own models safely
        (4, 32, 0, "collusion must be >= 1"),
    ],
)
def test_a_secure_job_is_refused_when_its_groups_are_too_small_for_the_collusion_bound(
    peers: int, max_group: int, collusion: int, refused: str | None
) -> None:
    roster = tuple(str(Identity.generate().peer_id) for _ in range(peers))
    averaging = AveragingSpec(max_group=max_group, collusion=collusion)
    if refused is None:
        check_secure_grid(peers, max_group, collusion)
        JobSpec(job_id="j", roster=roster, averaging=averaging)
        return
    with pytest.raises(ConfigError, match=refused):
        JobSpec(job_id="j", roster=roster, averaging=averaging)
    JobSpec(job_id="j", roster=roster, averaging=replace(averaging, secure=False))


def test_groups_change_from_round_to_round() -> None:
    roster = [Identity.generate().peer_id for _ in range(16)]
    first = Placement(roster, job=b"job", round=0, max_group=4).group(roster[0], 0)[1]
    later = [Placement(roster, job=b"job", round=r, max_group=4).group(roster[0], 0)[1]
             for r in range(1, 6)]  # fmt: skip
    assert any(set(group) != set(first) for group in later)


@pytest.mark.parametrize("secure", [False, True])
async def test_after_d_steps_every_peer_holds_the_exact_global_weighted_mean(
    tmp_path: Path, secure: bool
) -> None:
    network = MemoryNetwork(seed=4)
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_node(
                    NodeConfig(
                        data_dir=tmp_path / f"n{i}",
                        transport="memory",
                        ping_interval_s=0,
                        membership=False,
                        mdns=False,
                    ),
                    network=network,
                )
            )
            for i in range(8)
        ]
        spec = JobSpec(
            job_id="grid",
            roster=tuple(str(n.peer_id) for n in nodes),
            # a full 4 x 2 grid: groups of 4, then pairs of their means
            averaging=AveragingSpec(max_group=4, secure=secure),
            data=DataSpec(partition="iid"),
        )
        quick = DeadlinePolicy(join_s=1.0, phase_max_s=20.0)
        peers = [TrainingPeer(node, spec, Aggregator(node, deadlines=quick)) for node in nodes]
        rng = np.random.default_rng(5)
        params = [rng.uniform(-2, 2, 3001).astype(np.float32) for _ in peers]
        for peer in peers:
            peer.weight = float(rng.uniform(0.2, 1.0))
        results: dict[int, tuple[np.ndarray, list[int]]] = {}

        async def one(i: int) -> None:
            results[i] = await peers[i].average(params[i], 0)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
    weights = np.array([peer.weight for peer in peers])
    expected = np.average(np.stack(params), axis=0, weights=weights)
    # secure: a step's means of w x and of w are each off by at most one quantization level,
    # so x = mean(w x) / mean(w) by at most level (1 + |x|) / mean(w); two steps
    level = 2 * spec.averaging.clip / (2**spec.averaging.levels_bits - 1)
    tolerance = 2 * level * (1 + 2) / 0.2 if secure else 1e-5
    for average, sizes in results.values():
        assert sizes == [4, 2]
        assert np.max(np.abs(average - expected)) <= tolerance


async def test_a_member_with_a_low_order_key_costs_the_others_nothing_but_its_model(
    tmp_path: Path,
) -> None:
    """Issue 11, finding 6, in a job: the offender's keys are refused at the door, and the
    four honest peers average among themselves (the job goes on: nothing raises)."""
    network = MemoryNetwork(seed=6)
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_node(
                    NodeConfig(
                        data_dir=tmp_path / f"n{i}",
                        transport="memory",
                        ping_interval_s=0,
                        membership=False,
                        mdns=False,
                    ),
                    network=network,
                )
            )
            for i in range(5)
        ]
        *honest, offender = nodes
        spec = JobSpec(
            job_id="offended",
            roster=tuple(str(n.peer_id) for n in nodes),
            data=DataSpec(partition="iid"),
        )
        quick = DeadlinePolicy(join_s=1.0, phase_max_s=20.0)
        peers = [TrainingPeer(node, spec, Aggregator(node, deadlines=quick)) for node in honest]
        rng = np.random.default_rng(6)
        params = [rng.uniform(-2, 2, 1001).astype(np.float32) for _ in peers]
        for peer in peers:
            peer.weight = 1.0
        results: dict[int, tuple[np.ndarray, list[int]]] = {}
        context = context_digest(job=b"offended", round=0, group=0,
                                 roster=[n.peer_id for n in nodes])  # fmt: skip
        refused: list[str] = []

        async def one(i: int) -> None:
            results[i] = await peers[i].average(params[i], 0)

        async def attack() -> None:
            await trio.sleep(0.1)
            bad = AdvertiseKeys(context=context, cipher_key=bytes(32), mask_key=bytes(32))
            for node in honest:
                try:
                    await offender.send(node.peer_id, bad, scope=Scope(b"offended", 0))
                except RequestFailed as exc:
                    refused.append(exc.reason)

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
            nursery.start_soon(attack)
    expected = np.mean(np.stack(params), axis=0)
    level = 2 * spec.averaging.clip / (2**spec.averaging.levels_bits - 1)
    for average, sizes in results.values():
        assert sizes == [4]
        assert np.max(np.abs(average - expected)) <= 2 * level * (1 + 2)
    assert refused == ["bad_field"] * 4
