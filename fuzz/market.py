"""Harness: the market's lease machines (:class:`~meshfed.market.lease.BuyerJob` and
:class:`~meshfed.market.lease.SellerBook`) through a whole job, one buyer and three sellers
(the in-memory market of ``tests/market/simulation.py``), with the fuzzer choosing the
network's order, copies and replays, who works, fails and when the job ends, and injecting
market messages of its own.

An injected message is a sample of a market type with any fields replaced by fuzzed values,
decoded through the wire as a receiver decodes it (what fails the schema never reaches a
machine), sent as a stranger, a seller, or the buyer (the signature binds a message to its
sender, so an injection "from" a peer is that peer being dishonest) to any of the four.

Checked after every step:

- the machines accept or refuse with our own ``RemoteProtocolError`` (nothing else leaves);
- the buyer never pays more than the RFQ's budget in all, never twice for one seller's unit,
  and only sellers it awarded, never above the award's price;
- while the buyer is honest (nothing injected as the buyer), a seller earns only what the
  buyer paid it, unit by unit: no seller, stranger or replay makes a seller count an
  acknowledgement the buyer did not sign.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

from meshfed.codec import schema_of
from meshfed.errors import LocalProtocolError, RemoteProtocolError
from meshfed.identity import Identity
from tests.market.simulation import JOB, T0, Market, make_rfq, seller_offer

from ._common import IDENTITIES, Reader, Writer, loose_unpack, market_samples, through_wire

SELLERS = 3
BUDGET = 2_000_000
#: a peer that takes no part in the job
STRANGER = Identity.from_seeds(bytes([9]) * 32, bytes([109]) * 32).peer_id
POST, WORK, FAIL, FINISH, TICK, INJECT, REPLAY = range(7)
STEPS = 7


def _inject(reader: Reader, market: Market) -> bool:
    """Send one fuzzed market message; returns whether it was sent as the buyer."""
    peers = [market.buyer, *market.sellers, STRANGER]
    sender = peers[reader.below(len(peers))]
    receiver = peers[reader.below(len(peers) - 1)]  # never the stranger: it runs no machine
    seller = market.sellers[reader.below(SELLERS)]
    expires = int((T0 + 60) * 1000)
    samples = market_samples(market.buyer, seller, job=JOB, expires_ms=expires, budget=BUDGET)
    sample = samples[reader.below(len(samples))]
    schema = schema_of(type(sample))
    fields: list[Any] = schema.encode(sample)
    while reader.flag():
        at = reader.below(len(fields))
        if reader.flag():  # a number at or past a bound
            fields[at] = [0, 1, 2**31, 2**53, 2**53 + 1, 2**63, -1][reader.below(7)]
        else:
            fields[at] = loose_unpack(reader.sized(256))
    try:
        message = through_wire(type(sample), fields)
    except RemoteProtocolError:
        return False  # refused at decoding: no machine sees it
    if receiver != sender:
        market.deliver(sender, receiver, message)
    return sender == market.buyer


def _check(market: Market, buyer_honest: bool) -> None:
    pays = market.trace.pays()
    total = 0
    for (_, seller, _, amount), times in pays.items():
        if times > 1:
            raise AssertionError(f"the buyer paid {seller.short()} twice for one unit")
        award = market.job.award_to(seller)
        if award is None:
            raise AssertionError("the buyer paid a peer it never awarded")
        if amount > award.price:
            raise AssertionError(f"a unit paid {amount}, above the award's {award.price}")
        total += amount
    if total > BUDGET:
        raise AssertionError(f"the buyer paid {total} of a budget of {BUDGET}")
    if buyer_honest:
        paid = Counter({(s, u, a): n for (_, s, u, a), n in pays.items()})
        earned = Counter({(s, u, a): n for (_, s, _, u, a), n in market.trace.earns().items()})
        if earned - paid:
            raise AssertionError(f"sellers earned what the buyer never paid: {earned - paid}")


def _step(step: int, reader: Reader, market: Market) -> bool:
    """One step; returns whether it sent something as the buyer."""
    posted = bool(market.inputs[market.buyer])
    if step == POST and not posted:
        market.post()
    elif step == WORK and posted:
        market.work(1 + reader.below(2))
    elif step == FAIL and posted and market.training:
        peer = sorted(market.training, key=lambda p: p.raw)[reader.below(len(market.training))]
        if peer not in market.silent:
            market.fail(peer, 1 + reader.below(market.rfq.units))
    elif step == FINISH and posted:
        market.finish()
    elif step == TICK:
        market.tick(market.now + (reader.uint(2) << 4))
    elif step == INJECT:
        as_buyer = _inject(reader, market)
        market.settle()
        return as_buyer
    elif step == REPLAY and market.history:
        sender, receiver, message = market.history[reader.below(len(market.history))]
        market.deliver(sender, receiver, message)
        market.settle()
    return False


def test_one_input(data: bytes) -> None:
    """A job: the buyer posts it, then the fuzzer's steps (each one checked)."""
    reader = Reader(data)
    chaos = random.Random(reader.uint(2)) if reader.flag() else None
    rfq = make_rfq(units=3, min_peers=1, max_peers=2, budget=BUDGET)
    offers = [seller_offer(100_000 * (1 + i)) for i in range(SELLERS)]
    market = Market(rfq, offers, chaos=chaos, peers=[i.peer_id for i in IDENTITIES])
    market.silent.add(STRANGER)  # what is sent to it goes nowhere
    buyer_honest = True
    for _ in range(1 + reader.below(24)):
        step = reader.below(STEPS)
        # a local call the machine refuses (failing a peer twice, a second finish) is no finding
        with contextlib.suppress(LocalProtocolError):
            buyer_honest &= not _step(step, reader, market)
        _check(market, buyer_honest)


def seeds() -> Iterator[bytes]:
    """A whole honest job; one with a failure; one with a forged acknowledgement."""
    yield (
        Writer()
        .uint(1, 0)
        .below(24, 4)
        .below(STEPS, POST)
        .below(STEPS, WORK)
        .below(3, 2)
        .below(STEPS, FINISH)
        .below(STEPS, TICK)
        .uint(2, 200)
        .build()
    )
    yield (
        Writer()
        .uint(1, 0)
        .below(24, 3)
        .below(STEPS, POST)
        .below(STEPS, FAIL)
        .below(2, 0)
        .below(3, 1)
        .below(STEPS, FINISH)
        .build()
    )
    w = Writer().uint(1, 1).uint(2, 7).below(24, 3).below(STEPS, POST)
    w.below(STEPS, INJECT).below(5, 1).below(4, 2).below(3, 0).below(12, 9).uint(1, 0)
    w.below(STEPS, FINISH)
    yield w.build()
