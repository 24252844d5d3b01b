"""SWIM failure detection as a sans-IO state machine (Das, Gupta, Motivala, DSN 2002).

Theory of operation (SPEC.md, "Failure detection"). Time is cut into protocol periods of
``period_s``. In each period the detector probes one member, taken round-robin from a list it
reshuffles every pass (so every member is probed within two passes):

1. **direct probe**: :class:`Probe` ``(target, deadline = now + probe_timeout_s)``; the driver
   sends a signed ping and reports :meth:`probe_result`;
2. if it failed, **indirect probes**: :class:`IndirectProbe` asks ``indirect_probes`` other
   members to ping the target for us, deadline the end of the period;
3. if nothing came back by the end of the period the target becomes **suspect** (not dead:
   it may just be slow, or a link may be lossy), and it is probed again in the next period.

A suspect that is not cleared within ``suspicion_s`` (``suspicion_mult x log2(n+1) x
period_s``) is declared **dead**. Suspicion is cleared by a successful probe, or by the suspect
itself: when it hears it is suspected it **refutes** by raising its own incarnation number and
announcing itself alive. Updates are disseminated by piggybacking on probes, each update sent
``retransmit_mult x log2(n+1)`` times, newest first; a ping to a member we suspect (or hold
dead) also carries that claim, so the member hears it and can refute at once.

**Who may say what.** An incarnation exists only as its subject's signed
:class:`Incarnation` statement (``peer``, ``number``, Ed25519 signature), and every
:class:`Update` carries one: ``alive`` at ``number`` is the subject's own word; ``suspect`` or
``dead`` is a third party's claim *at an incarnation the subject signed*. So nobody but X can
raise X's incarnation, and a claim about X can never name a number X cannot outrank by one.
A third party's claim does less than SWIM's: ``suspect`` and ``dead`` both only make us
*suspect* X at that incarnation (never above what X signed); X becomes dead here only when our
own suspicion timer runs out without a refutation. A dead member comes back only with a signed
statement above the incarnation it died at; a restarted member learns the number it died at
from the claim itself (signed by its past life) and refutes above it. Updates about members
we do not track are ignored: membership is entered by signed records, not by SWIM.

The core has no clock and no randomness of its own: ``now`` comes with every call and
``rng`` is handed in, so tests replay exactly.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass

from ..codec import bounded
from ..errors import RemoteProtocolError
from ..identity import Identity, PeerId
from ..stats import RejectReason

__all__ = [
    "INCARNATION_DOMAIN",
    "MAX_INCARNATION",
    "Incarnation",
    "IndirectProbe",
    "MemberDead",
    "MemberState",
    "Probe",
    "UpdateRejected",
    "Swim",
    "SwimConfig",
    "Update",
]

INCARNATION_DOMAIN = b"meshfed-swim-incarnation-v1"
#: the largest incarnation anyone signs or accepts. A node starts at the wall clock in ms
#: (about 2^41 today) and steps up by one per refutation, each of which needs a claim at its
#: current number: it never gets near this bound, and one step above it still fits the codec.
MAX_INCARNATION = 2**62


class MemberState(enum.IntEnum):
    """What a detector believes about a member (ordered by precedence at equal incarnation)."""

    #: answered recently, or refuted suspicion
    ALIVE = 0
    #: missed a probe and the indirect probes; dead unless cleared within the suspicion time
    SUSPECT = 1
    #: confirmed failed; removed from probing
    DEAD = 2


@dataclass(frozen=True, slots=True)
class Incarnation:
    """``peer`` says it is alive at incarnation ``number``, signed by ``peer``.

    The signed bytes are ``INCARNATION_DOMAIN || peer || number`` (8 bytes, big-endian).
    """

    peer: PeerId
    number: int = bounded(ge=0, le=MAX_INCARNATION)
    signature: bytes = bounded(min_len=64, max_len=64)

    @classmethod
    def sign(cls, identity: Identity, number: int) -> Incarnation:
        """Our own statement at ``number``."""
        if not 0 <= number <= MAX_INCARNATION:
            raise ValueError(f"incarnation {number} outside [0, {MAX_INCARNATION}]")
        return cls(identity.peer_id, number, identity.sign(_signed(identity.peer_id, number)))

    def valid(self) -> bool:
        """True if ``peer`` signed it (and the number is in range)."""
        return 0 <= self.number <= MAX_INCARNATION and self.peer.verify(
            self.signature, _signed(self.peer, self.number)
        )


def _signed(peer: PeerId, number: int) -> bytes:
    return INCARNATION_DOMAIN + peer.raw + number.to_bytes(8, "big")


@dataclass(frozen=True, slots=True)
class Update:
    """A membership fact to disseminate: ``statement.peer`` is ``state`` at its incarnation.

    ``alive`` is the subject's own signed word; ``suspect`` and ``dead`` are the sender's claim
    at an incarnation the subject signed.
    """

    statement: Incarnation
    state: int = bounded(ge=0, le=2)

    @property
    def peer(self) -> PeerId:
        """The member the update is about."""
        return self.statement.peer

    @property
    def incarnation(self) -> int:
        """The incarnation it is about."""
        return self.statement.number


@dataclass(frozen=True, slots=True, kw_only=True)
class SwimConfig:
    """Timers and fan-outs. The defaults detect a crash in about 2-3 s in a 1,000-node mesh."""

    period_s: float = 0.5
    probe_timeout_s: float = 0.15
    indirect_probes: int = 3
    suspicion_mult: float = 1.0
    retransmit_mult: float = 3.0
    max_piggyback: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout_s < self.period_s:
            raise ValueError("probe_timeout_s must be > 0 and shorter than period_s")
        if self.indirect_probes < 0 or self.max_piggyback < 0:
            raise ValueError("indirect_probes and max_piggyback must be >= 0")
        if self.suspicion_mult <= 0 or self.retransmit_mult <= 0:
            raise ValueError("suspicion_mult and retransmit_mult must be > 0")


@dataclass(frozen=True, slots=True)
class Probe:
    """Action: ping ``target`` directly; report with ``probe_result`` by ``deadline``."""

    target: PeerId
    deadline: float


@dataclass(frozen=True, slots=True)
class IndirectProbe:
    """Action: ask each of ``via`` to ping ``target`` for us; report any success."""

    target: PeerId
    via: tuple[PeerId, ...]
    deadline: float


@dataclass(frozen=True, slots=True)
class MemberDead:
    """Action (a notification): ``peer`` was declared dead."""

    peer: PeerId


@dataclass(frozen=True, slots=True)
class UpdateRejected:
    """Action (a notification): an update was refused; the driver counts ``error.reason``."""

    error: RemoteProtocolError


Action = Probe | IndirectProbe | MemberDead | UpdateRejected


@dataclass(slots=True)
class _Member:
    state: MemberState
    #: the newest statement the member signed that we hold (``None``: none heard yet)
    statement: Incarnation | None = None
    suspect_since: float = 0.0

    @property
    def incarnation(self) -> int:
        return -1 if self.statement is None else self.statement.number


class Swim:
    """The failure detector of one node. See the module docstring.

    Args:
        identity: our identity (never probed; it signs our incarnations).
        config: timers and fan-outs.
        rng: the only source of randomness (probe order, indirect helpers).
        incarnation: our starting incarnation. Pass the wall clock in milliseconds at start,
            so that a restarted node usually outranks its last life at once (if not, it
            refutes above the number it died at as soon as it hears of its death).
    """

    def __init__(
        self, identity: Identity, config: SwimConfig, rng: random.Random, *, incarnation: int = 0
    ) -> None:
        self.me = identity.peer_id
        self.config = config
        self._identity = identity
        self._own = Incarnation.sign(identity, min(incarnation, MAX_INCARNATION // 2))
        self._rng = rng
        self._members: dict[PeerId, _Member] = {}
        self._order: list[PeerId] = []
        self._next_period = 0.0
        self._probing: PeerId | None = None
        self._probe_acked = False
        self._indirect_sent = False
        self._period_end = 0.0
        self._gossip: dict[PeerId, tuple[Update, int]] = {}  # update, sends left

    @property
    def incarnation(self) -> int:
        """Our current incarnation."""
        return self._own.number

    @property
    def statement(self) -> Incarnation:
        """Our current signed incarnation."""
        return self._own

    # -- membership ----------------------------------------------------------------------------

    def state(self, peer: PeerId) -> MemberState | None:
        """What we believe about ``peer`` (``None`` if never heard of)."""
        member = self._members.get(peer)
        return None if member is None else member.state

    def dead_members(self) -> list[PeerId]:
        """Members we declared dead (and still remember)."""
        return [p for p, m in self._members.items() if m.state == MemberState.DEAD]

    def live_members(self) -> list[PeerId]:
        """Members believed alive or suspect."""
        return [p for p, m in self._members.items() if m.state != MemberState.DEAD]

    def add(self, peer: PeerId) -> None:
        """Start tracking ``peer`` as alive (from a record or a bootstrap)."""
        if peer != self.me and peer not in self._members:
            self._members[peer] = _Member(MemberState.ALIVE)

    def forget(self, peer: PeerId) -> None:
        """Stop tracking ``peer`` (it left our partial view; this is not a death)."""
        self._members.pop(peer, None)
        self._gossip.pop(peer, None)
        if self._probing == peer:
            self._probing = None

    def recheck(self, peer: PeerId, now: float) -> list[Action]:
        """A member we hold dead may be back (a newer record, a new connection): ping it now,
        telling it of its death, so that it answers with an incarnation above it."""
        member = self._members.get(peer)
        if member is None or member.state != MemberState.DEAD:
            return []
        return [Probe(peer, now + self.config.probe_timeout_s)]

    # -- the protocol period -------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Advance to ``now``; returns what the driver must do. Call it at :meth:`wake_at`."""
        actions: list[Action] = []
        actions += self._expire_suspicions(now)
        if self._probing is not None and not self._probe_acked:
            if not self._indirect_sent and now >= self._period_end - self._indirect_window():
                actions += self._indirect(now)
            if now >= self._period_end:
                self._suspect(self._probing, now)
                self._probing = None
        if now >= self._next_period:
            self._probing = self._next_target()
            self._probe_acked = False
            self._indirect_sent = False
            self._period_end = now + self.config.period_s
            self._next_period = self._period_end
            if self._probing is not None:
                actions.append(Probe(self._probing, now + self.config.probe_timeout_s))
        return actions

    def wake_at(self) -> float:
        """The next time :meth:`tick` has something to do."""
        times = [self._next_period]
        if self._probing is not None and not self._probe_acked:
            times.append(self._period_end)
            if not self._indirect_sent:
                times.append(self._period_end - self._indirect_window())
        times += [m.suspect_since + self.suspicion_s() for m in self._suspects()]
        return min(times)

    def _indirect_window(self) -> float:
        return self.config.period_s - self.config.probe_timeout_s

    def probe_result(self, target: PeerId, ok: bool, now: float) -> list[Action]:
        """Report a direct or indirect probe's outcome. A member we hold dead is not revived
        by an answer alone: only by a signed incarnation above its death (see :meth:`receive`).
        """
        if not ok:
            if target == self._probing and not self._indirect_sent:
                return self._indirect(now)
            return []
        if target == self._probing:
            self._probe_acked = True
        member = self._members.get(target)
        if member is not None and member.state == MemberState.SUSPECT:
            member.state = MemberState.ALIVE
            self._spread(target, member)
        return []

    def _indirect(self, now: float) -> list[Action]:
        assert self._probing is not None
        self._indirect_sent = True
        helpers = [p for p in self.live_members() if p != self._probing]
        via = tuple(self._rng.sample(helpers, min(self.config.indirect_probes, len(helpers))))
        if not via:
            return []
        return [IndirectProbe(self._probing, via, self._period_end)]

    def _next_target(self) -> PeerId | None:
        while True:
            if not self._order:
                self._order = self.live_members()
                self._rng.shuffle(self._order)
                if not self._order:
                    return None
            peer = self._order.pop()
            if peer in self._members and self._members[peer].state != MemberState.DEAD:
                return peer

    def _suspects(self) -> list[_Member]:
        return [m for m in self._members.values() if m.state == MemberState.SUSPECT]

    def suspicion_s(self) -> float:
        """How long a suspect has to refute before it is declared dead."""
        n = len(self._members)
        return self.config.suspicion_mult * math.log2(n + 1) * self.config.period_s

    def _suspect(self, peer: PeerId, now: float) -> None:
        member = self._members[peer]
        if member.state == MemberState.ALIVE:
            member.state = MemberState.SUSPECT
            member.suspect_since = now
            self._spread(peer, member)
            self._order.append(peer)  # probe it again next period (and tell it)

    def _expire_suspicions(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for peer, member in self._members.items():
            if (
                member.state == MemberState.SUSPECT
                and now >= member.suspect_since + self.suspicion_s()
            ):
                member.state = MemberState.DEAD
                self._spread(peer, member)
                actions.append(MemberDead(peer))
                if self._probing == peer:  # dead now: no indirect probe, no second suspicion
                    self._probing = None
        return actions

    # -- dissemination -------------------------------------------------------------------------

    def _sends(self) -> int:
        return math.ceil(self.config.retransmit_mult * math.log2(len(self._members) + 2))

    def _spread(self, peer: PeerId, member: _Member) -> None:
        if member.statement is not None:  # without the member's statement we cannot say it
            self._gossip[peer] = (Update(member.statement, int(member.state)), self._sends())

    def piggyback(self, to: PeerId | None = None) -> list[Update]:
        """Updates to attach to the next outgoing probe or answer (counts them as sent): our
        own statement, what we believe of ``to`` if that is not alive, then the newest news."""
        out = [Update(self._own, int(MemberState.ALIVE))]
        member = None if to is None else self._members.get(to)
        if member is not None and member.state != MemberState.ALIVE and member.statement:
            out.append(Update(member.statement, int(member.state)))
        chosen = sorted(self._gossip.items(), key=lambda item: -item[1][1])
        for peer, (update, left) in chosen[: self.config.max_piggyback]:
            if update not in out:
                out.append(update)
            if left <= 1:
                del self._gossip[peer]
            else:
                self._gossip[peer] = (update, left - 1)
        return out

    def receive(self, updates: list[Update], now: float) -> list[Action]:
        """Apply updates heard from a peer; refute claims against ourselves. Each forged
        update comes back as a :class:`UpdateRejected` action; the others still apply."""
        actions: list[Action] = []
        for update in updates:
            if update.peer == self.me:
                actions += self._about_me(update)
                continue
            member = self._members.get(update.peer)
            if member is None:
                continue  # not a member of ours: records decide who is, not SWIM
            if update.incarnation < member.incarnation:
                continue  # old news
            if update.statement != member.statement and not update.statement.valid():
                actions.append(_forged(update))
                continue
            self._apply(update, member, now)
        return actions

    def _apply(self, update: Update, member: _Member, now: float) -> None:
        peer, claim = update.peer, MemberState(update.state)
        if update.incarnation > member.incarnation:
            # The member signed a newer incarnation: it was alive then, whatever it was here.
            member.statement = update.statement
            member.state = MemberState.ALIVE
            if claim != MemberState.ALIVE:
                member.state, member.suspect_since = MemberState.SUSPECT, now
            self._spread(peer, member)
            return
        if claim != MemberState.ALIVE and member.state == MemberState.ALIVE:
            # A third party's suspect or dead: only suspicion, ours times out or is refuted.
            member.state, member.suspect_since = MemberState.SUSPECT, now
            self._spread(peer, member)

    def _about_me(self, update: Update) -> list[Action]:
        number = update.incarnation
        if number < self._own.number or (
            number == self._own.number and update.state == MemberState.ALIVE
        ):
            return []
        if update.statement != self._own and not update.statement.valid():
            return [_forged(update)]
        # A claim at our current incarnation, or one our past life signed: refute above it.
        if number >= MAX_INCARNATION:
            return [_rejected(f"cannot refute above incarnation {number}", RejectReason.BAD_FIELD)]
        self._own = Incarnation.sign(self._identity, number + 1)
        self._gossip[self.me] = (Update(self._own, int(MemberState.ALIVE)), self._sends())
        return []


def _rejected(why: str, reason: RejectReason) -> UpdateRejected:
    return UpdateRejected(RemoteProtocolError(why, reason=reason))


def _forged(update: Update) -> UpdateRejected:
    return _rejected(
        f"incarnation {update.incarnation} of {update.peer} is not signed by it",
        RejectReason.BAD_SIGNATURE,
    )
