"""The secure-aggregation protocol core: right sums, dropouts, privacy, and what it rejects."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.errors import RemoteProtocolError
from meshfed.identity import Identity, PeerId
from meshfed.secagg.keys import mask_sign, pair_seed
from meshfed.secagg.messages import (
    AdvertiseKeys,
    RollCall,
    SealedShares,
    ShareKeys,
    SharePart,
    Unmask,
)
from meshfed.secagg.prg import expand_mask
from meshfed.secagg.protocol import (
    Aborted,
    AbortReason,
    Finished,
    GroupSpec,
    Phase,
    SecAggPeer,
    Send,
    SendSlice,
    SliceKind,
    slice_bounds,
)
from meshfed.secagg.shamir import Share, combine
from meshfed.stats import RejectReason

from .simulation import run_once

PEERS = [Identity.generate().peer_id for _ in range(12)]


def least_threshold(size: int, collusion: int = 1) -> int:
    """The smallest threshold a group spec accepts: a majority, and collusion + 2."""
    return max(size // 2 + 1, collusion + 2)


def sparse_neighbours(size: int, threshold: int, collusion: int = 1) -> int:
    """The sparsest masking graph a spec accepts: every survivor keeps an honest neighbour
    after ``collusion`` colluders had ``size - threshold`` others declared dropped."""
    needed = collusion + 1 + size - threshold
    return needed + needed % 2


def make_spec(size: int, threshold: int | None = None, **options: object) -> GroupSpec:
    fields: dict[str, object] = {"job": b"job-1", "round": 3, "group": 0}
    fields.update(options)
    return GroupSpec(
        roster=tuple(PEERS[:size]),
        threshold=threshold or least_threshold(size),
        **fields,  # type: ignore[arg-type]
    )


def random_inputs(spec: GroupSpec, length: int, seed: int, top: int) -> dict[PeerId, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.integers(0, top + 1, length).astype(spec.dtype) for p in spec.roster}


def ring_sum(inputs: dict[PeerId, np.ndarray], peers: tuple[PeerId, ...]) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for peer in peers:
        total += inputs[peer]
    return total


@pytest.mark.parametrize("size", [3, 5, 8, 12])
@pytest.mark.parametrize("sparse", [False, True])
def test_without_dropouts_every_peer_gets_the_exact_sum(size: int, sparse: bool) -> None:
    threshold = least_threshold(size)
    neighbours = sparse_neighbours(size, threshold) if sparse else None
    spec = make_spec(size, neighbours=neighbours)
    inputs = random_inputs(spec, 1000, seed=size, top=2**20)
    trace = run_once(spec, inputs)
    assert not trace.rejected
    for outcome in trace.outcomes.values():
        assert isinstance(outcome, Finished)
        assert outcome.survivors == spec.roster
        assert np.array_equal(outcome.total, ring_sum(inputs, spec.roster))


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(3, 9),
    extra_threshold=st.integers(0, 3),
    length=st.integers(9, 400),
    ring_bits=st.sampled_from([16, 32]),
    sparse=st.booleans(),
    deaths=st.dictionaries(st.integers(0, 8), st.integers(0, 80), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_with_any_dropouts_the_sum_is_exact_or_the_run_aborts_with_a_reason(
    size: int,
    extra_threshold: int,
    length: int,
    ring_bits: int,
    sparse: bool,
    deaths: dict[int, int],
    seed: int,
) -> None:
    threshold = min(size, least_threshold(size) + extra_threshold)
    neighbours = sparse_neighbours(size, threshold) if sparse else None
    spec = make_spec(size, threshold, ring_bits=ring_bits, neighbours=neighbours)
    inputs = random_inputs(spec, length, seed, top=(1 << (ring_bits - 5)) - 1)
    die = {spec.roster[i]: sends for i, sends in deaths.items() if i < size}
    # Each death can spoil at most the attempt it happens in.
    trace = run_once(spec, inputs, die_after_sends=die, max_attempts=len(die) + 1)
    # Only stragglers' messages for phases or attempts already over are refused.
    assert {reason for *_, reason in trace.rejected} <= {str(RejectReason.LATE)}
    alive = [peer for peer in spec.roster if peer not in trace.dead]
    assert set(trace.outcomes) == set(alive)
    for outcome in trace.outcomes.values():
        if isinstance(outcome, Finished):
            assert len(outcome.survivors) >= threshold
            assert np.array_equal(outcome.total, ring_sum(inputs, outcome.survivors))
        else:
            assert isinstance(outcome, Aborted) and outcome.detail
    # Deaths before the consistency check never cost the sum while enough peers live (a death
    # in the middle of it may leave a minority that revealed shares and stays out of re-runs).
    early = all(phase < Phase.SURVIVORS for phase in trace.dead.values())
    if early and len(alive) >= threshold:
        assert all(isinstance(o, Finished) for o in trace.outcomes.values())


def test_fewer_than_threshold_survivors_abort_with_too_few() -> None:
    spec = make_spec(5, threshold=4)
    inputs = random_inputs(spec, 50, seed=1, top=100)
    trace = run_once(spec, inputs, die_after_sends={PEERS[0]: 0, PEERS[1]: 0}, max_attempts=3)
    assert len(trace.dead) == 2
    for outcome in trace.outcomes.values():
        assert isinstance(outcome, Aborted) and outcome.reason is AbortReason.TOO_FEW


def test_an_owner_lost_after_receiving_slices_means_a_rerun_without_it() -> None:
    spec = make_spec(6)
    inputs = random_inputs(spec, 600, seed=2, top=1000)
    victim = PEERS[2]
    # 5 keys + 5 shares + 5 roll calls + 5 input slices: the victim dies right after sending its
    # input, holding everyone's slice 2.
    trace = run_once(spec, inputs, die_after_sends={victim: 20}, max_attempts=3)
    assert set(trace.dead) == {victim}
    for peer, outcome in trace.outcomes.items():
        (abort,) = trace.sessions[peer].aborts
        assert abort.reason is AbortReason.OWNER_LOST and not abort.released
        assert isinstance(outcome, Finished) and victim not in outcome.survivors
        assert np.array_equal(outcome.total, ring_sum(inputs, outcome.survivors))


def test_a_peer_whose_shares_came_too_late_learns_it_is_left_out_and_does_not_rerun() -> None:
    spec = make_spec(6)
    inputs = random_inputs(spec, 60, seed=3, top=1000)
    straggler = PEERS[4]

    def late(sender: PeerId, receiver: PeerId, action: object) -> bool:
        return (
            sender == straggler
            and isinstance(action, Send)
            and isinstance(action.message, ShareKeys)
        )

    trace = run_once(spec, inputs, hold_back=late, max_attempts=3)
    others = [peer for peer in spec.roster if peer != straggler]
    for peer in others:
        outcome = trace.outcomes[peer]
        assert isinstance(outcome, Finished) and straggler not in outcome.survivors
        assert np.array_equal(outcome.total, ring_sum(inputs, outcome.survivors))
    left_out = trace.outcomes[straggler]
    assert isinstance(left_out, Aborted) and left_out.reason is AbortReason.LEFT_OUT
    assert not trace.sessions[straggler].aborts  # no re-run: the others are not coming


def chi_square_p(values: np.ndarray, bits: int, bins: int = 256) -> float:
    top = values.astype(np.uint64) >> np.uint64(bits - 8)
    counts = np.bincount(top.astype(np.int64), minlength=bins)
    expected = len(values) / bins
    statistic = float(np.sum((counts - expected) ** 2) / expected)
    # Wilson-Hilferty: (X/k)^(1/3) is close to normal for k = 255 degrees of freedom.
    k = bins - 1
    z = ((statistic / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("ring_bits", [16, 32])
def test_every_masked_slice_a_peer_receives_looks_uniform(ring_bits: int) -> None:
    # The worst case for hiding: every input is all zeros.
    spec = make_spec(5, ring_bits=ring_bits)
    inputs = {p: np.zeros(200_000, spec.dtype) for p in spec.roster}
    trace = run_once(spec, inputs)
    slices = [
        action.array
        for _, _, action in trace.delivered
        if isinstance(action, SendSlice) and action.kind is SliceKind.INPUT
    ]
    assert len(slices) == 5 * 4
    p_values = [chi_square_p(array, ring_bits) for array in slices]
    # 20 tests on fresh keys (not seeded): uniform data fails 4 or more of them at 1% with
    # probability ~2e-4, and any one at 1e-6 with ~2e-5; a biased mask fails them all.
    assert sum(p < 0.01 for p in p_values) <= 3 and min(p_values) > 1e-6, p_values
    # And the concatenation of all of them, a much larger sample.
    assert chi_square_p(np.concatenate(slices), ring_bits) > 1e-5


def test_a_peer_dropped_for_lateness_stays_hidden_from_a_curious_owner() -> None:
    """The late peer's slices arrive after the survivors were fixed; the curious owner holds
    every message it saw (the dropped peer's mask key included) and still sees noise."""
    spec = make_spec(5)
    late, curious = PEERS[4], PEERS[0]
    inputs = random_inputs(spec, 50_000, seed=3, top=255)
    inputs[late][:] = 7  # a secret that would be easy to spot

    def hold_back(sender: PeerId, receiver: PeerId, action: object) -> bool:
        return sender == late and isinstance(action, SendSlice) and action.kind == "secagg.input"

    trace = run_once(spec, inputs, hold_back=hold_back)
    outcome = trace.outcomes[curious]
    assert isinstance(outcome, Finished) and late not in outcome.survivors
    assert np.array_equal(outcome.total, ring_sum(inputs, outcome.survivors))
    # The late slice did reach the curious owner, after the fact, and was refused as late.
    assert (late, curious, str(RejectReason.LATE)) in trace.rejected
    (late_slice,) = [
        a.array
        for s, r, a in trace.held_back
        if s == late and r == curious and a.kind == "secagg.input"
    ]
    # What the curious owner can strip off: every pairwise mask of the late peer, rebuilt from
    # the mask-key shares everyone revealed for it.
    seen = [a.message for s, r, a in trace.delivered if r == curious and isinstance(a, Send)]
    unmasks = [m for m in seen if isinstance(m, Unmask)]
    core = trace.sessions[curious].current
    index = {peer: i + 1 for i, peer in enumerate(spec.roster)}
    holders = [s for s, r, a in trace.delivered if r == curious and isinstance(a, Send)]
    holders = [h for h, m in zip(holders, seen, strict=True) if isinstance(m, Unmask)]
    shares = [
        Share(index[h], part.y)
        for h, m in zip(holders, unmasks, strict=True)
        for part in m.mask_keys
        if part.peer == late
    ]
    late_key = X25519PrivateKey.from_private_bytes(combine(shares[: spec.threshold]))
    keys = {m.message.mask_key for s, r, m in _keys_seen(trace, curious) if s != late}
    assert keys  # it saw the others' mask keys
    lo, hi = slice_bounds(50_000, 5, 0)
    stripped = late_slice.copy()
    for peer, mask_key in _mask_keys(trace, curious).items():
        if peer == late:
            continue
        secret = late_key.exchange(X25519PublicKey.from_public_bytes(mask_key))
        seed = pair_seed(secret, context=core.context, a=late, b=peer)
        mask = expand_mask(seed, hi - lo, dtype=spec.dtype, offset=lo)
        stripped -= mask if mask_sign(late, peer) > 0 else -mask
    # Only the self-mask is left: no self-mask share of the late peer was ever revealed.
    assert not any(part.peer == late for m in unmasks for part in m.self_masks)
    assert not np.any(stripped == 7) or np.mean(stripped == 7) < 0.001
    assert chi_square_p(stripped, 32) > 0.001


def _keys_seen(trace, receiver):  # type: ignore[no-untyped-def]
    return [
        (s, r, a)
        for s, r, a in trace.delivered
        if r == receiver and isinstance(a, Send) and isinstance(a.message, AdvertiseKeys)
    ]


def _mask_keys(trace, receiver) -> dict[PeerId, bytes]:  # type: ignore[no-untyped-def]
    return {s: a.message.mask_key for s, _, a in _keys_seen(trace, receiver)}


def first_send(actions: list[object], to: PeerId) -> Send:
    return next(a for a in actions if isinstance(a, Send) and a.to == to)


def test_replayed_cross_run_late_and_stranger_messages_are_rejected_with_reasons() -> None:
    spec = make_spec(4)
    a, b, c, d = spec.roster
    core_a = SecAggPeer(spec, a, np.zeros(10, spec.dtype))
    core_b = SecAggPeer(spec, b, np.zeros(10, spec.dtype))
    core_d = SecAggPeer(spec, d, np.zeros(10, spec.dtype))
    keys_from_a = first_send(core_a.start(), to=b).message
    core_b.start()
    core_b.receive(a, keys_from_a)
    core_b.receive(d, first_send(core_d.start(), to=b).message)

    def reason(sender: PeerId, message: object) -> RejectReason:
        with pytest.raises(RemoteProtocolError) as info:
            core_b.receive(sender, message)  # type: ignore[arg-type]
        return info.value.reason

    assert reason(a, keys_from_a) is RejectReason.DUPLICATE
    other_round = SecAggPeer(make_spec(4, round=4), a, np.zeros(10, spec.dtype))
    assert reason(c, first_send(other_round.start(), to=b).message) is RejectReason.WRONG_CONTEXT
    retry = SecAggPeer(make_spec(4, attempt=1), a, np.zeros(10, spec.dtype))
    assert reason(c, first_send(retry.start(), to=b).message) is RejectReason.WRONG_CONTEXT
    assert reason(PEERS[5], keys_from_a) is RejectReason.NOT_A_MEMBER
    # b gives up waiting for c's keys; c's keys then come too late.
    core_c = SecAggPeer(spec, c, np.zeros(10, spec.dtype))
    keys_from_c = first_send(core_c.start(), to=b).message
    core_b.expire()
    assert core_b.phase is Phase.SHARES
    assert reason(c, keys_from_c) is RejectReason.LATE


def test_forged_or_contradicting_messages_are_rejected() -> None:
    spec = make_spec(3)
    a, b, c = spec.roster
    cores = {p: SecAggPeer(spec, p, np.zeros(10, spec.dtype)) for p in spec.roster}
    adverts = {p: first_send(cores[p].start(), to=b).message for p in (a, c)}
    cores[b].start()
    cores[b].receive(a, adverts[a])

    def reason(sender: PeerId, message: object) -> RejectReason:
        with pytest.raises(RemoteProtocolError) as info:
            cores[b].receive(sender, message)  # type: ignore[arg-type]
        return info.value.reason

    # Shares that come with other keys than the ones the sender advertised.
    assert isinstance(adverts[c], AdvertiseKeys)
    other_keys = ShareKeys(
        context=spec.context,
        cipher_key=adverts[c].cipher_key,
        mask_key=adverts[c].mask_key,
        self_mask_digest=bytes(32),
        sealed=[SealedShares(b, bytes(148))],
    )
    assert reason(a, other_keys) is RejectReason.INCONSISTENT
    # Shares that do not open under the pair's key (c never sealed these).
    assert reason(c, other_keys) is RejectReason.INCONSISTENT
    # None sealed for b, or some for a stranger.
    for entries in ([SealedShares(a, bytes(148))], [SealedShares(PEERS[7], bytes(148))]):
        assert reason(c, replace(other_keys, sealed=entries)) is RejectReason.BAD_FIELD
    # Unmask parts revealing both secrets of one peer.
    part = SharePart(a, bytes(66))
    both = Unmask(context=spec.context, self_masks=[part], mask_keys=[part])
    assert reason(c, both) is RejectReason.INCONSISTENT
    # A stranger's peer list.
    stranger = RollCall(context=spec.context, members=[a, PEERS[7]])
    assert reason(c, stranger) is RejectReason.BAD_FIELD


def test_one_shares_message_for_all_and_each_opens_only_its_own() -> None:
    spec = make_spec(3)
    a, b, c = spec.roster
    cores = {p: SecAggPeer(spec, p, np.zeros(10, spec.dtype)) for p in spec.roster}
    adverts = {p: first_send(cores[p].start(), to=a if p != a else b).message for p in cores}
    for receiver in (b, c):
        for sender in spec.roster:
            if sender != receiver:
                cores[receiver].receive(sender, adverts[sender])
    cores[a].receive(b, adverts[b])
    sends = [action for action in cores[a].receive(c, adverts[c]) if isinstance(action, Send)]
    assert [send.to for send in sends] == [b, c]
    shares = sends[0].message
    assert sends[1].message is shares and isinstance(shares, ShareKeys)
    assert [entry.peer for entry in shares.sealed] == [b, c]
    # b's entry relabelled as c's does not open under the key of the pair (a, c).
    relabelled = replace(shares, sealed=[SealedShares(c, shares.sealed[0].sealed)])
    with pytest.raises(RemoteProtocolError) as info:
        cores[c].receive(a, relabelled)
    assert info.value.reason is RejectReason.INCONSISTENT
    cores[b].receive(a, shares)
    cores[c].receive(a, shares)


def test_a_group_spec_refuses_what_cannot_be_secure() -> None:
    with pytest.raises(ValueError, match="majority"):
        make_spec(6, threshold=3)
    with pytest.raises(ValueError, match="cannot resist 1 colluding"):
        make_spec(2, threshold=2)  # a pair: each reads the other's input
    with pytest.raises(ValueError, match="collusion \\+ 2 = 4"):
        make_spec(5, threshold=3, collusion=2)
    make_spec(2, threshold=2, collusion=0)  # a pair of aggregates (later Moshpit steps)
    # two neighbours of 12, threshold 7: one colluder has the other declared dropped
    with pytest.raises(ValueError, match="without an honest neighbour"):
        make_spec(12, neighbours=2)
    make_spec(12, neighbours=sparse_neighbours(12, 7))
    with pytest.raises(ValueError, match="even"):
        make_spec(6, neighbours=3)
    with pytest.raises(ValueError, match="distinct"):
        GroupSpec(job=b"j", round=0, group=0, roster=(PEERS[0], PEERS[0]), threshold=2)
    with pytest.raises(ValueError, match="at least"):
        SecAggPeer(make_spec(5), PEERS[0], np.zeros(3, np.uint32))
