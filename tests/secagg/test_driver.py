"""Group sums over real nodes: the memory transport, and libp2p on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio

from meshfed import Node, NodeConfig, open_node
from meshfed.errors import ConfigError
from meshfed.identity import Identity
from meshfed.secagg.driver import AggregationFailed, Aggregator, DeadlinePolicy, GroupResult
from meshfed.secagg.protocol import AbortReason, GroupSpec
from meshfed.secagg.ring import Quantizer
from meshfed.stats import RejectReason
from meshfed.transports.memory import MemoryNetwork

QUICK = DeadlinePolicy(join_s=0.5, grace_s=0.2, phase_max_s=10.0)
QUANTIZER = Quantizer(clip=4.0, levels_bits=16, ring_bits=32)


@asynccontextmanager
async def nodes(tmp_path: Path, n: int, transport: str = "memory") -> AsyncIterator[list[Node]]:
    network = MemoryNetwork(seed=2, latency=0.0005)
    async with AsyncExitStack() as stack:
        started = []
        for i in range(n):
            config = NodeConfig(
                data_dir=tmp_path / f"n{i}",
                transport=transport,  # type: ignore[arg-type]
                listen=["/ip4/127.0.0.1/tcp/0"],
                ping_interval_s=0,
                membership=False,
                mdns=False,
            )
            started.append(await stack.enter_async_context(open_node(config, network=network)))
        if transport == "libp2p":
            for a in started:
                for b in started:
                    if a is not b:
                        await a.connect(b.listen_addrs[0])
        yield started


def vectors(n: int, length: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.uniform(-1, 1, length).astype(np.float32) for _ in range(n)]


def spec_for(group: list[Node], **options: object) -> GroupSpec:
    fields: dict[str, object] = {"job": b"job-7", "round": 1, "group": 0, "threshold": 3}
    fields.update(options)
    return GroupSpec(roster=tuple(n.peer_id for n in group), **fields)  # type: ignore[arg-type]


async def run_all(
    group: list[Node], values: list[np.ndarray], spec: GroupSpec, *, delays: list[float]
) -> dict[int, GroupResult | AggregationFailed]:
    results: dict[int, GroupResult | AggregationFailed] = {}

    async def one(i: int, aggregator: Aggregator) -> None:
        await trio.sleep(delays[i])
        try:
            rng = np.random.default_rng(i)
            results[i] = await aggregator.secure_mean(spec, values[i], QUANTIZER, rng=rng)
        except AggregationFailed as exc:
            results[i] = exc

    aggregators = [Aggregator(node, deadlines=QUICK) for node in group]
    async with trio.open_nursery() as nursery:
        for i, aggregator in enumerate(aggregators):
            if delays[i] >= 0:
                nursery.start_soon(one, i, aggregator)
    return results


def quantization_bound(count: int) -> float:
    """Each value is off by at most one level; the mean of ``count`` by at most that."""
    return 2 * QUANTIZER.clip / QUANTIZER.top


async def test_every_peer_gets_the_secure_mean_even_when_they_start_apart(tmp_path: Path) -> None:
    async with nodes(tmp_path, 5) as group:
        values = vectors(5, 10_001)
        results = await run_all(group, values, spec_for(group), delays=[0, 0.3, 0, 0.1, 0.2])
        expected = np.mean(values, axis=0)
        for result in results.values():
            assert isinstance(result, GroupResult)
            assert len(result.survivors) == 5 and result.attempts == 1
            assert np.max(np.abs(result.value - expected)) <= quantization_bound(5)
        assert all(not node.stats.rejected for node in group)


async def test_a_peer_that_never_shows_up_is_left_out(tmp_path: Path) -> None:
    async with nodes(tmp_path, 5) as group:
        values = vectors(5, 2_000)
        results = await run_all(group, values, spec_for(group), delays=[0, 0, 0, 0, -1])
        expected = np.mean(values[:4], axis=0)
        assert set(results) == {0, 1, 2, 3}
        for result in results.values():
            assert isinstance(result, GroupResult)
            assert result.survivors == tuple(n.peer_id for n in group[:4])
            assert np.max(np.abs(result.value - expected)) <= quantization_bound(4)


async def test_too_few_peers_fail_with_a_reason(tmp_path: Path) -> None:
    async with nodes(tmp_path, 5) as group:
        values = vectors(5, 100)
        spec = spec_for(group, threshold=4)
        results = await run_all(group, values, spec, delays=[0, 0, 0, -1, -1])
        for result in results.values():
            assert isinstance(result, AggregationFailed)
            assert result.reason is AbortReason.TOO_FEW


async def test_plain_butterfly_mean_is_exact(tmp_path: Path) -> None:
    async with nodes(tmp_path, 4) as group:
        values = vectors(4, 1_003)
        roster = tuple(n.peer_id for n in group)
        results: dict[int, GroupResult] = {}

        async def one(i: int, aggregator: Aggregator) -> None:
            results[i] = await aggregator.plain_mean(
                values[i], job=b"j", round=2, group=1, roster=roster
            )

        async with trio.open_nursery() as nursery:
            for i, node in enumerate(group):
                nursery.start_soon(one, i, Aggregator(node, deadlines=QUICK))
        for result in results.values():
            np.testing.assert_allclose(result.value, np.mean(values, axis=0), atol=1e-6)


async def test_a_plain_butterfly_goes_on_without_a_member_that_never_came(tmp_path: Path) -> None:
    """A dead member costs the butterfly one input-phase deadline: the others re-run the group
    among themselves and all get the exact mean of their vectors; one presumed absent costs
    only the probe."""
    async with nodes(tmp_path, 5) as group:
        values = vectors(4, 1_003)
        roster = tuple(n.peer_id for n in group)  # the fifth never takes part
        results: dict[int, GroupResult] = {}

        async def one(i: int, aggregator: Aggregator, absent: int) -> None:
            results[i] = await aggregator.plain_mean(
                values[i], job=b"j", round=absent, group=1, roster=roster, absent=absent
            )

        for absent, longest in ((0, QUICK.join_s + 5.0), (1, QUICK.join_s)):
            results.clear()
            began = trio.current_time()
            async with trio.open_nursery() as nursery:
                for i, node in enumerate(group[:4]):
                    aggregator = Aggregator(node, deadlines=QUICK, job=b"j", replace=True)
                    nursery.start_soon(one, i, aggregator, absent)
            assert trio.current_time() - began < longest
            for result in results.values():
                assert result.survivors == roster[:4] and result.attempts == 2
                np.testing.assert_allclose(result.value, np.mean(values, axis=0), atol=1e-6)


async def test_arrays_early_for_a_run_are_kept_within_limits_and_bad_ones_rejected(
    tmp_path: Path,
) -> None:
    async with nodes(tmp_path, 2) as (a, b):
        Aggregator(b, max_pending_bytes=100)
        early = "secagg.input:" + "00" * 32
        await a.send_array(b.peer_id, np.zeros(16, np.uint32), name=early)  # kept: 64 bytes
        with pytest.raises(Exception):  # noqa: B017 - the stream ends without acknowledgement
            await a.send_array(b.peer_id, np.zeros(16, np.uint32), name=early)  # over 100 bytes
        with pytest.raises(Exception):  # noqa: B017
            await a.send_array(b.peer_id, np.zeros(4, np.uint32), name="secagg.input:zz")
        assert b.stats.rejected[RejectReason.RATE_LIMITED] == 1
        assert b.stats.rejected[RejectReason.BAD_FIELD] == 1


async def test_secure_mean_over_libp2p(tmp_path: Path) -> None:
    async with nodes(tmp_path, 4, transport="libp2p") as group:
        values = vectors(4, 100_000)
        results = await run_all(group, values, spec_for(group), delays=[0, 0, 0, 0])
        for result in results.values():
            assert isinstance(result, GroupResult)
            assert np.max(np.abs(result.value - np.mean(values, axis=0))) <= quantization_bound(4)


async def test_eight_bit_mode_sums_in_the_16_bit_ring(tmp_path: Path) -> None:
    quantizer = Quantizer(clip=1.0, levels_bits=8, ring_bits=16)
    async with nodes(tmp_path, 4) as group:
        values = vectors(4, 5_000)
        spec = spec_for(group, ring_bits=16)
        results: dict[int, GroupResult] = {}

        async def one(i: int) -> None:
            aggregator = Aggregator(group[i], deadlines=QUICK)
            rng = np.random.default_rng(i)
            results[i] = await aggregator.secure_mean(spec, values[i], quantizer, rng=rng)

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
        for result in results.values():
            error = np.max(np.abs(result.value - np.mean(values, axis=0)))
            assert error <= 2 * quantizer.clip / quantizer.top


async def test_a_group_too_large_for_the_ring_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    quantizer = Quantizer(clip=1.0, levels_bits=12, ring_bits=16)  # 20 x 4095 > 2^16
    async with nodes(tmp_path, 2) as group:
        strangers = tuple(Identity.generate().peer_id for _ in range(18))
        roster = tuple(n.peer_id for n in group) + strangers
        spec = GroupSpec(job=b"j", round=0, group=0, roster=roster, threshold=11, ring_bits=16)
        with pytest.raises(ValueError, match="does not fit"):
            await Aggregator(group[0]).secure_mean(
                spec, np.zeros(200, np.float32), quantizer, rng=np.random.default_rng(0)
            )
        assert group[0].stats.bytes_out == 0


def test_deadlines_adapt_to_arrivals_and_do_not_wait_long_for_a_lost_majority() -> None:
    policy = DeadlinePolicy(join_s=3.0, grace_s=0.5, slack=2.0, phase_max_s=60.0)
    # nothing yet: the longest wait
    assert policy.deadline(started=0.0, majority_at=None, first=False) == 60.0
    # most answers in after 2 s: the rest get twice as long
    assert policy.deadline(started=0.0, majority_at=2.0, last_at=2.0, first=False) == 6.0
    # ... but never less than the floor
    assert policy.deadline(started=0.0, majority_at=0.1, first=False) == 0.6
    assert policy.deadline(started=0.0, majority_at=0.1, first=True) == 3.1
    # answers stopped before a majority (most of the group is dead or elsewhere)
    assert policy.deadline(started=0.0, majority_at=None, last_at=1.0, first=False) == 4.0
    assert policy.deadline(started=0.0, majority_at=None, last_at=10.0, first=False) == 30.0
    assert policy.deadline(started=0.0, majority_at=None, last_at=40.0, first=False) == 60.0


async def test_the_library_refuses_groups_in_which_one_member_could_read_another(
    tmp_path: Path,
) -> None:
    async with nodes(tmp_path, 3) as group:
        roster = tuple(n.peer_id for n in group)
        # a pair: each would read the other's vector (the sum minus its own)
        with pytest.raises(ConfigError, match="groups of 4 or more"):
            GroupSpec(job=b"j", round=0, group=0, roster=roster[:2], threshold=2)
        # three with threshold 2: one member declaring a second dropped reads the third
        with pytest.raises(ConfigError, match="at least collusion \\+ 2 = 3"):
            GroupSpec(job=b"j", round=0, group=0, roster=roster, threshold=2)
        # three that must all finish: one absent, and nobody learns anything
        spec = GroupSpec(job=b"j", round=0, group=0, roster=roster, threshold=3)
        values = vectors(3, 100)
        results = await run_all(group, values, spec, delays=[0, 0, -1])
        for result in results.values():
            assert isinstance(result, AggregationFailed)
            assert result.reason is AbortReason.TOO_FEW


async def test_values_beyond_clip_are_clipped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    quantizer = Quantizer(clip=1.0, levels_bits=16, ring_bits=32)
    async with nodes(tmp_path, 4) as group:
        spec = spec_for(group)
        beyond = np.array([3.0, 6.0, 9.0, 0.5, -4.0, 0.0], np.float32)  # four beyond clip 1
        values = [beyond + np.float32(0.01 * i) for i in range(4)]
        values[0][:] = 0.25  # inside: nothing to report
        results: dict[int, GroupResult] = {}

        async def one(i: int) -> None:
            aggregator = Aggregator(group[i], deadlines=QUICK)
            rng = np.random.default_rng(i)
            results[i] = await aggregator.secure_mean(spec, values[i], quantizer, rng=rng)

        with caplog.at_level("WARNING", logger="meshfed.secagg.driver"):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(one, i)
    assert [results[i].clipped for i in range(4)] == [0, 4, 4, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["4 of 6 values beyond the quantizer's clip 1 were clipped to it"] * 3
    expected = np.mean(np.clip(values, -1, 1), axis=0)
    for result in results.values():
        assert np.max(np.abs(result.value - expected)) <= 2 * quantizer.clip / quantizer.top
