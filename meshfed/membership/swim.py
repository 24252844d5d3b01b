"""SWIM failure detection as a sans-IO state machine (Das, Gupta, Motivala, DSN 2002).

Theory of operation (SPEC.md, "Failure detection"). Time is cut into protocol periods of
``period_s``. In each period the detector probes one member, taken round-robin from a list it
reshuffles every pass (so every member is probed within two passes):

1. **direct probe**: :class:`Probe` ``(target, deadline = now + probe_timeout_s)``; the driver
   sends a signed ping and reports :meth:`probe_result`;
2. if it failed, **indirect probes**: :class:`IndirectProbe` asks ``indirect_probes`` other
   members to ping the target for us, deadline the end of the period;
3. if nothing came back by the end of the period the target becomes **suspect** (not dead:
   it may just be slow, or a link may be lossy).

A suspect that is not cleared within ``suspicion_s`` (``suspicion_mult x log2(n+1) x
period_s``) is declared **dead**. Suspicion is cleared by a successful probe, or by the suspect
itself: when it hears it is suspected it **refutes** by raising its own incarnation number and
announcing itself alive. Updates (alive / suspect / dead with incarnation) are disseminated by
piggybacking on probes, each update sent ``retransmit_mult x log2(n+1)`` times, newest first.
Precedence (SWIM section 4.2): for the same member, a higher incarnation wins; at equal
incarnation suspect overrides alive and dead overrides both.

The core has no clock and no randomness of its own: ``now`` comes with every call and
``rng`` is handed in, so tests replay exactly.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass

from ..codec import bounded
from ..identity import PeerId

__all__ = [
    "IndirectProbe",
    "MemberDead",
    "MemberState",
    "Probe",
    "Swim",
    "SwimConfig",
    "Update",
]


class MemberState(enum.IntEnum):
    """What a detector believes about a member (ordered by precedence at equal incarnation)."""

    #: answered recently, or refuted suspicion
    ALIVE = 0
    #: missed a probe and the indirect probes; dead unless cleared within the suspicion time
    SUSPECT = 1
    #: confirmed failed; removed from probing
    DEAD = 2


@dataclass(frozen=True, slots=True)
class Update:
    """A membership fact to disseminate: ``peer`` is ``state`` at ``incarnation``."""

    peer: PeerId
    state: int = bounded(ge=0, le=2)
    incarnation: int = bounded(ge=0)


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


Action = Probe | IndirectProbe | MemberDead


@dataclass(slots=True)
class _Member:
    state: MemberState
    incarnation: int
    suspect_since: float = 0.0


class Swim:
    """The failure detector of one node. See the module docstring.

    Args:
        me: our own peer id (never probed; our incarnation lives here).
        config: timers and fan-outs.
        rng: the only source of randomness (probe order, indirect helpers).
        incarnation: our starting incarnation. Pass the wall clock in milliseconds at start,
            so that a restarted node always outranks what the mesh remembers of its last life
            (dead included).
    """

    def __init__(
        self, me: PeerId, config: SwimConfig, rng: random.Random, *, incarnation: int = 0
    ) -> None:
        self.me = me
        self.config = config
        self.incarnation = incarnation
        self._rng = rng
        self._members: dict[PeerId, _Member] = {}
        self._order: list[PeerId] = []
        self._next_period = 0.0
        self._probing: PeerId | None = None
        self._probe_acked = False
        self._indirect_sent = False
        self._period_end = 0.0
        self._gossip: dict[PeerId, tuple[Update, int]] = {}  # update, sends left

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

    def add(self, peer: PeerId, *, incarnation: int = 0) -> None:
        """Start tracking ``peer`` as alive (from a record or a bootstrap)."""
        if peer != self.me and peer not in self._members:
            self._members[peer] = _Member(MemberState.ALIVE, incarnation)

    def forget(self, peer: PeerId) -> None:
        """Stop tracking ``peer`` (it left our partial view; this is not a death)."""
        self._members.pop(peer, None)
        self._gossip.pop(peer, None)
        if self._probing == peer:
            self._probing = None

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
        """Report a direct or indirect probe's outcome."""
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
        return actions

    # -- dissemination -------------------------------------------------------------------------

    def _spread(self, peer: PeerId, member: _Member) -> None:
        sends = math.ceil(self.config.retransmit_mult * math.log2(len(self._members) + 2))
        self._gossip[peer] = (Update(peer, int(member.state), member.incarnation), sends)

    def piggyback(self) -> list[Update]:
        """Updates to attach to the next outgoing probe or answer (counts them as sent)."""
        chosen = sorted(self._gossip.items(), key=lambda item: -item[1][1])
        chosen = chosen[: self.config.max_piggyback]
        out = []
        for peer, (update, left) in chosen:
            out.append(update)
            if left <= 1:
                del self._gossip[peer]
            else:
                self._gossip[peer] = (update, left - 1)
        return out

    def receive(self, updates: list[Update], now: float) -> list[Action]:
        """Apply updates heard from a peer; refute suspicion of ourselves."""
        actions: list[Action] = []
        for update in updates:
            if update.peer == self.me:
                if update.state != MemberState.ALIVE and update.incarnation >= self.incarnation:
                    self.incarnation = update.incarnation + 1  # refute
                    self._gossip[self.me] = (
                        Update(self.me, int(MemberState.ALIVE), self.incarnation),
                        math.ceil(self.config.retransmit_mult * math.log2(len(self._members) + 2)),
                    )
                continue
            member = self._members.get(update.peer)
            state = MemberState(update.state)
            if member is None:
                if state == MemberState.DEAD:
                    continue
                member = self._members[update.peer] = _Member(state, update.incarnation, now)
                self._spread(update.peer, member)
                continue
            newer = update.incarnation > member.incarnation or (
                update.incarnation == member.incarnation and state > member.state
            )
            rejoined = state == MemberState.ALIVE and update.incarnation > member.incarnation
            if not newer or (member.state == MemberState.DEAD and not rejoined):
                continue
            was = member.state
            member.state, member.incarnation = state, update.incarnation
            if state == MemberState.SUSPECT and was != MemberState.SUSPECT:
                member.suspect_since = now
            if state == MemberState.DEAD:
                actions.append(MemberDead(update.peer))
            self._spread(update.peer, member)
        return actions
