"""Harness: one secure-aggregation run (:class:`meshfed.secagg.protocol.SecAggSession`, up to
two attempts) among four peers, one of them dishonest, over a network the fuzzer schedules.

Every peer is a real session (so messages carry real keys, shares and masks and the fuzzer
gets past every cryptographic check). The fuzzer picks which message is delivered next,
drops messages, fires phase deadlines, alters any field of the dishonest peer's messages and
slices, and makes it send messages of its own. Each message crosses the wire codec as it
would on the network.

The promises under test (SPEC, "Secure aggregation"): nothing but ``RemoteProtocolError``
leaves a session; an honest peer that finishes does so with at least ``threshold`` survivors,
two of them honest (collusion bound 1); and with the dishonest peer only dropping or
delaying, every honest peer that finishes holds the exact sum of the survivors' inputs.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np

from meshfed.codec import schema_of
from meshfed.errors import RemoteProtocolError
from meshfed.identity import PeerId
from meshfed.secagg.bounds import threshold_for
from meshfed.secagg.messages import (
    AdvertiseKeys,
    InputsReceived,
    RollCall,
    ShareKeys,
    Survivors,
    Unmask,
)
from meshfed.secagg.protocol import (
    Aborted,
    Action,
    Finished,
    GroupSpec,
    SecAggSession,
    Send,
    SendSlice,
    SliceKind,
)
from meshfed.wire import Message

from ._common import IDENTITIES, Reader, Writer, loose_unpack, through_wire

_GROUP = tuple(identity.peer_id for identity in IDENTITIES)
_MALLORY = _GROUP[-1]
_HONEST = _GROUP[:-1]
_LENGTH = 8
_SPEC = GroupSpec(job=b"fuzz", round=1, group=0, roster=_GROUP, threshold=threshold_for(4))
_INPUTS = {peer: np.arange(_LENGTH, dtype=np.uint32) * (i + 1) for i, peer in enumerate(_GROUP)}
_TYPES: list[type[Message]] = [
    AdvertiseKeys,
    ShareKeys,
    RollCall,
    InputsReceived,
    Survivors,
    Unmask,
]
_MAX_STEPS = 400
DELIVER, DROP, TAMPER, INJECT, EXPIRE = range(5)


def _over_the_wire(message: Message) -> Message:
    """``message`` encoded and decoded as the envelope carries it (bounds checked)."""
    return through_wire(type(message), schema_of(type(message)).encode(message))


def _tamper(reader: Reader, action: Send | SendSlice) -> Send | SendSlice:
    """The dishonest peer changes one field of its message, or its array."""
    if isinstance(action, SendSlice):
        raw = reader.sized(64)
        dtype = np.uint32 if reader.flag() else np.uint16
        size = np.dtype(dtype).itemsize
        array = np.frombuffer(raw[: len(raw) // size * size], dtype=dtype).copy()
        return SendSlice(action.to, action.kind, array, action.context)
    fields: list[Any] = schema_of(type(action.message)).encode(action.message)
    index = reader.below(len(fields))
    value = fields[index]
    if isinstance(value, bytes) and value and reader.flag():
        at = reader.below(len(value))
        fields[index] = (
            value[:at] + bytes([value[at] ^ (1 + reader.uint(1) % 255)]) + value[at + 1 :]
        )
    elif isinstance(value, list) and value and reader.flag():
        fields[index] = value[: reader.below(len(value))]  # leave entries out
    else:
        fields[index] = loose_unpack(reader.sized(300))
    return Send(action.to, through_wire(type(action.message), fields))


def _inject(reader: Reader, context: bytes) -> Send | SendSlice:
    """A message of the dishonest peer's own making."""
    to = _HONEST[reader.below(len(_HONEST))]
    if reader.below(4) == 0:
        kind = SliceKind.INPUT if reader.flag() else SliceKind.SUM
        raw = reader.sized(64)
        return SendSlice(to, kind, np.frombuffer(raw[: len(raw) // 4 * 4], np.uint32), context)
    cls = _TYPES[reader.below(len(_TYPES))]
    value = loose_unpack(reader.sized(600))
    fields = value if isinstance(value, list) else [context, value]
    if fields and reader.flag():
        fields[0] = context
    return Send(to, through_wire(cls, fields))


def _check(outcomes: dict[PeerId, Finished | Aborted], honest_net: bool) -> None:
    totals = []
    for peer in _HONEST:
        outcome = outcomes.get(peer)
        if not isinstance(outcome, Finished):
            continue
        survivors = set(outcome.survivors)
        if len(survivors) < _SPEC.threshold or not survivors <= set(_GROUP):
            raise AssertionError(f"finished with survivors {outcome.survivors}")
        if len(survivors & set(_HONEST)) < 2:
            raise AssertionError("a sum of fewer than two honest inputs was revealed")
        if honest_net:
            expected = sum((_INPUTS[p].astype(np.uint64) for p in outcome.survivors), np.uint64(0))
            if not np.array_equal(outcome.total, expected.astype(np.uint32)):
                raise AssertionError("an honest run finished with a wrong sum")
            totals.append(outcome.total)
    if any(not np.array_equal(totals[0], t) for t in totals):
        raise AssertionError("honest peers finished with different sums")


def test_one_input(data: bytes) -> None:
    """One run, scheduled by the input; past its end, messages go in order and deadlines fire."""
    reader = Reader(data)
    seed = reader.uint(1)
    sessions = {
        peer: SecAggSession(
            _SPEC, peer, _INPUTS[peer], max_attempts=2,
            random_bytes=random.Random(seed * 8 + i).randbytes,
        )
        for i, peer in enumerate(_GROUP)
    }  # fmt: skip
    queue: list[tuple[PeerId, Send | SendSlice]] = []
    outcomes: dict[PeerId, Finished | Aborted] = {}
    honest_net = True

    def act(peer: PeerId, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send | SendSlice):
                queue.append((peer, action))
            elif isinstance(action, Finished | Aborted):
                outcomes[peer] = action

    def deliver(sender: PeerId, action: Send | SendSlice) -> None:
        session = sessions[action.to]
        # What a session sends always decodes (outside the suppress: a failure is a finding).
        message = _over_the_wire(action.message) if isinstance(action, Send) else None
        with contextlib.suppress(RemoteProtocolError):
            if message is not None:
                act(action.to, session.receive(sender, message))
            elif isinstance(action, SendSlice):
                array = action.array.copy()
                act(action.to, session.receive_slice(sender, action.kind, action.context, array))

    for peer in _GROUP:
        act(peer, sessions[peer].start())
    for _ in range(_MAX_STEPS):
        if all(peer in outcomes for peer in _HONEST) and not queue:
            break
        step = reader.below(5) if reader.left else (DELIVER if queue else EXPIRE)
        if step in (DELIVER, DROP) and queue:
            sender, action = queue.pop(reader.below(len(queue)) if reader.left else 0)
            if step == DELIVER:
                deliver(sender, action)
        elif step in (TAMPER, INJECT):
            mine = [i for i, (sender, _) in enumerate(queue) if sender == _MALLORY]
            try:
                if step == TAMPER and mine:
                    index = mine[reader.below(len(mine))]
                    queue[index] = (_MALLORY, _tamper(reader, queue[index][1]))
                elif step == INJECT:
                    context = sessions[_MALLORY].current.context
                    queue.append((_MALLORY, _inject(reader, context)))
                else:
                    continue
            except RemoteProtocolError:  # the receiver's decoder would refuse it
                continue
            honest_net = False
        else:
            waiting = [p for p in _GROUP if p not in outcomes]
            if not waiting:
                break
            if reader.left:
                peer = waiting[reader.below(len(waiting))]
            else:  # the earliest phase's deadline fires first
                peer = min(waiting, key=lambda p: sessions[p].progress().step)
            act(peer, sessions[peer].expire())
    _check(outcomes, honest_net)


def seeds() -> Iterator[bytes]:
    """Honest runs in order; one where the dishonest peer's message is altered; one where its
    key adverts are lost (its share messages repeat the keys); one where it sends a message of
    its own."""
    yield Writer().uint(1, 1).build()
    yield Writer().uint(1, 2).below(5, DELIVER).below(4, 3).build()
    w = Writer().uint(1, 3)
    for _ in range(4):
        w.below(5, DELIVER).below(12, 0)
    w.below(5, TAMPER).below(3, 0).below(5, 1).uint(1, 1).below(32, 5).uint(1, 0)
    yield w.build()
    yield (
        Writer()
        .uint(1, 4)
        .below(5, INJECT)
        .below(3, 1)
        .below(4, 1)
        .below(6, 1)
        .sized(b"\x90")
        .build()
    )
