"""50 sellers on the memory transport, each with its own asks and capabilities: one job in
each tier is awarded as that tier's scoring says.

The buyer learns the sellers' signed records by gossip; each job is cancelled as soon as every
winner holds its lease (nothing is paid). For every job the awarded set and prices are those
:func:`meshfed.market.auction.clear` computes, independently, from the bids the buyer saw and
the capabilities the sellers published. The tiers' ranges are for more peers than a 50-peer
mesh holds (large: 50-500, enterprise: 500+): every tier's order here names its own smaller
``min_peers``/``max_peers`` (the order allows it), so the scoring has bidders left to choose
from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from meshfed.identity import PeerId
from meshfed.market.auction import AuctionTerms, Clearing, Offer, clear
from meshfed.market.driver import JobHandle
from meshfed.market.pricing import AskPolicy
from meshfed.market.reputation import PeerEvent
from meshfed.market.terms import MICRO, Requirements, Tier, WorkKind
from meshfed.market.tiers import scoring_for
from meshfed.node import Node
from meshfed.testing import open_memory_mesh
from tests.market.mesh import until_event

SELLERS = 50
JOB = {"rounds": 1, "dataset": "synthetic", "secure": False, "partition": "iid"}
#: the highest ask of any seller in any tier, in micro-credits per unit
TOP_ASK = 30_000


@dataclass(frozen=True)
class Seller:
    """What one seller offers."""

    base: int  # micro-credits per unit before the tier's discount
    throughput: float
    accelerator: str
    memory_mb: int
    failed_before: bool  # the buyer's reputation book holds a failed lease of it


def sellers(seed: int = 7) -> list[Seller]:
    """Distinct prices; every fifth seller has an accelerator, every third little memory; the
    five cheapest failed a lease for this buyer before, five others are slow."""
    rng = random.Random(seed)
    bases = [10_000 + 400 * k for k in range(SELLERS)]  # 10_000 .. 29_600
    rng.shuffle(bases)
    cheapest = set(sorted(range(SELLERS), key=lambda i: bases[i])[:5])
    slow = set(rng.sample(sorted(set(range(SELLERS)) - cheapest), 5))
    return [
        Seller(
            base=bases[i],
            throughput=50.0 if i in slow else rng.uniform(300.0, 1_000.0),
            accelerator="cuda" if i % 5 == 0 else "",
            memory_mb=4_096 if i % 3 == 0 else 16_384,
            failed_before=i in cheapest,
        )
        for i in range(SELLERS)
    ]


async def _publish(node: Node, seller: Seller) -> None:
    assert node.membership is not None and node.market is not None
    own = node.membership.table.get(node.peer_id)
    assert own is not None
    caps = replace(own.capabilities, accelerator=seller.accelerator, memory_mb=seller.memory_mb)
    node.membership.update_capabilities(caps)
    market = node.market
    # asks held at the base: the four auctions follow each other within seconds, and demand
    # (RFQs a minute) and load would raise some asks past the budget meanwhile, as the market
    # should; what is tested here is the scoring, with every seller asked (pricing: test_pricing)
    policy = AskPolicy(base={WorkKind.TRAINING: seller.base}, demand_premium=0.0, load_premium=0.0)
    market.config = replace(market.config, asks=policy, throughput=seller.throughput)
    await market.publish_asks()


async def _learned(buyer: Node, nodes: list[Node], offers: list[Seller]) -> None:
    """Wait until the buyer holds every seller's newest record (asks and capabilities)."""
    wanted = {
        node.peer_id: (seller.accelerator, seller.memory_mb, seller.base)
        for node, seller in zip(nodes, offers, strict=True)
    }
    with trio.fail_after(90):
        while True:
            seen = {
                record.peer: (
                    record.capabilities.accelerator,
                    record.capabilities.memory_mb,
                    next(
                        (p.price for p in record.capabilities.prices if p.tier == Tier.SMALL),
                        None,
                    ),
                )
                for record in buyer.peers()
            }
            if all(seen.get(peer) == want for peer, want in wanted.items()):
                return
            await trio.sleep(0.2)


async def _auction(
    buyer: Node,
    tier: Tier,
    min_peers: int,
    max_peers: int,
    requirements: Requirements | None = None,
) -> JobHandle:
    """Post one job, wait until every winner holds its lease, cancel it, wait for its end."""
    handle = await buyer.submit_training(
        {**JOB, "job_id": f"tiers-{tier.value}"},
        budget=max_peers * TOP_ASK / MICRO,  # every seller's ask fits: all of them may bid
        tier=tier.value,
        min_peers=min_peers,
        max_peers=max_peers,
        requirements=requirements,
    )
    await until_event(handle, "started")
    await handle.cancel()
    with trio.fail_after(60):
        final = await handle.wait()
    assert final["state"] == "ended" and final["paid"] == 0, final
    return handle


def _recomputed(handle: JobHandle, published: dict[PeerId, Seller], buyer: Node) -> Clearing:
    """The clearing :func:`clear` computes from the bids the buyer saw (their prices) and what
    each bidder published (throughput, accelerator) and the buyer's reputation book."""
    assert buyer.market is not None
    bids = _asks(handle)
    fastest = max(published[peer].throughput for peer in bids)
    offers = [
        Offer(
            bidder=peer,
            price=price,
            speed=published[peer].throughput / fastest,
            reliability=buyer.market.reputation.score(peer),
            accelerator=bool(published[peer].accelerator),
        )
        for peer, price in bids.items()
    ]
    rfq = handle.buyer.rfq
    terms = AuctionTerms(
        tier=Tier(rfq.tier),
        units=rfq.units,
        min_winners=rfq.min_peers,
        max_winners=rfq.max_peers,
        budget=rfq.budget,
        salt=rfq.job.encode(),
    )
    return clear(terms, offers)


def _asked(handle: JobHandle) -> set[PeerId]:
    [rfq] = [e for e in handle.events if e["event"] == "rfq"]
    asked: list[str] = rfq["asked"]
    return {PeerId.from_string(peer) for peer in asked}


def _asks(handle: JobHandle) -> dict[PeerId, int]:
    """The price of every bid the buyer took."""
    return {PeerId.from_string(e["peer"]): e["price"] for e in handle.events if e["event"] == "bid"}


def _winners(handle: JobHandle) -> dict[PeerId, int]:
    clearing = handle.buyer.clearing
    assert clearing is not None
    assert set(handle.buyer.roster) == {w.bidder for w in clearing.winners}
    return {winner.bidder: winner.price for winner in clearing.winners}


async def test_each_tier_is_awarded_as_its_scoring_says(tmp_path: Path) -> None:
    offers = sellers()
    async with open_memory_mesh(
        SELLERS + 1, tmp_path, membership=True, gossip_interval_s=0.2, market_capacity=1
    ) as nodes:
        buyer, seller_nodes = nodes[0], nodes[1:]
        assert buyer.market is not None
        for node in seller_nodes:
            await node.connect(buyer.listen_addrs[0])
        published = {}
        for node, seller in zip(seller_nodes, offers, strict=True):
            await _publish(node, seller)
            published[node.peer_id] = seller
            if seller.failed_before:
                buyer.market.reputation.record("before", node.peer_id, PeerEvent.FAILED)
        await _learned(buyer, seller_nodes, offers)

        jobs: dict[Tier, JobHandle] = {}
        jobs[Tier.SMALL] = await _auction(buyer, Tier.SMALL, 2, 5)
        roomy = Requirements(min_memory_mb=8_192)
        jobs[Tier.MEDIUM] = await _auction(buyer, Tier.MEDIUM, 10, 15, roomy)
        jobs[Tier.LARGE] = await _auction(buyer, Tier.LARGE, 10, 20)
        jobs[Tier.ENTERPRISE] = await _auction(buyer, Tier.ENTERPRISE, 4, 10)
        _check(jobs, published, buyer)


def _check(jobs: dict[Tier, JobHandle], published: dict[PeerId, Seller], buyer: Node) -> None:
    """Each job's award against clear() and its tier's character."""
    failed = {peer for peer, s in published.items() if s.failed_before}
    slow = {peer for peer, s in published.items() if s.throughput < 100}
    accelerated = {peer for peer, s in published.items() if s.accelerator}

    for tier, handle in jobs.items():
        # every matching seller was asked and bid; the award is clear()'s, prices included
        asked = _asked(handle)
        assert set(_asks(handle)) == asked, tier
        expected = _recomputed(handle, published, buyer)
        assert _winners(handle) == {w.bidder: w.price for w in expected.winners}, tier
        clearing = handle.buyer.clearing
        assert clearing is not None
        assert [o.bidder for o in clearing.standby] == [o.bidder for o in expected.standby]
        assert clearing.rejected.keys() == expected.rejected.keys(), tier

    # medium asked only the sellers with the memory it requires
    roomy_sellers = {peer for peer, s in published.items() if s.memory_mb >= 8_192}
    assert _asked(jobs[Tier.MEDIUM]) == roomy_sellers
    assert all(len(_asked(jobs[t])) == SELLERS for t in (Tier.SMALL, Tier.LARGE, Tier.ENTERPRISE))

    # cost-led tiers: no loser undercuts a winner by more than the largest quality bonus the
    # tier gives (11 % of the reserve in small, 43 % in medium), and small takes the cheap
    # sellers (the cheapest failed a lease before: small's scoring barely weighs that)
    for tier in (Tier.SMALL, Tier.MEDIUM):
        handle = jobs[tier]
        scoring = scoring_for(tier)
        clearing = handle.buyer.clearing
        assert clearing is not None
        slack = clearing.reserve * scoring.quality_ratio
        asks, won = _asks(handle), set(_winners(handle))
        cheapest_loser = min(price for peer, price in asks.items() if peer not in won)
        assert max(asks[peer] for peer in won) <= cheapest_loser + slack, tier
    small_asks = _asks(jobs[Tier.SMALL])
    cheapest_five = set(sorted(small_asks, key=small_asks.__getitem__)[:5])
    assert len(set(_winners(jobs[Tier.SMALL])) & cheapest_five) >= 3
    assert set(_winners(jobs[Tier.SMALL])) & failed

    # large prefers accelerators: more of its winners have one than of the bidders, or of
    # the small job's winners; and it pays for them (a loser asked less than some winner by
    # more than small's largest bonus)
    large = set(_winners(jobs[Tier.LARGE]))
    share = len(large & accelerated) / len(large)
    assert share > len(accelerated) / SELLERS
    assert share > len(set(_winners(jobs[Tier.SMALL])) & accelerated) / 5
    large_asks = _asks(jobs[Tier.LARGE])
    cheapest_loser = min(price for peer, price in large_asks.items() if peer not in large)
    assert max(large_asks[peer] for peer in large) > cheapest_loser + 0.12 * TOP_ASK

    # enterprise keeps its SLA floors: the cheap sellers that failed before (reliability 0.4
    # < 0.5) and the slow ones (speed 0.05 < 0.1) are refused, cheap as they are
    enterprise = jobs[Tier.ENTERPRISE].buyer.clearing
    assert enterprise is not None
    assert not {w.bidder for w in enterprise.winners} & (failed | slow)
    assert set(enterprise.rejected) == failed | slow
    assert all("below an SLA floor" in why for why in enterprise.rejected.values())
