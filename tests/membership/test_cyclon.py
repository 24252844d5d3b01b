"""Cyclon partial views: full, in-degree balanced, and bounded, with no network at all."""

from __future__ import annotations

import collections
import random

from meshfed.identity import Identity
from meshfed.membership.cyclon import MAX_SHUFFLE, Cyclon, Shuffle
from meshfed.membership.records import Capabilities, PeerTable, SignedPeerRecord, sign_record
from meshfed.stats import RejectReason

NOW = 1_800_000_000_000
SIZE, LENGTH, NODES = 8, 4, 100


def test_shuffles_keep_views_full_and_in_degrees_balanced() -> None:
    rng = random.Random(1)
    identities = [Identity.generate() for _ in range(NODES)]
    records = {
        i.peer_id: sign_record(
            i, seq=1, expires_ms=NOW * 2, addrs=[], capabilities=Capabilities(roles=["trainer"])
        )
        for i in identities
    }
    nodes = {}
    for index, identity in enumerate(identities):
        table = PeerTable(max_size=SIZE + 1, rng=rng, pinned=identity.peer_id)
        table.apply(records[identity.peer_id], now_ms=NOW)
        neighbour = identities[(index + 1) % NODES].peer_id  # a ring: the worst start
        table.apply(records[neighbour], now_ms=NOW)
        nodes[identity.peer_id] = Cyclon(identity.peer_id, table, length=LENGTH, rng=rng)
    for _ in range(30):
        for peer, cyclon in nodes.items():
            started = cyclon.start(records[peer])
            if started is None:
                continue
            partner, shuffle, sent = started
            reply, rejected = nodes[partner.peer].answer(shuffle, peer, NOW)
            rejected += cyclon.merge(reply.records, sent, NOW, partner.peer)
            # an honest partner may meet its newcomer share: dropped, never forged
            assert {exc.reason for exc in rejected} <= {RejectReason.RATE_LIMITED}
    in_degree = collections.Counter(p for c in nodes.values() for p in c.view())
    assert all(len(c.view()) >= SIZE - 1 for c in nodes.values())  # full but for the partner
    assert all(len(c.view()) <= SIZE for c in nodes.values())
    assert set(in_degree) == set(nodes)  # nobody forgotten
    assert max(in_degree.values()) <= 3 * SIZE


def test_one_partner_introduces_at_most_its_share_of_a_view() -> None:
    rng = random.Random(2)
    me, mallory = Identity.generate(), Identity.generate()
    table = PeerTable(max_size=SIZE + 1, rng=rng, pinned=me.peer_id)

    def record(identity: Identity) -> SignedPeerRecord:
        caps = Capabilities(roles=["trainer"])
        return sign_record(identity, seq=1, expires_ms=NOW * 2, addrs=[], capabilities=caps)

    for identity in [me] + [Identity.generate() for _ in range(SIZE)]:
        table.apply(record(identity), now_ms=NOW)
    cyclon = Cyclon(me.peer_id, table, length=LENGTH, rng=rng)
    minted = [record(Identity.generate()) for _ in range(MAX_SHUFFLE)]
    for _ in range(20):
        shuffle = Shuffle(records=rng.sample(minted, MAX_SHUFFLE // 2))
        _, rejected = cyclon.answer(shuffle, mallory.peer_id, NOW)
        assert {exc.reason for exc in rejected} <= {RejectReason.RATE_LIMITED}
    taken = {s.verify().peer for s in minted} & set(cyclon.view())
    assert len(taken) == cyclon.max_share == LENGTH
    assert len(cyclon.view()) == SIZE  # the view stays full
