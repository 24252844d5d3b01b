"""SWIM: crashed members are found dead within the protocol bound; live ones are not."""

from __future__ import annotations

import heapq
import random

import pytest

from meshfed.identity import Identity, PeerId
from meshfed.membership.swim import (
    IndirectProbe,
    MemberDead,
    MemberState,
    Probe,
    Swim,
    SwimConfig,
    Update,
)

CONFIG = SwimConfig(period_s=0.5, probe_timeout_s=0.15)


class Cluster:
    """N detectors and a plain-Python network in virtual time (latency, loss, crashes)."""

    def __init__(self, n: int, *, seed: int = 0, loss: float = 0.0, latency: float = 0.01) -> None:
        self.rng = random.Random(seed)
        self.ids = [Identity.generate().peer_id for _ in range(n)]
        self.nodes = {
            p: Swim(p, CONFIG, random.Random(seed * 1000 + i)) for i, p in enumerate(self.ids)
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
        updates_out = self.nodes[source].piggyback()
        self.at(self.now + self.latency, "updates", target, updates_out)
        updates_back = self.nodes[target].piggyback()
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
    detector = Swim(PeerId.from_public_key(bytes(32)), CONFIG, random.Random(0))
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


def test_a_suspected_member_refutes_and_stays_alive() -> None:
    me, other = Identity.generate().peer_id, Identity.generate().peer_id
    node = Swim(me, CONFIG, random.Random(0), incarnation=5)
    node.add(other)
    node.receive([Update(me, int(MemberState.SUSPECT), 5)], now=1.0)
    assert node.incarnation == 6
    assert Update(me, int(MemberState.ALIVE), 6) in node.piggyback()
    # ... and the others take the refutation over their suspicion.
    observer = Swim(other, CONFIG, random.Random(1))
    observer.add(me, incarnation=5)
    observer.receive([Update(me, int(MemberState.SUSPECT), 5)], now=1.0)
    assert observer.state(me) == MemberState.SUSPECT
    observer.receive([Update(me, int(MemberState.ALIVE), 6)], now=1.1)
    assert observer.state(me) == MemberState.ALIVE
    observer.tick(1.1 + observer.suspicion_s() + 1)
    assert observer.state(me) == MemberState.ALIVE


def test_a_restarted_member_outranks_its_death() -> None:
    me, other = Identity.generate().peer_id, Identity.generate().peer_id
    observer = Swim(other, CONFIG, random.Random(1))
    observer.add(me, incarnation=1000)
    assert observer.receive([Update(me, int(MemberState.DEAD), 1000)], now=1.0) == [MemberDead(me)]
    observer.receive([Update(me, int(MemberState.ALIVE), 1000)], now=2.0)
    assert observer.state(me) == MemberState.DEAD  # an old alive does not resurrect
    observer.receive([Update(me, int(MemberState.ALIVE), 5000)], now=3.0)
    assert observer.state(me) == MemberState.ALIVE


def test_precedence_at_equal_incarnation() -> None:
    me, other = Identity.generate().peer_id, Identity.generate().peer_id
    node = Swim(me, CONFIG, random.Random(0))
    node.add(other, incarnation=3)
    node.receive([Update(other, int(MemberState.SUSPECT), 2)], now=0.0)
    assert node.state(other) == MemberState.ALIVE  # older news
    node.receive([Update(other, int(MemberState.SUSPECT), 3)], now=0.0)
    assert node.state(other) == MemberState.SUSPECT


def test_bad_timers_are_refused() -> None:
    with pytest.raises(ValueError, match="probe_timeout_s"):
        SwimConfig(period_s=0.1, probe_timeout_s=0.2)
