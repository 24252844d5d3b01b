"""Codecs: bounded error, unbiased 8-bit rounding, top-k with error feedback, strict decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshfed.averaging.compression import (
    Codec,
    ErrorFeedback,
    Float16,
    Identity,
    Int8,
    TopK,
    codec_named,
)
from meshfed.errors import LocalProtocolError, RemoteProtocolError
from meshfed.stats import RejectReason

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


def test_a_failed_run_gives_its_payload_back_to_the_residual() -> None:
    rng = np.random.default_rng(1)
    feedback = ErrorFeedback(TopK(0.25, tail=1), 9)
    delta = rng.normal(0, 1, 9).astype(np.float32)
    payload = feedback.encode(delta, rng)
    feedback.unsent(payload)
    np.testing.assert_allclose(feedback.residual[:-1], delta[:-1], rtol=1e-6)


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
    _bad(Identity(), values.astype(np.float64), 40)
    _bad(Identity(), values[:39], 40)
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
