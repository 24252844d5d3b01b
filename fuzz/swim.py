"""Harness: the SWIM failure detector (:class:`meshfed.membership.swim.Swim`) fed the updates
of decoded ``meshfed.swim.*`` messages from peers, between its own ticks, probe results,
rechecks, adds and forgets.

Each update is ``[statement, state]`` built from fuzzed fields: a statement ``[peer, number,
signature]`` signed by its subject (the harness holds the keys of us, three members and a
stranger we never track, so the fuzzer gets past the signature check to the state machine),
signed by someone else, or raw bytes; at numbers near the detector's own, near the codec's
bound 2^62, past it, and up to the old wire's 2^64 - 1; with states in and out of range.
A refused message is our own ``RemoteProtocolError`` (the documented rejection); a forged
update comes back as an :class:`UpdateRejected` action (dropped and counted, the others
apply).

Checked after every call (SPEC.md 7a, "Signed incarnations"):

- our own statement is signed by us and within [0, 2^62]; it never goes down, changes only in
  ``receive``, and only to one above a number we signed (a refutation); every signed claim
  about us at or above our number (below 2^62) is refuted;
- a member is declared dead only by our own timer: in ``tick``, from suspect, no earlier than
  the suspicion time after it became suspect (``MemberDead`` exactly for those); no third
  party's claim in ``receive`` and no probe result makes it dead;
- a suspect or dead member is cleared in ``receive`` only by its signed statement above the
  number we hold (and a dead one always revives by one); an alive one becomes suspect there only
  by a signed claim at or above that number; a probe answer clears the target's suspicion and
  never revives the dead; ``recheck`` probes exactly a member we hold dead;
- an honest statement is never refused as forged;
- SWIM tracks exactly the peers added and not forgotten (never us, never one it only heard of);
- what it piggybacks next seals and decodes as a peer decodes it: our current statement first,
  then statements signed by their subjects about tracked members, never above the highest
  number their subject signed; ``dead`` only of a member we hold dead; to a member we do not
  hold alive, our claim about it at the number we hold;
- ``wake_at`` is a finite time; probes go to tracked live members, never to us (an indirect
  probe may name the period's target that has died meanwhile: see :func:`_check_probes`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from meshfed.codec import schema_of
from meshfed.errors import RemoteProtocolError
from meshfed.identity import Identity, PeerId
from meshfed.membership.service import SwimAck, SwimPing, SwimPingReq
from meshfed.membership.swim import (
    INCARNATION_DOMAIN,
    MAX_INCARNATION,
    Action,
    Incarnation,
    IndirectProbe,
    MemberDead,
    MemberState,
    Probe,
    Swim,
    SwimConfig,
    Update,
    UpdateRejected,
)
from meshfed.stats import RejectReason
from meshfed.wire import seal

from ._common import IDENTITIES, NOW_MS, Reader, Writer, loose_unpack, pack, through_wire

#: the keys the harness holds: us (index 0), three members, and a stranger never added
_KEYS: tuple[Identity, ...] = (
    *IDENTITIES,
    Identity.from_seeds(bytes([5]) * 32, bytes([105]) * 32),
)
_PEERS = [identity.peer_id for identity in _KEYS]
_ME = _PEERS[0]
_MEMBERS = _PEERS[1 : len(IDENTITIES)]
_JUNK_PEER = len(_PEERS)  # a statement's peer: fuzzed bytes
_MESSAGES: list[type[SwimPing] | type[SwimPingReq] | type[SwimAck]] = [
    SwimPing,
    SwimPingReq,
    SwimAck,
]
RECEIVE, TICK, PROBED, FORGET, ADD, RECHECK = range(6)
#: who signs a statement: its subject, a key chosen by the fuzzer, or nobody (fuzzed bytes)
SUBJECT, OTHER, RAW = range(3)
#: how a statement's number is chosen (see :func:`_number`)
SMALL, NEAR_START, NEAR_HELD, NEAR_MAX, WIRE_TOP, ANY = range(6)
MAX_UPDATES = 8
_DEAD, _SUSPECT, _ALIVE = MemberState.DEAD, MemberState.SUSPECT, MemberState.ALIVE

#: signatures made so far (Ed25519 signatures are deterministic: one per key and statement)
_SIGNATURES: dict[tuple[int, bytes, int], bytes] = {}
_CACHE_MAX = 1 << 14
_INDEX = {peer: i for i, peer in enumerate(_PEERS)}


def _sign(signer: int, peer: bytes, number: int) -> bytes:
    """``_KEYS[signer]``'s signature of the statement ``[peer, number]`` (``number`` < 2^64)."""
    key = (signer, peer, number)
    signature = _SIGNATURES.get(key)
    if signature is None:
        if len(_SIGNATURES) >= _CACHE_MAX:
            _SIGNATURES.clear()
        signature = _KEYS[signer].sign(INCARNATION_DOMAIN + peer + number.to_bytes(8, "big"))
        _SIGNATURES[key] = signature
    return signature


def _valid(statement: Incarnation) -> bool:
    """Whether ``statement.peer`` signed it, answered by the harness, not the code under test:
    only keys the harness holds sign (the detector's own statements are signed with our key,
    which the harness holds too), and each signs deterministically, so a statement is valid
    exactly when it carries the signature its subject's key makes of it."""
    subject = _INDEX.get(statement.peer)
    return (
        subject is not None
        and 0 <= statement.number <= MAX_INCARNATION
        and statement.signature == _sign(subject, statement.peer.raw, statement.number)
    )


@dataclass
class _Model:
    """What the harness knows independently of the detector."""

    #: the peers added and not forgotten since
    tracked: set[PeerId] = field(default_factory=set)
    #: per tracked peer, the highest number of a statement it signed that we were fed since it
    #: was added (-1: none): the number the detector holds
    held: dict[PeerId, int] = field(default_factory=dict)
    #: per suspect member, when we first saw it suspect (its timer started then or later)
    suspect_since: dict[PeerId, float] = field(default_factory=dict)

    def add(self, peer: PeerId) -> None:
        if peer != _ME and peer not in self.tracked:
            self.tracked.add(peer)
            self.held[peer] = -1

    def forget(self, peer: PeerId) -> None:
        self.tracked.discard(peer)
        self.held.pop(peer, None)
        self.suspect_since.pop(peer, None)

    def base(self, peer: int, swim: Swim) -> int:
        """The number a statement about ``_PEERS[peer]`` is near: the one we hold."""
        if peer == 0:
            return swim.incarnation
        held = self.held.get(_PEERS[peer], -1) if peer < _JUNK_PEER else -1
        return NOW_MS if held < 0 else held


def _number(reader: Reader, base: int) -> int:
    kind = reader.below(6)
    if kind == SMALL:
        return reader.uint(1)
    if kind == NEAR_START:
        return NOW_MS + reader.uint(1) - 128  # a node starts at the wall clock in ms
    if kind == NEAR_HELD:
        return base + reader.uint(1) - 16  # the number the detector holds, and the next ones
    if kind == NEAR_MAX:
        return MAX_INCARNATION + 2 - reader.uint(1)  # the codec's bound, and just past it
    if kind == WIRE_TOP:
        return (1 << 64) - 1 - reader.uint(1)  # the top of the old wire's range
    return reader.uint(8)


def _statement(reader: Reader, swim: Swim, model: _Model) -> list[Any]:
    """A statement's fields as a peer sends them."""
    who = reader.below(len(_PEERS) + 1)
    peer = reader.sized(40) if who == _JUNK_PEER else _PEERS[who].raw
    number = _number(reader, model.base(who, swim))
    how = reader.below(3)
    if how == RAW or not 0 <= number < 1 << 64:
        signature = reader.sized(80) if reader.flag() else reader.take(64).ljust(64, b"\0")
    else:
        signer = who if how == SUBJECT and who != _JUNK_PEER else reader.below(len(_KEYS))
        signature = _sign(signer, peer, number)
    return [peer, number, signature]


def _state(reader: Reader) -> int:
    state = reader.below(4)
    return reader.uint(1) if state == 3 else state  # 3: any byte (mostly not a state)


def _body(reader: Reader, swim: Swim, model: _Model) -> tuple[type[Any], list[Any]]:
    """A message's fields: fuzzed msgpack, or well-formed with fuzzed updates."""
    cls = _MESSAGES[reader.below(3)]
    if reader.flag():
        value = loose_unpack(reader.sized(512))
        return cls, value if isinstance(value, list) else [value]
    updates = [
        [_statement(reader, swim, model), _state(reader)]
        for _ in range(reader.below(MAX_UPDATES + 1))
    ]
    if cls is SwimPing:
        return cls, [updates]
    if cls is SwimPingReq:
        target = _PEERS[reader.below(len(_PEERS))].raw
        addrs = ["/ip4/127.0.0.1/tcp/4001"] if reader.flag() else []
        return cls, [target, 1 + reader.uint(1), updates, addrs]
    return cls, [reader.flag(), updates]


# -- invariants --------------------------------------------------------------------------------


def _states(swim: Swim, model: _Model) -> dict[PeerId, MemberState | None]:
    return {peer: swim.state(peer) for peer in model.tracked}


def _check_probes(swim: Swim, actions: list[Action]) -> None:
    """Probes, direct and indirect, go to tracked live members via live members, never to us
    (a target that died of our suspicion is no longer probed in its period)."""
    for action in actions:
        if isinstance(action, Probe) and (
            action.target == _ME or swim.state(action.target) in (None, _DEAD)
        ):
            raise AssertionError(f"a probe of {action.target}, not a live member")
        if isinstance(action, IndirectProbe) and (
            action.target == _ME or swim.state(action.target) in (None, _DEAD)
        ):
            raise AssertionError(f"an indirect probe of {action.target}, not a live member")
        if isinstance(action, IndirectProbe):
            live = set(swim.live_members())
            if (
                action.target in action.via
                or not set(action.via) <= live
                or len(action.via) > swim.config.indirect_probes
            ):
                raise AssertionError(f"indirect probe of {action.target} via {action.via}")


def _check_receive(
    swim: Swim,
    model: _Model,
    updates: list[Update],
    actions: list[Action],
    before: dict[PeerId, MemberState | None],
    own_before: int,
) -> None:
    """What ``receive`` may do (SPEC.md 7a, "What an update may do")."""
    valid: dict[PeerId, list[Update]] = {}
    forged = at_max = 0
    for update in updates:
        if _valid(update.statement):
            valid.setdefault(update.peer, []).append(update)
            at_max += update.peer == _ME and update.incarnation >= MAX_INCARNATION
        else:
            forged += 1
    refused = {RejectReason.BAD_SIGNATURE: 0, RejectReason.BAD_FIELD: 0}
    for action in actions:
        if not isinstance(action, UpdateRejected):
            raise AssertionError(f"receive returned {action!r}: claims never kill or probe")
        if action.error.reason not in refused:
            raise AssertionError(f"an update refused as {action.error.reason}")
        refused[action.error.reason] += 1
    if refused[RejectReason.BAD_SIGNATURE] > forged:
        raise AssertionError("a statement signed by its subject was refused as forged")
    if refused[RejectReason.BAD_FIELD] > at_max:
        raise AssertionError("an update below 2^62 was refused as out of range")

    own = swim.incarnation
    mine = valid.get(_ME, [])
    if own != own_before and (own < own_before or own - 1 not in {u.incarnation for u in mine}):
        raise AssertionError(f"our incarnation went from {own_before} to {own} unrefuted")
    for update in mine:
        number = update.incarnation
        if own_before <= number < MAX_INCARNATION and (
            own < number or (own == number and update.state != _ALIVE)
        ):
            raise AssertionError(f"a claim about us at {number} was not refuted ({own})")

    for peer in model.tracked:
        was, now = before[peer], swim.state(peer)
        claims = valid.get(peer, [])
        held = model.held[peer]
        newer = max((u.incarnation for u in claims), default=-1) > held
        if now == _DEAD and was != _DEAD:
            raise AssertionError(f"a claim made {peer} dead: only our own timer may")
        if was == _DEAD and newer == (now == _DEAD):
            raise AssertionError(f"{peer} dead at {held}: {now!r} after statements {claims}")
        if was != _ALIVE and now == _ALIVE and not newer:
            raise AssertionError(f"{peer} cleared of {was!r} without a newer statement")
        if (
            was == _ALIVE
            and now == _SUSPECT
            and not any(u.state != _ALIVE and u.incarnation >= held for u in claims)
        ):
            raise AssertionError(f"{peer} suspected without a signed claim")
        if newer:
            model.held[peer] = max(u.incarnation for u in claims)


def _check_tick(
    swim: Swim,
    model: _Model,
    actions: list[Action],
    before: dict[PeerId, MemberState | None],
    now: float,
) -> None:
    """Only our own timer kills, and only a suspect whose suspicion time ran out."""
    died = set()
    for peer in model.tracked:
        was, state = before[peer], swim.state(peer)
        if was != _DEAD and state == _DEAD:
            if was != _SUSPECT:
                raise AssertionError(f"{peer} declared dead without being suspect")
            if now < model.suspect_since[peer] + swim.suspicion_s():
                raise AssertionError(f"{peer} declared dead before its suspicion time ran out")
            died.add(peer)
        elif was != state and (was, state) != (_ALIVE, _SUSPECT):
            raise AssertionError(f"a tick took {peer} from {was!r} to {state!r}")
    if {a.peer for a in actions if isinstance(a, MemberDead)} != died:
        raise AssertionError(f"MemberDead {actions} for the members that died: {died}")
    if any(isinstance(a, UpdateRejected) for a in actions):
        raise AssertionError("a tick rejected something")
    _check_probes(swim, actions)


def _probed(swim: Swim, model: _Model, target: PeerId, ok: bool, now: float) -> None:
    """A probe's outcome clears the target's suspicion (ok), nothing else."""
    before = _states(swim, model)
    actions = swim.probe_result(target, ok, now)
    for peer in model.tracked:
        was, state = before[peer], swim.state(peer)
        if was != state and (peer, ok, was, state) != (target, True, _SUSPECT, _ALIVE):
            raise AssertionError(f"probe result {ok} of {target} took {peer} to {state!r}")
    if not all(isinstance(a, IndirectProbe) for a in actions):
        raise AssertionError(f"a probe result gave {actions}")
    _check_probes(swim, actions)
    _observe(swim, model, now)


def _observe(swim: Swim, model: _Model, now: float) -> None:
    """The detector's standing invariants; notes when members became suspect."""
    live, dead = set(swim.live_members()), set(swim.dead_members())
    if live & dead or live | dead != model.tracked:
        raise AssertionError(f"tracking {live | dead}, added {model.tracked}")
    own = swim.statement
    if own.peer != _ME or own.number != swim.incarnation or not 0 <= own.number <= MAX_INCARNATION:
        raise AssertionError(f"our statement {own}")
    if not _valid(own):
        raise AssertionError("our own statement is not signed by us")
    for peer in model.tracked:
        if swim.state(peer) == _SUSPECT:
            model.suspect_since.setdefault(peer, now)
        else:
            model.suspect_since.pop(peer, None)
    wake = swim.wake_at()
    if not math.isfinite(wake):  # the driver would spin or never wake
        raise AssertionError(f"wake_at is {wake}")


def _check_piggyback(swim: Swim, model: _Model, to: PeerId | None, now: float) -> None:
    """What we would send next travels, and says only what its subjects signed."""
    updates = swim.piggyback(to)
    if not updates or updates[0] != Update(swim.statement, int(_ALIVE)):
        raise AssertionError("a message without our own statement first")
    for update in updates[1:]:
        peer = update.peer
        if peer == _ME or peer not in model.tracked:
            raise AssertionError(f"we spread {update}: an old statement of ours, or untracked")
        if not _valid(update.statement):
            raise AssertionError(f"we spread {update}, not signed by its subject")
        if update.incarnation > model.held[peer]:
            raise AssertionError(f"we spread {update} above what {peer} signed")
        if update.state == _DEAD and swim.state(peer) != _DEAD:
            raise AssertionError(f"we spread {update}, not dead here: a third party's word")
    if to is not None and to in model.tracked and model.held[to] >= 0:
        state = swim.state(to)
        if state != _ALIVE and (
            len(updates) < 2
            or updates[1].peer != to
            or (updates[1].incarnation, updates[1].state) != (model.held[to], state)
        ):
            raise AssertionError(f"a probe of {to} ({state!r}) without our claim about it")
    ping = SwimPing(updates=updates)
    seal(IDENTITIES[0], ping, now_ms=NOW_MS + int(now * 1000))
    try:
        decoded = through_wire(SwimPing, schema_of(SwimPing).encode(ping))
    except RemoteProtocolError as exc:
        raise AssertionError(f"a peer refuses what we send: {exc}") from exc
    if decoded != ping:
        raise AssertionError("what we send decodes to something else")


# -- the harness -------------------------------------------------------------------------------


def test_one_input(data: bytes) -> None:
    """A detector with three members, then a sequence of events."""
    reader = Reader(data)
    swim = Swim(IDENTITIES[0], SwimConfig(), random.Random(0), incarnation=NOW_MS)
    model = _Model()
    for peer in _MEMBERS:
        swim.add(peer)
        model.add(peer)
    now = 0.0
    _observe(swim, model, now)
    for _ in range(1 + reader.below(12)):
        before, own = _states(swim, model), swim.incarnation
        step = reader.below(6)
        if step == RECEIVE:
            cls, fields = _body(reader, swim, model)
            try:
                message = through_wire(cls, fields)
            except RemoteProtocolError:
                message = None  # refused whole: [malformed] or [bad_field]
            if message is not None:
                actions = swim.receive(message.updates, now)
                _check_receive(swim, model, message.updates, actions, before, own)
        elif step == TICK:
            now = max(now, swim.wake_at()) if reader.flag() else now + reader.uint(2) / 1000
            actions = swim.tick(now)
            _check_tick(swim, model, actions, before, now)
            _observe(swim, model, now)
            for action in actions:
                if isinstance(action, Probe | IndirectProbe) and reader.flag():
                    _probed(swim, model, action.target, reader.flag(), now)
        elif step == PROBED:
            _probed(swim, model, _PEERS[reader.below(len(_PEERS))], reader.flag(), now)
        elif step == RECHECK:
            peer = _PEERS[reader.below(len(_PEERS))]
            actions = swim.recheck(peer, now)
            expected = [Probe(peer, now + swim.config.probe_timeout_s)]
            if actions != (expected if before.get(peer) == _DEAD else []):
                raise AssertionError(f"recheck of {peer} ({before.get(peer)!r}): {actions}")
            if actions and reader.flag():
                _probed(swim, model, peer, reader.flag(), now)
        elif step == FORGET:
            peer = _PEERS[reader.below(len(_PEERS))]
            swim.forget(peer)
            model.forget(peer)
        else:
            peer = _PEERS[reader.below(len(_PEERS))]
            swim.add(peer)
            model.add(peer)
        if step != RECEIVE and swim.incarnation != own:
            raise AssertionError(f"our incarnation changed outside receive (step {step})")
        _observe(swim, model, now)
        to = reader.below(len(_PEERS) + 1)
        _check_piggyback(swim, model, _PEERS[to] if to < len(_PEERS) else None, now)


# -- seeds -------------------------------------------------------------------------------------


def _update(
    w: Writer, who: int, kind: int, value: int, state: int, *, how: int = SUBJECT, signer: int = 0
) -> Writer:
    """Writes what :func:`_statement` and :func:`_state` read as ``[[_PEERS[who], number,
    signature], state]``, the number chosen by ``kind`` and its byte ``value`` (``how`` =
    RAW writes a zero signature; in range, OTHER signs with ``_KEYS[signer]``)."""
    w.below(len(_PEERS) + 1, who).below(6, kind)
    w.uint({SMALL: 1, NEAR_START: 1, NEAR_HELD: 1, NEAR_MAX: 1, WIRE_TOP: 1}.get(kind, 8), value)
    w.below(3, how)
    number = {
        SMALL: value,
        NEAR_START: NOW_MS + value - 128,
        NEAR_MAX: MAX_INCARNATION + 2 - value,
        WIRE_TOP: (1 << 64) - 1 - value,
        ANY: value,
    }.get(kind, 0)
    if how == RAW or (kind != NEAR_HELD and number >= 1 << 64):
        w.uint(1, 0).raw(bytes(64))
    elif how == OTHER:
        w.below(len(_KEYS), signer)
    return w.below(4, state)


def _receive(w: Writer, cls: int, count: int) -> Writer:
    """The head of a RECEIVE step of a well-formed message with ``count`` updates (SwimAck:
    the ``ok`` flag follows the updates; SwimPingReq: target, timeout and addrs)."""
    return w.below(6, RECEIVE).below(3, cls).uint(1, 0).below(MAX_UPDATES + 1, count)


def _to(w: Writer, to: int | None = None) -> Writer:
    return w.below(len(_PEERS) + 1, len(_PEERS) if to is None else to)


def seeds() -> Iterator[bytes]:
    """Honest statements; a third party's suspicion run out by our own timer; a recheck of the
    dead member and its revival above its death; a claim about us refuted; forged, raw and
    stranger's statements; probes failing; a fuzzed ping request."""
    w = Writer().below(12, 4)  # 5 steps
    # an ack: member 1 alive at its start, member 2 alive, then suspected by a third party
    _receive(w, 2, 3)
    _update(w, 1, NEAR_START, 128, 0)
    _update(w, 2, NEAR_START, 130, 0)
    _update(w, 2, NEAR_START, 130, 1)
    w.uint(1, 1)  # ok
    _to(w, 2)
    # one second later member 2's suspicion has run out: dead; a probe goes unanswered
    w.below(6, TICK).uint(1, 0).uint(2, 1000).uint(1, 0)
    _to(w, 2)
    # a recheck of member 2 (a probe, unanswered), then its statement above the death
    w.below(6, RECHECK).below(len(_PEERS), 2).uint(1, 0)
    _to(w, 2)
    _receive(w, 0, 1)
    _update(w, 2, NEAR_START, 131, 0)
    _to(w)
    # a claim about us at our number: refuted
    _receive(w, 0, 1)
    _update(w, 0, NEAR_HELD, 16, 1)
    _to(w, 1)
    yield w.build()

    w = Writer().below(12, 3)  # 4 steps
    # forged: member 1's statement signed by member 2, a raw signature, a stranger's statement
    _receive(w, 0, 3)
    _update(w, 1, NEAR_START, 140, 2, how=OTHER, signer=2)
    _update(w, 3, NEAR_START, 140, 1, how=RAW)
    _update(w, 4, NEAR_START, 128, 2)
    _to(w, 4)
    # a probe fails (indirect probes follow), the period ends: suspect by our own timer
    w.below(6, TICK).uint(1, 1).uint(1, 1).uint(1, 0)
    _to(w)
    w.below(6, TICK).uint(1, 0).uint(2, 600).uint(1, 0)
    _to(w)
    w.below(6, FORGET).below(len(_PEERS), 3)
    _to(w, 3)
    yield w.build()

    yield (
        Writer()
        .below(12, 0)
        .below(6, RECEIVE)
        .below(3, 1)
        .uint(1, 1)
        .sized(
            pack(
                schema_of(SwimPingReq).encode(
                    SwimPingReq(target=_PEERS[1], timeout_ms=5, updates=[])
                )
            )
        )
        .build()
    )


def incarnation_overflow() -> bytes:
    """``fuzz/crashes/swim/incarnation-overflow``: claims suspecting us, signed by us, at
    2^64 - 1 and 2^62 + 1 (refused whole by the codec, [bad_field]) and at 2^62 (taken, but
    refuting it would leave the range: an ``UpdateRejected`` [bad_field]); what we send next
    seals."""
    w = Writer().below(12, 2)  # 3 steps
    _receive(w, 0, 1)
    _update(w, 0, WIRE_TOP, 0, 1)
    _to(w)
    _receive(w, 2, 1)
    _update(w, 0, NEAR_MAX, 1, 1)
    w.uint(1, 1)
    _to(w)
    _receive(w, 0, 1)
    _update(w, 0, NEAR_MAX, 2, 1)
    _to(w, 1)
    return w.build()
