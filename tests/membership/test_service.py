"""Membership on the memory transport, in virtual time: convergence, failures, updates."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from meshfed import Identity, Node, NodeConfig, open_node
from meshfed.membership.records import Capabilities, PeerQuery, Role
from meshfed.membership.service import Membership, MembershipConfig
from meshfed.transports.memory import MemoryNetwork

CONFIG = MembershipConfig(gossip_interval_s=0.5, fanout=2)


@dataclass
class Peer:
    node: Node
    membership: Membership
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


async def start_mesh(
    nursery: trio.Nursery,
    network: MemoryNetwork,
    n: int,
    seed: int,
    *,
    clients: int = 0,
    config: MembershipConfig = CONFIG,
) -> list[Peer]:
    """``n`` peers, the last ``clients`` of them client-only (behind NAT), each bootstrapped
    off one random earlier regular peer."""
    rng = random.Random(seed)
    peers: list[Peer] = []
    for i in range(n):
        client = i >= n - clients
        ready = trio.Event()
        slot: list[Peer] = []

        async def run(
            i: int = i, ready: trio.Event = ready, slot: list[Peer] = slot, client: bool = client
        ) -> None:
            roles = ["client-only", "trainer"] if client else ["trainer"]
            node_config = NodeConfig(
                data_dir=Path("/nonexistent"),
                store_file="",  # nodes of many identities: none keeps a store here
                transport="memory",
                ping_interval_s=0,
                membership=False,  # this test runs its own, with its own timers
                roles=roles,
            )
            scope = trio.CancelScope()
            with scope:
                async with open_node(
                    node_config, identity=Identity.generate(), network=network
                ) as node:
                    regular = [p for p in peers if p.node.listen_addrs]
                    if regular:
                        await node.connect(rng.choice(regular).node.listen_addrs[0])
                    caps = Capabilities(roles=roles, battery_pct=50 + i % 50)
                    membership = Membership(node, caps, config=config, rng=random.Random(seed + i))
                    async with trio.open_nursery() as inner:
                        await inner.start(membership.run)
                        slot.append(Peer(node, membership, scope))
                        ready.set()
                        await trio.sleep_forever()

        nursery.start_soon(run)
        await ready.wait()
        peers.append(slot[0])
    return peers


async def eventually(predicate: Callable[[], bool], *, within: float, what: str) -> float:
    """Poll ``predicate`` every 0.25 s of virtual time; returns the seconds it took."""
    started = trio.current_time()
    while True:
        if predicate():
            return trio.current_time() - started
        assert trio.current_time() - started < within, f"{what} not within {within} s"
        await trio.sleep(0.25)


def full_view(peers: list[Peer]) -> bool:
    return all(len(p.membership.peers()) == len(peers) - 1 for p in peers)


def full_partial_views(peers: list[Peer], size: int) -> bool:
    views = [{r.peer for r in p.membership.peers()} for p in peers]
    seen = set().union(*views)
    return all(len(v) >= size - 1 for v in views) and seen == {p.node.peer_id for p in peers}


async def test_one_bootstrap_each_converges_to_full_views(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(seed=1, latency=0.005)
    async with trio.open_nursery() as nursery:
        peers = await start_mesh(nursery, network, 40, seed=1)
        await eventually(lambda: full_view(peers), within=30, what="full views")
        assert {r.peer for r in peers[0].membership.peers(PeerQuery(role=Role.TRAINER))} == {
            p.node.peer_id for p in peers[1:]
        }
        nursery.cancel_scope.cancel()


async def test_dead_peers_are_detected_and_live_ones_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(seed=2, latency=0.005)
    async with trio.open_nursery() as nursery:
        peers = await start_mesh(nursery, network, 30, seed=2)
        await eventually(lambda: full_view(peers), within=30, what="full views")
        victims, survivors = peers[:3], peers[3:]
        for victim in victims:
            network.crash(victim.node.peer_id)
            victim.scope.cancel()
        dead = {v.node.peer_id for v in victims}
        bound = 30 * CONFIG.swim.period_s + survivors[0].membership.swim.suspicion_s() + 5
        await eventually(
            lambda: not any({r.peer for r in s.membership.peers()} & dead for s in survivors),
            within=bound,
            what="every survivor dropping the dead",
        )
        for survivor in survivors:
            assert len(survivor.membership.peers()) == len(survivors) - 1  # no false positives
        nursery.cancel_scope.cancel()


async def test_capability_changes_reach_everyone(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork(seed=3, latency=0.005)
    async with trio.open_nursery() as nursery:
        peers = await start_mesh(nursery, network, 25, seed=3)
        await eventually(lambda: full_view(peers), within=30, what="full views")
        changer = peers[7]
        changer.membership.update_capabilities(Capabilities(roles=["trainer"], battery_pct=3))

        def seen_everywhere() -> bool:
            for p in peers:
                if p is changer:
                    continue
                record = p.membership.table.get(changer.node.peer_id)
                if record is None or record.capabilities.battery_pct != 3:
                    return False
            return True

        await eventually(seen_everywhere, within=15, what="the new battery level everywhere")
        low = [r.peer for r in peers[0].membership.peers(PeerQuery(min_battery_pct=10))]
        assert changer.node.peer_id not in low
        nursery.cancel_scope.cancel()


async def test_a_forged_record_is_rejected_everywhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import msgpack

    from meshfed.codec import schema_of
    from meshfed.membership.gossip import Delta
    from meshfed.membership.records import RECORD_DOMAIN, PeerRecord, SignedPeerRecord
    from meshfed.stats import RejectReason

    network = MemoryNetwork(seed=4, latency=0.005)
    async with trio.open_nursery() as nursery:
        peers = await start_mesh(nursery, network, 12, seed=4)
        await eventually(lambda: full_view(peers), within=30, what="full views")
        victim, mallory = peers[1], peers[2]
        genuine = peers[0].membership.table.get(victim.node.peer_id)
        assert genuine is not None
        # Mallory rewrites the victim's record (newer seq, her own address) and signs it herself.
        fields = schema_of(PeerRecord).encode(genuine)
        fields[1] = genuine.seq + 1_000_000
        fields[3] = mallory.node.listen_addrs
        blob = msgpack.packb(fields, use_bin_type=True)
        forged = SignedPeerRecord(
            record=blob, signature=mallory.node.identity.sign(RECORD_DOMAIN + blob)
        )
        for target in peers:
            if target not in (victim, mallory):
                await mallory.node.request(target.node.peer_id, Delta(records=[forged], wants=[]))
        await trio.sleep(5)  # let gossip run: nobody may pick the forgery up
        for target in peers:
            if target in (victim, mallory):
                continue
            held = target.membership.table.get(victim.node.peer_id)
            assert held is not None
            assert held.seq < genuine.seq + 1_000_000  # the genuine one (or its own refresh)
            assert held.addrs == victim.node.listen_addrs
            assert target.node.stats.rejected[RejectReason.BAD_SIGNATURE] >= 1
        nursery.cancel_scope.cancel()


async def test_client_only_peers_join_and_are_reached_only_over_their_own_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from meshfed.control import Ping
    from meshfed.errors import PeerUnreachable

    network = MemoryNetwork(seed=5, latency=0.005)
    async with trio.open_nursery() as nursery:
        peers = await start_mesh(nursery, network, 14, seed=5, clients=2)
        await eventually(lambda: full_view(peers), within=30, what="full views with clients")
        clients = peers[-2:]
        for client in clients:
            assert client.node.listen_addrs == []
            for other in peers:
                if other is not client:
                    record = other.membership.table.get(client.node.peer_id)
                    assert record is not None and record.addrs == []
                    assert record.has_role(Role.CLIENT_ONLY)
        for p in peers:
            relays = {r.peer for r in p.membership.peers(PeerQuery(role=Role.RELAY))}
            assert not relays & {c.node.peer_id for c in clients}
        client = clients[0]
        contacted = set(client.node.transport.connected_peers())
        strangers = [p for p in peers[:-2] if p.node.peer_id not in contacted]
        reached = [p for p in peers[:-2] if p.node.peer_id in contacted]
        assert strangers and reached
        # No virtual time passes before the refusal: the client cannot contact the stranger first.
        with pytest.raises(PeerUnreachable):
            await strangers[0].node.request(client.node.peer_id, Ping(sent_ms=1))
        await reached[0].node.request(client.node.peer_id, Ping(sent_ms=1))
        nursery.cancel_scope.cancel()


async def test_one_source_cannot_flood_the_table_with_minted_identities(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from meshfed.membership.gossip import MAX_DELTA, Delta
    from meshfed.membership.records import sign_record
    from meshfed.stats import RejectReason

    network = MemoryNetwork(seed=6, latency=0.005)
    async with trio.open_nursery() as nursery:
        peers = await start_mesh(nursery, network, 4, seed=6)
        await eventually(lambda: full_view(peers), within=30, what="full views")
        mallory, target = peers[0], peers[1]
        sybils = [
            sign_record(
                Identity.generate(),
                seq=1,
                expires_ms=2**62,
                addrs=[],
                capabilities=Capabilities(roles=["trainer"]),
            )
            for _ in range(4 * MAX_DELTA)
        ]
        for start in range(0, len(sybils), MAX_DELTA):
            delta = Delta(records=sybils[start : start + MAX_DELTA], wants=[])
            await mallory.node.request(target.node.peer_id, delta)
        admitted = len(target.membership.table) - len(peers)
        assert admitted <= 2 * MAX_DELTA + MAX_DELTA // 2  # the burst, plus what refilled meanwhile
        assert target.node.stats.rejected[RejectReason.RATE_LIMITED] >= len(sybils) - admitted
        nursery.cancel_scope.cancel()


async def test_partial_views_stay_bounded_and_cover_everyone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    size = 6
    config = MembershipConfig(gossip_interval_s=0.5, fanout=2, max_view=size)
    network = MemoryNetwork(seed=7, latency=0.005)
    async with trio.open_nursery() as nursery:
        peers = await start_mesh(nursery, network, 40, seed=7, config=config)
        await eventually(
            lambda: full_partial_views(peers, size), within=60, what="full partial views"
        )
        await trio.sleep(10)
        for p in peers:
            assert len(p.membership.table) <= size + 1  # bounded: the view and ourselves
            assert len(p.membership.swim.live_members()) <= size
        nursery.cancel_scope.cancel()


async def test_shuffles_from_one_peer_cannot_eclipse_a_partial_view(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from meshfed.membership.cyclon import MAX_SHUFFLE, Shuffle
    from meshfed.membership.records import sign_record

    size = 12
    config = MembershipConfig(gossip_interval_s=0.5, fanout=2, max_view=size)
    network = MemoryNetwork(seed=8, latency=0.005)
    async with trio.open_nursery() as nursery:
        peers = await start_mesh(nursery, network, 24, seed=8, config=config)
        await eventually(
            lambda: full_partial_views(peers, size), within=60, what="full partial views"
        )
        mallory, target = peers[0], peers[1]
        sybils = [
            sign_record(
                Identity.generate(),
                seq=1,
                expires_ms=2**62,
                addrs=[],
                capabilities=Capabilities(roles=["trainer"]),
            )
            for _ in range(4 * MAX_SHUFFLE)
        ]
        rng = random.Random(8)
        minted = {record.verify().peer for record in sybils}
        for _ in range(60):  # a shuffle every 50 ms for 3 s, each full of fresh identities
            shuffle = Shuffle(records=rng.sample(sybils, MAX_SHUFFLE))
            await mallory.node.request(target.node.peer_id, shuffle)
            await trio.sleep(0.05)
        cyclon = target.membership.cyclon
        assert cyclon is not None
        # Mallory introduced at most its share (l = 3 entries at this size); what honest
        # partners shuffled back of them in the meantime may add one or two, never the view.
        taken = minted & set(cyclon.view())
        assert len(taken) <= 3 + 2 < size // 2
        nursery.cancel_scope.cancel()


async def test_a_flood_of_signed_swim_news_costs_a_bounded_number_of_checks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from meshfed.membership.gossip import MAX_DELTA
    from meshfed.membership.service import MAX_UPDATES, SwimAck, SwimPing
    from meshfed.membership.swim import Incarnation, Update
    from meshfed.stats import RejectReason

    network = MemoryNetwork(seed=9, latency=0.005)
    async with trio.open_nursery() as nursery:
        [mallory, target] = await start_mesh(nursery, network, 2, seed=9)
        strangers = [Identity.generate() for _ in range(MAX_UPDATES)]
        updates = [Update(Incarnation.sign(s, 1), 0) for s in strangers]  # each validly signed
        before = target.node.stats.rejected[RejectReason.RATE_LIMITED]
        # 400 full pings: 25,600 signatures if each were checked
        began = trio.current_time()
        for _ in range(400):
            answer = await mallory.node.request(target.node.peer_id, SwimPing(updates=updates))
            assert isinstance(answer.body, SwimAck) and answer.body.ok  # liveness still answered
            await trio.sleep(0.0025)
        dropped = target.node.stats.rejected[RejectReason.RATE_LIMITED] - before
        # the budget (SPEC 7a): a full view ships deltas of MAX_DELTA records
        per_second = 2 * (2 * MAX_DELTA / CONFIG.gossip_interval_s)
        per_second += 2 * MAX_UPDATES / CONFIG.swim.period_s
        checked = (2 + trio.current_time() - began) * per_second  # the burst, then the rate
        assert dropped >= 400 - checked // MAX_UPDATES - 1
        nursery.cancel_scope.cancel()


async def test_records_of_dead_members_make_a_bounded_number_of_dials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A source re-signing the records of members we hold dead (it holds their keys) makes us
    ping them again, each a dial to an address it chose: at most one per SWIM period after a
    burst, the rest counted [rate_limited]. It used to be one dial per record (a reflector)."""
    from meshfed.membership.gossip import Delta
    from meshfed.membership.records import sign_record
    from meshfed.membership.service import RECHECK_BURST
    from meshfed.membership.swim import MemberState
    from meshfed.stats import RejectReason

    network = MemoryNetwork(seed=10, latency=0.005)
    async with trio.open_nursery() as nursery:
        [mallory, target] = await start_mesh(nursery, network, 2, seed=10)
        strangers = [Identity.generate() for _ in range(8)]

        def delta(seq: int) -> Delta:
            records = [
                sign_record(
                    s,
                    seq=seq,
                    expires_ms=2**62,
                    addrs=[f"/memory/{900 + n}/p2p/{s.peer_id}"],  # nobody listens there
                    capabilities=Capabilities(roles=["trainer"]),
                )
                for n, s in enumerate(strangers)
            ]
            return Delta(records=records, wants=[])

        await mallory.node.request(target.node.peer_id, delta(1))
        swim = target.membership.swim
        await eventually(
            lambda: all(swim.state(s.peer_id) == MemberState.DEAD for s in strangers),
            within=60,
            what="strangers dead",
        )
        dials: list[str] = []
        connect = target.node.connect

        async def counted(addr: str) -> object:
            dials.append(addr)
            return await connect(addr)

        target.node.connect = counted  # type: ignore[method-assign]
        before = target.node.stats.rejected[RejectReason.RATE_LIMITED]
        began = trio.current_time()
        for seq in range(2, 42):  # 40 deltas of 8 re-signed dead records: 320 rechecks asked
            await mallory.node.request(target.node.peer_id, delta(seq))
            await trio.sleep(0.01)
        await trio.sleep(1)  # the probes started finish
        elapsed = trio.current_time() - began
        rechecks = [a for a in dials if a.startswith("/memory/9")]
        allowed = RECHECK_BURST + elapsed / CONFIG.swim.period_s + 1
        # the regular SWIM round may probe (dial) one of them per period besides
        assert len(rechecks) <= allowed + elapsed / CONFIG.swim.period_s + 1
        assert len(rechecks) < 320 // 4
        assert target.node.stats.rejected[RejectReason.RATE_LIMITED] - before >= 320 - allowed
        nursery.cancel_scope.cancel()
