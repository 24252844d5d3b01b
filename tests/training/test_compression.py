"""Codecs: bounded error, unbiased 8-bit rounding, top-k with error feedback, strict decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshfed import Node
from meshfed.averaging.butterfly import ButterflySession
from meshfed.averaging.compression import (
    Codec,
    ErrorFeedback,
    Float16,
    Float32,
    Int8,
    TopK,
    codec_named,
)
from meshfed.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from meshfed.identity import Identity
from meshfed.secagg.driver import Aggregator, DeadlinePolicy, GroupResult
from meshfed.secagg.protocol import SliceKind
from meshfed.stats import RejectReason
from meshfed.training.job import TrainingPeer
from meshfed.training.spec import AveragingSpec, JobSpec
from tests.training.nodes import job_for, memory_nodes, peers_for, run_together

vectors = hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e4, 1e4, width=32))
seeds = st.integers(0, 2**32 - 1)


@given(vectors, seeds)
def test_fp16_comes_back_within_its_bound(values: np.ndarray, seed: int) -> None:
    codec = Float16()
    payload = codec.encode(values, np.random.default_rng(seed))
    assert payload.dtype.str == "<f2" and payload.nbytes == 2 * len(values)
    back = codec.decode(payload, len(values))
    assert back.dtype == np.float32
    assert np.all(np.abs(back - values) <= Float16.bound(values))


def test_fp16_saturates_at_its_range() -> None:
    values = np.array([1e6, -1e9, 3.0], np.float32)
    back = Float16().decode(Float16().encode(values, np.random.default_rng(0)), 3)
    assert back.tolist() == [65504.0, -65504.0, 3.0]


@given(vectors, st.sampled_from([1, 7, 64, 1024]), seeds)
def test_int8_comes_back_within_one_step_of_its_chunk(
    values: np.ndarray, chunk: int, seed: int
) -> None:
    codec = Int8(chunk)
    payload = codec.encode(values, np.random.default_rng(seed))
    assert payload.dtype == np.uint8 and len(payload) == codec.payload_bytes(len(values))
    back = codec.decode(payload, len(values))
    assert np.all(np.abs(back - values) <= codec.bound(values))


@given(st.integers(0, 2**32 - 1))
def test_int8_rounding_is_unbiased(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 1, 256).astype(np.float32)
    codec = Int8(64)
    trials = 400
    mean = np.mean([codec.decode(codec.encode(values, rng), 256) for _ in range(trials)], axis=0)
    step = codec.bound(values)
    # each trial's error is within one step with mean 0: its average shrinks like 1/sqrt(trials)
    assert np.all(np.abs(mean - values) <= 5 * step / np.sqrt(trials))
    assert not np.all(np.abs(mean - values) <= 1e-6)  # it does round


@given(vectors, st.floats(0.001, 1.0), st.booleans(), st.integers(0, 3), seeds)
def test_topk_keeps_the_largest_entries_and_the_tail(
    values: np.ndarray, ratio: float, half: bool, tail: int, seed: int
) -> None:
    codec = TopK(ratio, half=half, tail=tail)
    payload = codec.encode(values, np.random.default_rng(seed))
    assert len(payload) == codec.payload_bytes(len(values))
    indices, sent = codec.sparse(payload, len(values))
    k, head = codec.k(len(values)), max(0, len(values) - tail)
    assert len(indices) == k and set(range(head, len(values))) <= set(indices.tolist())
    chosen = indices[indices < head]
    left_out = np.setdiff1d(np.arange(head), chosen)
    if len(chosen) and len(left_out):
        assert np.abs(values[chosen]).min() >= np.abs(values[left_out]).max()
    expected = values[indices].astype(np.float16 if half else np.float32).astype(np.float32)
    assert np.array_equal(sent, expected)
    dense = codec.decode(payload, len(values))
    assert np.count_nonzero(dense[left_out]) == 0


@given(st.integers(2, 200), st.integers(1, 12), st.floats(0.01, 0.5), seeds)
def test_error_feedback_loses_nothing_over_rounds(
    size: int, rounds: int, ratio: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    feedback = ErrorFeedback(TopK(ratio, tail=1), size)
    inputs = np.zeros(size, np.float64)
    sent = np.zeros(size, np.float64)
    for _ in range(rounds):
        delta = rng.normal(0, 1, size).astype(np.float32)
        inputs += delta
        sent += feedback.decode(feedback.encode(delta, rng), size)
    # what was sent plus what is carried is what came in (the tail is sent whole every round)
    np.testing.assert_allclose(sent + feedback.residual, inputs, atol=1e-4 * rounds)
    assert feedback.residual[-1] == 0


def test_a_failed_run_leaves_everything_in_the_residual() -> None:
    rng = np.random.default_rng(1)
    feedback = ErrorFeedback(TopK(0.25, tail=1), 9)
    feedback.encode(rng.normal(0, 1, 9).astype(np.float32), rng)
    before = feedback.residual
    delta = rng.normal(0, 1, 9).astype(np.float32)
    feedback.encode(delta, rng)
    feedback.rewind(before, delta)
    np.testing.assert_allclose(feedback.residual[:-1], before[:-1] + delta[:-1], rtol=1e-6)
    assert feedback.residual[-1] == 0


@pytest.mark.parametrize("codec", [Float16(), Int8(16), TopK(0.5)])
def test_encoding_refuses_non_finite_input(codec: Codec) -> None:
    with pytest.raises(LocalProtocolError, match="NaN"):
        codec.encode(np.array([1.0, np.nan, 2.0], np.float32), np.random.default_rng(0))


def _bad(codec: Codec, payload: np.ndarray, size: int) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        codec.decode(payload, size)
    assert caught.value.reason is RejectReason.BAD_ARRAY


def test_malformed_payloads_are_rejected() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(0, 1, 40).astype(np.float32)
    _bad(Float32(), values.astype(np.float64), 40)
    _bad(Float32(), values[:39], 40)
    _bad(Float16(), values, 40)  # float32 where fp16 was due
    _bad(Float16(), np.full(40, np.inf, np.float16), 40)
    int8 = Int8(16)
    good = int8.encode(values, rng)
    _bad(int8, good[:-1], 40)
    for scale in (np.nan, np.inf, -1.0):
        broken = good.copy()
        broken[4:8].view("<f4")[0] = scale  # the first chunk's step
        _bad(int8, broken, 40)
    topk = TopK(0.25)
    good = topk.encode(values, rng)
    k = topk.k(40)
    _bad(topk, good[:-1], 40)
    out_of_range = good.copy()
    out_of_range[: 4 * k].view("<u4")[-1] = 40
    _bad(topk, out_of_range, 40)
    repeated = good.copy()
    repeated[: 4 * k].view("<u4")[1] = repeated[: 4 * k].view("<u4")[0]
    _bad(topk, repeated, 40)
    not_finite = good.copy()
    not_finite[4 * k :].view("<f4")[0] = np.nan
    _bad(topk, not_finite, 40)


def test_jobs_name_their_codec() -> None:
    assert isinstance(codec_named("int8"), Int8)
    assert codec_named("topk", topk_ratio=0.1) == TopK(0.1, tail=1)
    assert codec_named("fp16").name != codec_named("int8").name != codec_named("none").name
    with pytest.raises(ValueError, match="compression"):
        codec_named("zip")


# -- over the memory transport --------------------------------------------------------------------

QUICK = DeadlinePolicy(join_s=0.5, grace_s=0.2, phase_max_s=10.0)


async def group_means(
    group: list[Node],
    values: list[np.ndarray],
    codec: Codec,
    *,
    gather: bool = False,
    aggregators: list[Aggregator] | None = None,
) -> dict[int, GroupResult]:
    roster = tuple(n.peer_id for n in group)
    results: dict[int, GroupResult] = {}

    async def one(i: int, aggregator: Aggregator) -> None:
        mean = aggregator.gather_mean if gather else aggregator.plain_mean
        results[i] = await mean(
            values[i], job=b"j", round=3, group=0, roster=roster, compression=codec,
            rng=np.random.default_rng(i),
        )  # fmt: skip

    aggregators = aggregators or [Aggregator(node, deadlines=QUICK) for node in group]
    async with trio.open_nursery() as nursery:
        for i, aggregator in enumerate(aggregators):
            nursery.start_soon(one, i, aggregator)
    return results


@pytest.mark.parametrize("codec", [Float16(), Int8(64)])
async def test_compressed_butterfly_gives_every_peer_the_same_mean_within_the_bound(
    tmp_path: Path, codec: Float16 | Int8
) -> None:
    async with memory_nodes(tmp_path, 4, seed=5, latency=0.0005) as group:
        rng = np.random.default_rng(3)
        values = [rng.normal(0, 1, 1_001).astype(np.float32) for _ in group]
        results = await group_means(group, values, codec)
        exact = np.mean(values, axis=0)
        # each input slice is off by its bound, then the slice sum once more (its own bound)
        inputs_bound = np.mean([codec.bound(v) for v in values], axis=0)
        sum_bound = codec.bound((exact * len(group)).astype(np.float32)) / len(group)
        first = results[0].value
        for result in results.values():
            np.testing.assert_array_equal(result.value, first)
        assert np.all(np.abs(first - exact) <= inputs_bound + sum_bound + 1e-6)
        assert not np.array_equal(first, exact)  # it did compress
        assert all(not node.stats.rejected for node in group)


async def test_topk_gather_mean_is_the_same_everywhere(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 3, seed=5, latency=0.0005) as group:
        rng = np.random.default_rng(4)
        values = [rng.normal(0, 1, 500).astype(np.float32) for _ in group]
        codec = TopK(0.1, tail=1)
        results = await group_means(group, values, codec, gather=True)
        expected = np.mean([codec.decode(codec.encode(v, rng), 500) for v in values], axis=0)
        for result in results.values():
            np.testing.assert_array_equal(result.value, results[0].value)
        np.testing.assert_allclose(results[0].value, expected, atol=1e-6)


async def test_malformed_compressed_slices_are_rejected_and_counted(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 3, seed=5, latency=0.0005) as group:
        a, b, _ = group
        roster = tuple(n.peer_id for n in group)
        codec = Int8(64)
        values = [np.full(300, i, np.float32) for i in range(3)]
        context = ButterflySession(
            job=b"j", round=3, group=0, roster=roster, me=b.peer_id, values=values[1],
            codec=codec, rng=np.random.default_rng(0),
        ).context  # fmt: skip
        name = f"{SliceKind.PLAIN_INPUT}:{context.hex()}"
        aggregators = [Aggregator(node, deadlines=QUICK) for node in group]
        # a's slice for b (owner of slice 1, 100 elements) as float32: kept until b's run starts
        await a.send_array(b.peer_id, np.zeros(100, np.float32), name=name)
        results = await group_means(group, values, codec, aggregators=aggregators)
        assert b.stats.rejected[RejectReason.BAD_ARRAY] == 1
        for result in results.values():  # a's real slice came after, and counted
            np.testing.assert_allclose(result.value, np.full(300, 1.0), atol=1e-5)


def test_topk_cannot_travel_by_butterfly() -> None:
    peers = [Identity.generate().peer_id for _ in range(2)]
    with pytest.raises(ValueError, match="all-gather"):
        ButterflySession(
            job=b"j", round=0, group=0, roster=tuple(peers), me=peers[0],
            values=np.zeros(4, np.float32), codec=TopK(0.5), rng=np.random.default_rng(0),
        )  # fmt: skip


# -- in a training job ----------------------------------------------------------------------------


async def train(tmp_path: Path, secure: bool, compression: str, rounds: int) -> list[TrainingPeer]:
    async with memory_nodes(
        tmp_path / f"{secure}-{compression}", 8, seed=5, latency=0.0005
    ) as nodes:
        spec = job_for(
            nodes,
            f"digits-{secure}-{compression}",
            rounds=rounds,
            secure=secure,
            compression=compression,
            clip=0.25 if secure and compression == "int8" else 8.0,  # int8 secure: the update
            topk_ratio=0.05,
        )
        peers = peers_for(nodes, spec, deadlines=QUICK)
        await run_together(peers)
        for peer in peers[1:]:
            np.testing.assert_array_equal(peer.parameters, peers[0].parameters)
        # nothing an honest peer sent is refused; an answer that came after its run ended on a
        # deadline (a loaded machine) is [late], a matter of timing, not of the compression
        refused = [
            {r: k for r, k in n.stats.rejected.items() if r != RejectReason.LATE} for n in nodes
        ]
        assert not any(refused), refused
        return peers


def accuracy(peers: list[TrainingPeer]) -> float:
    from meshfed.training.torch_adapter import evaluate

    return evaluate(peers[0].model, peers[0].test.x, peers[0].test.y)[1]


@pytest.mark.parametrize(
    ("secure", "compressions", "rounds"),
    [(False, ["fp16", "int8", "topk"], 10), (True, ["int8"], 5)],  # top-k catches up slowly
)
async def test_compressed_jobs_train_about_as_well_as_uncompressed(
    tmp_path: Path, secure: bool, compressions: list[str], rounds: int
) -> None:
    reference = accuracy(await train(tmp_path, secure, "none", rounds))
    assert reference > 0.6
    for compression in compressions:
        peers = await train(tmp_path, secure, compression, rounds)
        assert accuracy(peers) > reference - 0.08, compression
        if compression == "topk":  # what was not sent is carried, per peer
            residuals = [peer._feedback[0].residual for peer in peers]
            assert all(np.abs(r).max() > 0 for r in residuals)


def test_a_job_refuses_compression_it_cannot_run() -> None:
    roster = tuple(str(Identity.generate().peer_id) for _ in range(4))
    for options, match in [
        ({"compression": "zip"}, "compression must be"),
        ({"compression": "topk"}, "secure"),
        ({"compression": "fp16"}, "secure"),
        ({"compression": "topk", "secure": False, "schedule": "moshpit"}, "exact"),
        ({"compression": "int8", "schedule": "moshpit"}, "exact"),
        ({"compression": "int8", "secure": False, "robust": "median"}, "robust"),
        ({"compression": "topk", "secure": False, "topk_ratio": 0.0}, "topk_ratio"),
    ]:
        with pytest.raises(ConfigError, match=match):
            JobSpec.from_document({"job_id": "j", "roster": roster, **options})  # type: ignore[dict-item]
    plain_int8 = JobSpec(
        job_id="j", roster=roster, averaging=AveragingSpec(compression="int8", secure=False)
    )
    assert not plain_int8.averaging.averages_updates and plain_int8.averaging.schedule == "exact"
    assert AveragingSpec(compression="int8", schedule="exact").averages_updates
    assert JobSpec.from_json(plain_int8.to_json()) == plain_int8


def test_testnet_passes_the_compression_on(tmp_path: Path) -> None:
    from tests.test_cli import cli

    out = tmp_path / "sim.json"
    args = ["--simulate", "6", "--rounds", "2", "--plain", "--compression", "topk"]
    result = cli("testnet", *args, "--topk-ratio", "0.1", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads(out.read_text())
    averaging = run["job"]["averaging"]
    assert (averaging["compression"], averaging["topk_ratio"]) == ("topk", 0.1)
    assert run["rounds"][-1]["accuracy_spread"] < 1e-6


def test_compression_benchmark_reports_ratios_against_float32() -> None:
    from tests.test_benchmarks import run

    figures = run("compression.py", "--quick")
    codecs = figures["codecs"]
    assert isinstance(codecs, dict)
    assert codecs["fp16"]["ratio"] == 2.0 and 3.9 < codecs["int8"]["ratio"] < 4.0
    for codec in codecs.values():
        assert codec["cpu_s_per_1m"] > 0 and 0 <= codec["rel_error"] < 1
    training = figures["training"]
    assert isinstance(training, dict)
    assert set(training) == {f"plain_{c}" for c in ("none", "fp16", "int8", "topk")} | {
        "secure_none",
        "secure_int8",
    }
    for mode, figures_of in training.items():
        assert 0 < figures_of["accuracy"] <= 1 and figures_of["bytes_per_peer_round"] > 0, mode
    assert training["plain_int8"]["bytes_ratio"] > 2  # fp32 slices -> bytes, headers aside
    assert training["secure_int8"]["bytes_ratio"] > 1.2  # masks' messages are not compressed
