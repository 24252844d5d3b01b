"""Catching up with a job by quorum: a peer that is behind (or whose round went wrong) takes
the state its roster agrees on, never one peer's word.

Without it a restarted peer re-runs the round it died in while the others are rounds ahead,
and its groups never meet again (every averaging step's context names its round). A
:class:`~.job.TrainingPeer` asks several roster peers where they are (:class:`StateQuery`,
answered by :class:`StateAnswer`: the round that peer starts next and the :func:`state_digest`
of the state it starts it from). Rosters may hold strangers (auction winners), so the answers
are claims, and :func:`agreed_state` takes a state only when at least ``quorum`` of the asked
peers claim the same round *and* digest (``quorum = collusion + 1``: ``collusion`` liars alone
never make one), and only a round the job's clock allows (:func:`plausible_round`). The state
itself comes from one of the peers that claimed it, as one uint8 array
``trainstate.<job hex>:<round>`` (:func:`encode_state`: the round, the model, the strategy's
state), and is used only if its digest is the agreed one (else the next of them is asked).

What it does not resist: ``quorum`` or more colluding peers among those asked (beyond the
job's collusion bound) can make a victim take their state.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary, ref

import msgpack
import numpy as np
import numpy.typing as npt

from ..codec import bounded, bounded_unpack
from ..errors import RemoteProtocolError
from ..identity import PeerId
from ..node import Node
from ..stats import RejectReason
from ..store import pack_state, unpack_state
from ..wire import Envelope, Message, message

__all__ = [
    "Agreed",
    "Claim",
    "StateAnswer",
    "StateQuery",
    "TrainingState",
    "agreed_round",
    "agreed_state",
    "decode_state",
    "encode_state",
    "plausible_round",
    "serve",
    "state_digest",
    "stop_serving",
]

#: the length of a state digest (SHA-256)
DIGEST_BYTES = 32
#: no round is claimed past this (a job's rounds fit far below it)
MAX_ROUND = 1 << 32


@message("meshfed.train.state_query")
@dataclass(frozen=True, slots=True)
class StateQuery(Message):
    """Where is ``job`` at? With ``send``, also send me your state (before answering)."""

    job: str = bounded(max_len=256)
    send: bool = False


@message("meshfed.train.state_answer")
@dataclass(frozen=True, slots=True)
class StateAnswer(Message):
    """``job`` starts round ``next_round`` next here (``rounds`` when it is done), from the
    state whose :func:`state_digest` is ``digest``; ``settling``: its round ``next_round``
    failed here, and it waits for the state the others end it with."""

    job: str = bounded(max_len=256)
    next_round: int = bounded(ge=0, le=MAX_ROUND)
    digest: bytes = bounded(min_len=DIGEST_BYTES, max_len=DIGEST_BYTES)
    settling: bool = False


@dataclass(frozen=True, slots=True)
class TrainingState:
    """What a peer needs to join a job at ``next_round``."""

    next_round: int
    model: npt.NDArray[np.float32]
    strategy: dict[str, Any]


def encode_state(state: TrainingState) -> npt.NDArray[np.uint8]:
    """``state`` as the uint8 array that travels."""
    packed = msgpack.packb(
        [state.next_round, state.model.astype("<f4").tobytes(), pack_state(state.strategy)]
    )
    return np.frombuffer(packed, np.uint8)


def state_digest(job: str, encoded: bytes | npt.NDArray[np.uint8]) -> bytes:
    """SHA-256 of a state of ``job`` as it travels (:func:`encode_state`): the round, the
    model's bytes and the strategy state. Peers holding the same state compute the same
    digest (the same code packs the same values in the same order)."""
    data = encoded.tobytes() if isinstance(encoded, np.ndarray) else encoded
    name = job.encode()
    return hashlib.sha256(
        b"meshfed.trainstate.v1" + len(name).to_bytes(2, "big") + name + data
    ).digest()


@dataclass(frozen=True, slots=True)
class Claim:
    """What one peer says it holds: the round it starts next and that state's digest (and
    whether it waits for the others' result of that round: not part of the claim's value)."""

    next_round: int
    digest: bytes
    settling: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Agreed:
    """A state enough peers claim: the claim and who claims it (in the order they answered)."""

    claim: Claim
    peers: tuple[PeerId, ...]


def agreed_state(
    claims: Sequence[tuple[PeerId, Claim]], *, quorum: int, least: int, most: int
) -> Agreed | None:
    """The furthest state that at least ``quorum`` of the answering peers claim, at round
    ``least`` to ``most`` (a claim beyond ``most`` counts for nothing: the job's clock or its
    rounds rule it out). Each peer counts once, with its last claim. Two states with a quorum
    at one round: the one more peers claim; a tie: none (honest peers of an ``exact`` job hold
    one state per round, so a tie means liars or a split nobody should follow).

    Raises:
        ValueError: ``quorum < 1``.
    """
    if quorum < 1:
        raise ValueError(f"quorum must be >= 1, not {quorum}")
    last = dict(claims)
    votes = Counter(c for c in last.values() if least <= c.next_round <= most)
    best: tuple[int, int, Claim] | None = None
    tied = False
    for claim, count in votes.items():
        if count < quorum:
            continue
        key = (claim.next_round, count)
        if best is None or key > best[:2]:
            best, tied = (*key, claim), False
        elif key == best[:2]:
            tied = True
    if best is None or tied:
        return None
    chosen = best[2]
    return Agreed(chosen, tuple(peer for peer, claim in last.items() if claim == chosen))


def agreed_round(
    claims: Sequence[tuple[PeerId, Claim]], *, quorum: int, least: int, most: int
) -> int | None:
    """The furthest round that at least ``quorum`` of the answering peers claim to have
    reached (whatever their digests), in ``least..most``: the ``quorum``-th highest claim, so
    that ``quorum - 1`` liars cannot move it past every honest peer. For schedules whose peers
    hold different models (``moshpit``), where no state has a quorum."""
    if quorum < 1:
        raise ValueError(f"quorum must be >= 1, not {quorum}")
    rounds = sorted(
        (c.next_round for c in dict(claims).values() if c.next_round <= most), reverse=True
    )
    if len(rounds) < quorum or rounds[quorum - 1] < least:
        return None
    return rounds[quorum - 1]


def plausible_round(
    *, known_round: int, known_at: float, now: float, min_round_s: float, rounds: int
) -> int:
    """The furthest round a job known to be at ``known_round`` at time ``known_at`` can have
    reached by ``now`` at one round per ``min_round_s`` (the fastest plausible rate), one more
    for the round under way, and never past its ``rounds``."""
    elapsed = max(0.0, now - known_at)
    return min(rounds, known_round + math.floor(elapsed / min_round_s) + 1)


def decode_state(array: npt.NDArray[Any], *, parameters: int) -> TrainingState:
    """The state in a received array, for a model of ``parameters`` parameters.

    Raises:
        RemoteProtocolError: not a state of that model ([bad_array]).
    """
    try:
        if array.dtype != np.uint8 or array.ndim != 1:
            raise ValueError(f"a {array.dtype} array of shape {array.shape}")
        data = array.tobytes()
        next_round, model, strategy = bounded_unpack(
            data, max_items=3, max_arrays=1, max_bytes=len(data)
        )
        vector = np.frombuffer(model, "<f4").astype(np.float32)
        if not isinstance(next_round, int) or next_round < 0:
            raise ValueError(f"round {next_round!r}")
        if vector.shape != (parameters,) or not np.isfinite(vector).all():
            raise ValueError(f"{vector.shape[0]} parameters, {parameters} expected, or not finite")
        return TrainingState(next_round, vector, unpack_state(strategy))
    except (ValueError, TypeError, RemoteProtocolError) as exc:
        raise RemoteProtocolError(
            f"not a training state: {exc}", reason=RejectReason.BAD_ARRAY
        ) from None


#: a job's answer to a query: its next round, and its state sent to the asker if wanted
Provider = Callable[[Envelope, StateQuery], Awaitable[StateAnswer]]


class _Jobs(dict[str, Provider]):
    """One node's providers by job: held by the node's handler, weakly by :data:`_providers`
    (a provider holds its node: held strongly there, a node that stopped would live for good)."""


_providers: WeakKeyDictionary[Node, ref[_Jobs]] = WeakKeyDictionary()


def _jobs(node: Node) -> _Jobs | None:
    held = _providers.get(node)
    return None if held is None else held()


def serve(node: Node, job: str, provider: Provider) -> None:
    """Answer :class:`StateQuery` for ``job`` on ``node`` with ``provider`` (one node may
    train several jobs: queries are dispatched by job)."""
    jobs = _jobs(node)
    if jobs is None:
        jobs = _Jobs()
        _providers[node] = ref(jobs)

        async def dispatch(envelope: Envelope, query: StateQuery) -> StateAnswer:
            provider = jobs.get(query.job)
            if provider is None:
                raise RemoteProtocolError(
                    f"no job {query.job!r} here", reason=RejectReason.WRONG_CONTEXT
                )
            return await provider(envelope, query)

        node.handle(StateQuery, dispatch)
    jobs[job] = provider


def stop_serving(node: Node, job: str, provider: Provider) -> None:
    """Stop answering for ``job`` with ``provider`` (a provider serving it since stays)."""
    jobs = _jobs(node)
    if jobs is not None and jobs.get(job) == provider:
        del jobs[job]
