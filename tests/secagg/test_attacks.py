"""A dishonest group member against the honest ones (issue 11, findings 2, 6 and 9).

It may abort a run; it must never read one honest peer's input, nor kill the honest peers'
run with anything but a counted rejection.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed import Node
from meshfed.arrays import ArrayHeader
from meshfed.errors import RemoteProtocolError, RequestFailed
from meshfed.identity import PeerId
from meshfed.secagg.driver import AggregationFailed, Aggregator, GroupResult
from meshfed.secagg.keys import mask_sign, pair_seed
from meshfed.secagg.keys import neighbours as masking_graph
from meshfed.secagg.messages import AdvertiseKeys, SealedShares, ShareKeys, SharePart, Unmask
from meshfed.secagg.prg import expand_mask
from meshfed.secagg.protocol import (
    Aborted,
    AbortReason,
    Finished,
    GroupSpec,
    Phase,
    SecAggPeer,
    SecAggSession,
    Send,
    SendSlice,
    SliceKind,
    slice_bounds,
)
from meshfed.secagg.shamir import PRIME
from meshfed.stats import RejectReason
from meshfed.wire import Envelope, Scope

from .simulation import run_once
from .test_driver import QUANTIZER, QUICK, nodes, quantization_bound, vectors
from .test_protocol import PEERS, random_inputs, ring_sum

LOW_ORDER_KEY = bytes(32)  # the X25519 point u = 0: every exchange with it is all zeros
#: points of order 1, 2, 4 or 8 (and non-canonical encodings of them): X25519 with any of them
#: is all zeros, which `cryptography` refuses with ValueError
LOW_ORDER_KEYS = [
    bytes.fromhex(h)
    for h in (
        "00" * 32,
        "01" + "00" * 31,
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ec" + "ff" * 30 + "7f",
        "ed" + "ff" * 30 + "7f",
        "ee" + "ff" * 30 + "7f",
        "ed" + "ff" * 31,
    )
]
KEYS = st.one_of(st.binary(min_size=32, max_size=32), st.sampled_from(LOW_ORDER_KEYS))


def least_threshold_accepted(roster: tuple[PeerId, ...], collusion: int) -> int | None:
    """The smallest threshold a group spec accepts for ``roster`` (None: no threshold is)."""
    for threshold in range(2, len(roster) + 1):
        try:
            GroupSpec(job=b"j", round=0, group=0, roster=roster, threshold=threshold,
                      **_collusion(collusion))  # fmt: skip
        except ValueError:
            continue
        return threshold
    return None


def _collusion(collusion: int) -> dict[str, int]:
    """``collusion`` as a spec option (the default, 1, passed implicitly)."""
    return {} if collusion == 1 else {"collusion": collusion}


# -- finding 2: colluders declare honest members dropped ------------------------------------------


@pytest.mark.parametrize(
    ("size", "collusion"), [(3, 1), (4, 1), (5, 1), (6, 1), (8, 1), (5, 2), (7, 2)]
)
@pytest.mark.parametrize("honest_kept", [1, 2])
def test_colluders_that_declare_honest_members_dropped_never_read_one_honest_input(
    size: int, collusion: int, honest_kept: int
) -> None:
    """The colluders claim that the slices of every honest member but ``honest_kept`` never
    reached them; the survivor set shrinks to them and those few, every owner signs it (it is
    what the reports say), and the colluders subtract their own inputs from the sum."""
    roster = tuple(PEERS[:size])
    threshold = least_threshold_accepted(roster, collusion)
    if threshold is None:  # the group itself is refused: nothing to attack
        return
    spec = GroupSpec(job=b"j", round=1, group=0, roster=roster, threshold=threshold,
                     **_collusion(collusion))  # fmt: skip
    colluders, honest = roster[:collusion], roster[collusion:]
    declared_dropped = set(honest[honest_kept:])
    inputs = random_inputs(spec, 300, seed=size, top=2**20)

    def never_arrived(sender: PeerId, receiver: PeerId, action: object) -> bool:
        return (
            sender in declared_dropped
            and receiver in colluders
            and isinstance(action, SendSlice)
            and action.kind is SliceKind.INPUT
        )

    trace = run_once(spec, inputs, hold_back=never_arrived, max_attempts=3)
    for colluder in colluders:
        outcome = trace.outcomes[colluder]
        if isinstance(outcome, Aborted):
            continue
        assert isinstance(outcome, Finished)
        honest_inside = [peer for peer in outcome.survivors if peer in honest]
        revealed = outcome.total - ring_sum(
            inputs, tuple(p for p in outcome.survivors if p in colluders)
        )
        assert np.array_equal(revealed, ring_sum(inputs, tuple(honest_inside)))
        assert len(honest_inside) >= 2, "the colluders read one honest member's exact input"
        for peer in honest:
            assert not np.array_equal(revealed, inputs[peer])


def test_after_a_dropout_the_rerun_keeps_the_threshold_and_the_attack_only_aborts() -> None:
    """Four members, threshold 3: one dies before the run, the colluder declares a second
    dropped. Every attempt (fewer members, the same threshold) aborts: nothing is revealed."""
    spec = GroupSpec(job=b"j", round=1, group=0, roster=tuple(PEERS[:4]), threshold=3)
    colluder, honest, declared, dead = spec.roster
    inputs = random_inputs(spec, 300, seed=1, top=2**20)

    def never_arrived(sender: PeerId, receiver: PeerId, action: object) -> bool:
        return sender == declared and receiver == colluder and isinstance(action, SendSlice)

    trace = run_once(
        spec, inputs, hold_back=never_arrived, die_after_sends={dead: 0}, max_attempts=3
    )
    for peer in (colluder, honest, declared):
        outcome = trace.outcomes[peer]
        assert isinstance(outcome, Aborted) and not outcome.released
        assert outcome.reason is AbortReason.TOO_FEW, outcome
        assert all(abort.reason is AbortReason.TOO_FEW for abort in trace.sessions[peer].aborts)
    assert not any(
        isinstance(action, Send) and isinstance(action.message, Unmask)
        for _, _, action in trace.delivered
    )


@pytest.mark.parametrize("size", [8, 12])
def test_a_colluder_cannot_strip_a_neighbours_masks_in_a_sparse_graph(size: int) -> None:
    """SecAgg+: a survivor's slice hides behind its pairwise masks. The colluder, a neighbour
    of the victim, declares the victim's other neighbours dropped (their mask keys are then
    revealed) and strips every mask it can from the victim's slice it owns. With the sparsest
    graph the spec accepts, one honest neighbour's mask always stays on."""
    roster = tuple(PEERS[:size])
    threshold = least_threshold_accepted(roster, 1)
    assert threshold is not None
    spec = None
    for k in range(2, size, 2):  # the sparsest graph a spec accepts
        try:
            spec = GroupSpec(job=b"j", round=1, group=0, roster=roster, threshold=threshold,
                             neighbours=k)  # fmt: skip
        except ValueError:
            continue
        break
    if spec is None or spec.neighbours is None or spec.neighbours >= size - 1:
        return  # only a complete graph: nothing sparse to attack
    graph = masking_graph(roster, k=spec.neighbours, context=spec.context)
    colluder = roster[0]
    victim = sorted(graph[colluder], key=lambda p: p.raw)[0]
    others = sorted(graph[victim] - {colluder}, key=lambda p: p.raw)
    declared = set(others[: size - threshold])
    inputs = random_inputs(spec, 400, seed=size, top=2**20)

    def never_arrived(sender: PeerId, receiver: PeerId, action: object) -> bool:
        return (
            sender in declared
            and receiver == colluder
            and isinstance(action, SendSlice)
            and action.kind is SliceKind.INPUT
        )

    trace = run_once(spec, inputs, hold_back=never_arrived)
    outcome = trace.outcomes[colluder]
    assert isinstance(outcome, Finished) and victim in outcome.survivors
    # What the colluder holds: the victim's masked slice, every share revealed to it, its keys.
    core = trace.sessions[colluder].current
    owners = core.owners
    lo, hi = slice_bounds(400, len(owners), owners.index(colluder))
    revealed = core._inbox[Phase.UNMASK]
    guess = core._inbox[Phase.INPUT][victim].copy()
    masks = [(core._rebuild(victim, revealed, 0), 1)]  # the victim's self-mask
    mine = core._mask_key.exchange(X25519PublicKey.from_public_bytes(core._keys[victim][1]))
    masks.append((pair_seed(mine, context=core.context, a=colluder, b=victim),
                  mask_sign(victim, colluder)))  # fmt: skip
    for dropped in declared:  # their mask keys were revealed to every owner
        key = X25519PrivateKey.from_private_bytes(core._rebuild(dropped, revealed, 1))
        secret = key.exchange(X25519PublicKey.from_public_bytes(core._keys[victim][1]))
        masks.append((pair_seed(secret, context=core.context, a=dropped, b=victim),
                      mask_sign(victim, dropped)))  # fmt: skip
    for seed, sign in masks:
        mask = expand_mask(seed, hi - lo, dtype=spec.dtype, offset=lo)
        guess -= mask if sign > 0 else -mask
    assert not np.array_equal(guess, inputs[victim][lo:hi]), "the colluder read a slice"


class DeclaresDropped(Aggregator):
    """A dishonest member's aggregator: ``victim``'s masked input slices "never arrive"."""

    def __init__(self, node: Node, victim: PeerId, **options: Any) -> None:
        super().__init__(node, **options)
        self.victim = victim

    async def _on_array(
        self, envelope: Envelope, header: ArrayHeader, array: npt.NDArray[Any]
    ) -> None:
        if envelope.sender != self.victim or not header.name.startswith(SliceKind.INPUT):
            await super()._on_array(envelope, header, array)
        # else: taken, acknowledged, and dropped on the floor; and once the victim is all the
        # input phase waits for, the report goes out at once (before the others give up on it)
        for run in set(self._runs.values()):
            session = run.session
            if not isinstance(session, SecAggSession):
                continue
            current = session.current
            if current.phase is Phase.INPUT and current.waiting_for <= {self.victim}:
                await self._feed(run, session.expire, only_at=run.step)


@pytest.mark.parametrize("transport", ["memory", "libp2p"])
async def test_over_the_network_a_member_of_three_cannot_read_its_neighbours_model(
    tmp_path: Path, transport: str
) -> None:
    async with nodes(tmp_path, 3, transport=transport) as group:
        roster = tuple(node.peer_id for node in group)
        threshold = least_threshold_accepted(roster, 1)
        assert threshold is not None
        spec = GroupSpec(job=b"job-7", round=1, group=0, roster=roster, threshold=threshold)
        values = vectors(3, 20_000)
        attacker, neighbour, victim = 0, 1, 2
        aggregators = [
            DeclaresDropped(group[0], group[victim].peer_id, deadlines=QUICK),
            Aggregator(group[1], deadlines=QUICK),
            Aggregator(group[2], deadlines=QUICK),
        ]
        results: dict[int, GroupResult | AggregationFailed] = {}

        async def one(i: int) -> None:
            try:
                results[i] = await aggregators[i].secure_mean(
                    spec, values[i], QUANTIZER, rng=np.random.default_rng(i)
                )
            except AggregationFailed as exc:
                results[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
    stolen = results[attacker]
    if isinstance(stolen, GroupResult):
        # what the attacker computes: the survivors' sum minus its own input
        guess = stolen.value * len(stolen.survivors) - values[attacker]
        for i in (neighbour, victim):
            assert np.max(np.abs(guess - values[i])) > 0.1, "the attacker read a model"
    for i in (neighbour, victim):  # the honest ones end cleanly either way
        assert isinstance(results[i], GroupResult | AggregationFailed)


# -- finding 6: bad keys and out-of-field shares are rejected at the door -------------------------


def first_send(actions: list[object], to: PeerId) -> Send:
    return next(a for a in actions if isinstance(a, Send) and a.to == to)


@settings(max_examples=300, deadline=None)
@given(cipher_key=KEYS, mask_key=KEYS, shares=st.booleans())
def test_any_32_bytes_as_a_key_are_a_rejection_or_actions_never_an_exception(
    cipher_key: bytes, mask_key: bytes, shares: bool
) -> None:
    spec = GroupSpec(job=b"j", round=0, group=0, roster=tuple(PEERS[:4]), threshold=3)
    me, sender, *others = spec.roster
    core = SecAggPeer(spec, me, np.zeros(8, spec.dtype))
    core.start()
    for peer in others:  # two honest peers advertise real keys
        honest = SecAggPeer(spec, peer, np.zeros(8, spec.dtype))
        core.receive(peer, first_send(honest.start(), to=me).message)
    message: AdvertiseKeys | ShareKeys = AdvertiseKeys(
        context=spec.context, cipher_key=cipher_key, mask_key=mask_key
    )
    if shares:  # the keys may come with the shares (a peer that missed the advert)
        sealed = [SealedShares(me, bytes(148))]
        message = ShareKeys(context=spec.context, cipher_key=cipher_key, mask_key=mask_key,
                            self_mask_digest=bytes(32), sealed=sealed)  # fmt: skip
        core.expire()  # on to the shares phase
        assert core.phase is Phase.SHARES
    with contextlib.suppress(RemoteProtocolError):
        core.receive(sender, message)
    # every later phase ends by deadline: nothing but actions comes out
    while core.phase < Phase.DONE:
        core.expire()


@settings(max_examples=60, deadline=None)
@given(
    offender=st.integers(0, 4),
    what=st.sampled_from(["advert", "both keys", "self_masks", "mask_keys"]),
    value=st.one_of(st.integers(PRIME, 2**528 - 1), st.integers(0, PRIME - 1), st.just(PRIME)),
    key=KEYS,
)
def test_a_member_sending_bad_keys_or_shares_never_breaks_the_honest_peers(
    offender: int, what: str, value: int, key: bytes
) -> None:
    spec = GroupSpec(job=b"j", round=2, group=0, roster=tuple(PEERS[:5]), threshold=3)
    bad = spec.roster[offender]
    inputs = random_inputs(spec, 100, seed=offender, top=2**20)
    y = value.to_bytes(66, "big")

    def rewrite(sender: PeerId, receiver: PeerId, action: Any) -> Any:
        if sender != bad or not isinstance(action, Send):
            return action
        message = action.message
        if isinstance(message, AdvertiseKeys) and what in ("advert", "both keys"):
            message = AdvertiseKeys(**{**_fields(message), "mask_key": key})
        if isinstance(message, ShareKeys) and what == "both keys":
            message = ShareKeys(**{**_fields(message), "mask_key": key})
        if isinstance(message, Unmask) and what in ("self_masks", "mask_keys"):
            parts = [SharePart(part.peer, y) for part in getattr(message, what)]
            message = Unmask(**{**_fields(message), what: parts})
        return Send(action.to, message)

    trace = run_once(spec, inputs, rewrite=rewrite, max_attempts=3)  # no exception escapes
    honest = [peer for peer in spec.roster if peer != bad]
    for peer in honest:
        outcome = trace.outcomes[peer]
        assert isinstance(outcome, Finished | Aborted)
        if isinstance(outcome, Finished) and bad not in outcome.survivors:
            assert np.array_equal(outcome.total, ring_sum(inputs, outcome.survivors))
    rejected = {reason for _, receiver, reason in trace.rejected if receiver in honest}
    assert rejected <= {str(r) for r in (RejectReason.BAD_FIELD, RejectReason.INCONSISTENT,
                                          RejectReason.LATE)}  # fmt: skip


def _fields(message: Any) -> dict[str, Any]:
    return {name: getattr(message, name) for name in message.__dataclass_fields__}


def test_a_low_order_key_leaves_the_offender_out_and_the_others_sum_exactly() -> None:
    spec = GroupSpec(job=b"j", round=2, group=0, roster=tuple(PEERS[:5]), threshold=3)
    bad = spec.roster[2]
    inputs = random_inputs(spec, 100, seed=9, top=2**20)

    def rewrite(sender: PeerId, receiver: PeerId, action: Any) -> Any:
        message = getattr(action, "message", None)
        if sender == bad and isinstance(message, AdvertiseKeys | ShareKeys):
            return Send(action.to, type(message)(**{**_fields(message), "mask_key": bytes(32)}))
        return action

    trace = run_once(spec, inputs, rewrite=rewrite)
    honest = tuple(peer for peer in spec.roster if peer != bad)
    for peer in honest:
        outcome = trace.outcomes[peer]
        assert isinstance(outcome, Finished) and outcome.survivors == honest
        assert np.array_equal(outcome.total, ring_sum(inputs, honest))
    assert (bad, honest[0], str(RejectReason.BAD_FIELD)) in trace.rejected


async def test_a_member_advertising_a_low_order_key_is_rejected_and_the_rest_finish(
    tmp_path: Path,
) -> None:
    async with nodes(tmp_path, 5) as group:
        roster = tuple(node.peer_id for node in group)
        spec = GroupSpec(job=b"job-7", round=1, group=0, roster=roster, threshold=3)
        values = vectors(5, 5_000)
        offender = group[4]
        results: dict[int, GroupResult] = {}
        refused: list[str] = []

        async def one(i: int) -> None:
            aggregator = Aggregator(group[i], deadlines=QUICK)
            rng = np.random.default_rng(i)
            results[i] = await aggregator.secure_mean(spec, values[i], QUANTIZER, rng=rng)

        async def attack() -> None:
            advert = AdvertiseKeys(context=spec.context, cipher_key=LOW_ORDER_KEY,
                                   mask_key=LOW_ORDER_KEY)  # fmt: skip
            await trio.sleep(0.05)  # the runs have begun: refused at once
            for node in group[:4]:
                try:
                    await offender.send(node.peer_id, advert, scope=Scope(spec.job, spec.round))
                except RequestFailed as exc:
                    refused.append(exc.reason)

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
            nursery.start_soon(attack)
        expected = np.mean(values[:4], axis=0)
        for result in results.values():
            assert result.survivors == roster[:4]
            assert np.max(np.abs(result.value - expected)) <= quantization_bound(4)
        assert refused == [str(RejectReason.BAD_FIELD)] * 4
        assert all(node.stats.rejected[RejectReason.BAD_FIELD] == 1 for node in group[:4])


# -- finding 9: strangers filling the store of early messages ------------------------------------


async def test_a_stranger_flooding_early_messages_cannot_push_out_an_honest_members(
    tmp_path: Path,
) -> None:
    async with nodes(tmp_path, 5) as group:
        *members, stranger = group
        roster = tuple(node.peer_id for node in members)
        spec = GroupSpec(job=b"job-7", round=1, group=0, roster=roster, threshold=3)
        values = vectors(4, 1_000)
        late = Aggregator(members[0], deadlines=QUICK, max_pending=16)
        flood = 20
        for n in range(flood):  # keys for runs nobody will ever start
            junk = AdvertiseKeys(context=n.to_bytes(32, "big"), cipher_key=bytes(32),
                                 mask_key=bytes(32))  # fmt: skip
            try:
                await stranger.send(members[0].peer_id, junk, scope=Scope(b"x", 1))
            except RequestFailed as exc:
                assert exc.reason == str(RejectReason.RATE_LIMITED)
        flooded = members[0].stats.rejected[RejectReason.RATE_LIMITED]
        assert flooded == flood - 16  # the store is full of the stranger's keys
        results: dict[int, GroupResult] = {}

        async def one(i: int, aggregator: Aggregator) -> None:
            rng = np.random.default_rng(i)
            results[i] = await aggregator.secure_mean(spec, values[i], QUANTIZER, rng=rng)

        async with trio.open_nursery() as nursery:
            for i in (1, 2, 3):  # these three start first: their keys reach a node not ready
                nursery.start_soon(one, i, Aggregator(members[i], deadlines=QUICK))
            await trio.sleep(0.2)
            nursery.start_soon(one, 0, late)
        # the members' early keys were kept (the stranger's made room), not rate-limited
        assert members[0].stats.rejected[RejectReason.RATE_LIMITED] == flooded
        for result in results.values():
            assert result.survivors == roster and result.attempts == 1
