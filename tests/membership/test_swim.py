"""SWIM: crashed members are found dead within the protocol bound; live ones are not."""

from __future__ import annotations

import heapq
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.identity import Identity, PeerId
from meshfed.membership.swim import (
    MAX_INCARNATION,
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

CONFIG = SwimConfig(period_s=0.5, probe_timeout_s=0.15)


class Cluster:
    """N detectors and a plain-Python network in virtual time (latency, loss, crashes)."""

    def __init__(self, n: int, *, seed: int = 0, loss: float = 0.0, latency: float = 0.01) -> None:
        self.rng = random.Random(seed)
        identities = [Identity.generate() for _ in range(n)]
        self.ids = [identity.peer_id for identity in identities]
        self.nodes = {
            identity.peer_id: Swim(identity, CONFIG, random.Random(seed * 1000 + i))
            for i, identity in enumerate(identities)
        }
        for node in self.nodes.values():
            for peer in self.ids:
                node.add(peer)
        self.loss, self.latency = loss, latency
        self.crashed: set[PeerId] = set()
        self.dead_at: dict[tuple[PeerId, PeerId], float] = {}
        self.now = 0.0
        self.queue: list[tuple[float, int, str, tuple[object, ...]]] = []
        self.counter = 0

    def at(self, when: float, kind: str, *args: object) -> None:
        self.counter += 1
        heapq.heappush(self.queue, (when, self.counter, kind, args))

    def delivered(self) -> bool:
        return self.rng.random() >= self.loss

    def ping(
        self, source: PeerId, target: PeerId, deadline: float, on_ok: tuple[object, ...]
    ) -> None:
        """A request/response ping with piggybacked updates both ways."""
        rtt = 2 * self.latency
        if target in self.crashed or not self.delivered() or not self.delivered():
            return
        if self.now + rtt > deadline:
            return
        updates_out = self.nodes[source].piggyback(to=target)
        self.at(self.now + self.latency, "updates", target, updates_out)
        updates_back = self.nodes[target].piggyback(to=source)
        self.at(self.now + rtt, "updates", source, updates_back)
        self.at(self.now + rtt, *on_ok)  # type: ignore[arg-type]

    def run_actions(self, peer: PeerId, actions: list[object]) -> None:
        for action in actions:
            if isinstance(action, Probe):
                self.ping(peer, action.target, action.deadline, ("ok", peer, action.target))
            elif isinstance(action, IndirectProbe):
                for helper in action.via:
                    if helper in self.crashed or not self.delivered():
                        continue
                    self.now += self.latency
                    self.ping(helper, action.target, action.deadline, ("ok", peer, action.target))
                    self.now -= self.latency
            elif isinstance(action, MemberDead):
                self.dead_at.setdefault((peer, action.peer), self.now)

    def run(self, until: float) -> None:
        for peer in self.ids:
            self.at(0.0, "tick", peer)
        while self.queue and self.queue[0][0] <= until:
            self.now, _, kind, args = heapq.heappop(self.queue)
            peer = args[0]
            assert isinstance(peer, PeerId)
            if peer in self.crashed:
                continue
            node = self.nodes[peer]
            if kind == "tick":
                self.run_actions(peer, node.tick(self.now))
                self.at(max(node.wake_at(), self.now + 1e-3), "tick", peer)
            elif kind == "ok":
                self.run_actions(peer, node.probe_result(args[1], True, self.now))  # type: ignore[arg-type]
            elif kind == "updates":
                self.run_actions(peer, node.receive(args[1], self.now))  # type: ignore[arg-type]


def detection_bound(n: int) -> float:
    detector = Swim(Identity.generate(), CONFIG, random.Random(0))
    for _ in range(n - 1):
        detector.add(Identity.generate().peer_id)
    # probed within two passes (2n periods worst case is loose); suspected within a period,
    # then the suspicion timeout, then gossip of the death.
    return detector.suspicion_s() + 4 * CONFIG.period_s * n


def test_crashed_members_are_declared_dead_by_every_live_member() -> None:
    cluster = Cluster(20, seed=1)
    victims = set(cluster.ids[:2])
    cluster.crashed = victims
    cluster.run(until=detection_bound(20))
    live = [p for p in cluster.ids if p not in victims]
    for peer in live:
        for victim in victims:
            assert cluster.nodes[peer].state(victim) == MemberState.DEAD
        for other in live:
            if other != peer:
                assert cluster.nodes[peer].state(other) == MemberState.ALIVE


def test_no_false_positives_under_loss_thanks_to_indirect_probes() -> None:
    cluster = Cluster(20, seed=2, loss=0.02)
    cluster.run(until=30.0)
    false_deaths = [(a, b) for (a, b) in cluster.dead_at]
    assert false_deaths == []


def alive(identity: Identity, number: int) -> Update:
    return Update(Incarnation.sign(identity, number), int(MemberState.ALIVE))


def claim(identity: Identity, number: int, state: MemberState) -> Update:
    return Update(Incarnation.sign(identity, number), int(state))


def pair(incarnation: int = 5) -> tuple[Identity, Swim, Identity, Swim]:
    """``me`` at ``incarnation`` and an observer tracking it, who heard its statement."""
    me, other = Identity.generate(), Identity.generate()
    node = Swim(me, CONFIG, random.Random(0), incarnation=incarnation)
    node.add(other.peer_id)
    observer = Swim(other, CONFIG, random.Random(1))
    observer.add(me.peer_id)
    observer.receive(node.piggyback(), now=0.0)
    return me, node, other, observer


def test_a_suspected_member_refutes_and_stays_alive() -> None:
    me, node, _other, observer = pair(5)
    node.receive([claim(me, 5, MemberState.SUSPECT)], now=1.0)
    assert node.incarnation == 6
    assert alive(me, 6) in node.piggyback()
    # ... and the others take the refutation over their suspicion.
    observer.receive([claim(me, 5, MemberState.SUSPECT)], now=1.0)
    assert observer.state(me.peer_id) == MemberState.SUSPECT
    observer.receive([alive(me, 6)], now=1.1)
    assert observer.state(me.peer_id) == MemberState.ALIVE
    observer.tick(1.1 + observer.suspicion_s() + 1)
    assert observer.state(me.peer_id) == MemberState.ALIVE


def test_a_third_party_dead_claim_is_only_suspicion_until_our_own_timeout() -> None:
    me, _node, _other, observer = pair(1000)
    assert observer.receive([claim(me, 1000, MemberState.DEAD)], now=1.0) == []
    assert observer.state(me.peer_id) == MemberState.SUSPECT
    deadline = 1.0 + observer.suspicion_s()
    observer.tick(deadline - 0.01)
    assert observer.state(me.peer_id) == MemberState.SUSPECT
    assert MemberDead(me.peer_id) in observer.tick(deadline)
    observer.receive([alive(me, 1000)], now=deadline + 1)
    assert observer.state(me.peer_id) == MemberState.DEAD  # an old alive does not resurrect


def test_a_restarted_member_outranks_its_death_whatever_its_clock() -> None:
    me, _node, other, observer = pair(1000)
    observer.receive([claim(me, 1000, MemberState.DEAD)], now=1.0)
    observer.tick(1.0 + observer.suspicion_s())
    assert observer.state(me.peer_id) == MemberState.DEAD
    # Restarted with a clock behind its last life: the death notice it hears in a ping
    # names the number it died at (signed by its past self), and it refutes above it.
    restarted = Swim(me, CONFIG, random.Random(2), incarnation=10)
    restarted.add(other.peer_id)
    assert observer.recheck(me.peer_id, now=5.0) == [Probe(me.peer_id, 5.0 + 0.15)]
    ping = observer.piggyback(to=me.peer_id)
    assert claim(me, 1000, MemberState.DEAD) in ping
    restarted.receive(ping, now=5.0)
    assert restarted.incarnation == 1001
    observer.receive(restarted.piggyback(to=other.peer_id), now=5.01)
    assert observer.state(me.peer_id) == MemberState.ALIVE


def test_an_overflowing_suspicion_is_out_of_range_and_cannot_be_signed() -> None:
    me = Identity.generate()
    with pytest.raises(ValueError, match="outside"):
        Incarnation.sign(me, 2**64 - 1)
    forged = Incarnation(me.peer_id, MAX_INCARNATION, bytes(64))
    node = Swim(me, CONFIG, random.Random(0), incarnation=5)
    actions = node.receive([Update(forged, int(MemberState.SUSPECT))], now=0.0)
    assert [type(a) for a in actions] == [UpdateRejected]
    assert node.incarnation == 5


def test_unsigned_claims_change_nothing() -> None:
    me, _node, other, observer = pair(5)
    mallory = Identity.generate()
    # A dead claim above what the member signed, signed by someone else.
    fake = Incarnation(me.peer_id, 2**40, mallory.sign(b"anything"))
    actions = observer.receive([Update(fake, int(MemberState.DEAD))], now=1.0)
    assert isinstance(actions[0], UpdateRejected)
    assert actions[0].error.reason == RejectReason.BAD_SIGNATURE
    assert observer.state(me.peer_id) == MemberState.ALIVE
    # Keeping a dead member alive needs its signature above the death.
    observer.receive([claim(me, 5, MemberState.DEAD)], now=2.0)
    observer.tick(2.0 + observer.suspicion_s())
    assert observer.state(me.peer_id) == MemberState.DEAD
    kept = Incarnation(me.peer_id, 6, mallory.sign(b"x"))
    observer.receive([Update(kept, int(MemberState.ALIVE))], now=9.0)
    assert observer.state(me.peer_id) == MemberState.DEAD
    # Adding a member: SWIM news about peers we have no record of is ignored.
    observer.receive([alive(mallory, 1)], now=9.0)
    assert observer.state(mallory.peer_id) is None
    assert other.peer_id not in observer.live_members()


def test_precedence_at_equal_incarnation() -> None:
    me, other = Identity.generate(), Identity.generate()
    node = Swim(me, CONFIG, random.Random(0))
    node.add(other.peer_id)
    node.receive([alive(other, 3)], now=0.0)
    node.receive([claim(other, 2, MemberState.SUSPECT)], now=0.0)
    assert node.state(other.peer_id) == MemberState.ALIVE  # older news
    node.receive([claim(other, 3, MemberState.SUSPECT)], now=0.0)
    assert node.state(other.peer_id) == MemberState.SUSPECT
    node.receive([alive(other, 3)], now=0.0)
    assert node.state(other.peer_id) == MemberState.SUSPECT  # alive at equal does not clear


def test_bad_timers_are_refused() -> None:
    with pytest.raises(ValueError, match="probe_timeout_s"):
        SwimConfig(period_s=0.1, probe_timeout_s=0.2)


IDENTITIES = [Identity.generate() for _ in range(3)]


@st.composite
def updates(draw: st.DrawFn) -> Update:
    who = draw(st.sampled_from(IDENTITIES))
    number = draw(st.integers(0, MAX_INCARNATION))
    if draw(st.booleans()):
        statement = Incarnation.sign(who, number)
    else:
        statement = Incarnation(who.peer_id, number, draw(st.binary(min_size=64, max_size=64)))
    return Update(statement, draw(st.integers(0, 2)))


@given(st.lists(updates(), max_size=20))
@settings(max_examples=200, deadline=None)
def test_any_updates_give_actions_never_an_error_and_bounded_incarnations(
    news: list[Update],
) -> None:
    me = IDENTITIES[0]
    node = Swim(me, CONFIG, random.Random(0), incarnation=5)
    for other in IDENTITIES[1:]:
        node.add(other.peer_id)
    now = 0.0
    for update in news:
        actions = node.receive([update], now)
        assert all(isinstance(a, (UpdateRejected, MemberDead)) for a in actions)
        assert 0 <= node.incarnation <= MAX_INCARNATION
        assert node.statement.valid()
        now += 0.1
        node.tick(now)
    for update in node.piggyback():
        assert update.statement.valid()
