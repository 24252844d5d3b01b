"""Catching up with a job: a peer that (re)starts behind its roster takes the state the others
are at and goes on from there.

Without it a restarted peer re-runs the round it died in while the others are rounds ahead,
and its groups never meet again (every averaging step's context names its round). When it
resumes, and after a round in which it was left out of every group, a
:class:`~.job.TrainingPeer` asks a few roster peers where they are (:class:`StateQuery`, answered
by :class:`StateAnswer` with the round that peer starts next); if some are ahead, it asks the
one furthest ahead to send its state, which arrives, before the answer, as one uint8 array
``trainstate.<job hex>:<round>`` (:func:`pack_state`: the round, the model, the strategy's
state). The peer loads it and joins at that round.

The state is taken on trust from one roster peer: until the market issue, a job's roster is a
private federation (and with the ``exact`` schedule every honest peer holds the same model).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import msgpack
import numpy as np
import numpy.typing as npt

from ..codec import bounded, bounded_unpack
from ..errors import RemoteProtocolError
from ..node import Node
from ..stats import RejectReason
from ..store import pack_state, unpack_state
from ..wire import Envelope, Message, message

__all__ = ["StateAnswer", "StateQuery", "TrainingState", "decode_state", "encode_state", "serve"]


@message("meshfed.train.state_query")
@dataclass(frozen=True, slots=True)
class StateQuery(Message):
    """Where is ``job`` at? With ``send``, also send me your state (before answering)."""

    job: str = bounded(max_len=256)
    send: bool = False


@message("meshfed.train.state_answer")
@dataclass(frozen=True, slots=True)
class StateAnswer(Message):
    """``job`` starts round ``next_round`` next here (``rounds`` when it is done)."""

    job: str = bounded(max_len=256)
    next_round: int = bounded(ge=0)


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

_providers: WeakKeyDictionary[Node, dict[str, Provider]] = WeakKeyDictionary()


def serve(node: Node, job: str, provider: Provider) -> None:
    """Answer :class:`StateQuery` for ``job`` on ``node`` with ``provider`` (one node may
    train several jobs: queries are dispatched by job)."""
    if node not in _providers:
        _providers[node] = {}
        jobs = _providers[node]

        async def dispatch(envelope: Envelope, query: StateQuery) -> StateAnswer:
            provider = jobs.get(query.job)
            if provider is None:
                raise RemoteProtocolError(
                    f"no job {query.job!r} here", reason=RejectReason.WRONG_CONTEXT
                )
            return await provider(envelope, query)

        node.handle(StateQuery, dispatch)
    _providers[node][job] = provider
