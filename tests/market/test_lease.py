"""The lease machines: a whole market in memory, an honest run, a hostile network, and the
attacks of a dishonest buyer, seller or stranger."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshfed.errors import LocalProtocolError, NoBids, RemoteProtocolError
from meshfed.identity import Identity, PeerId
from meshfed.market.lease import (
    BuyerJob,
    BuyerState,
    ChangeRoster,
    Forfeit,
    JobEnded,
    LedgerEarn,
    LedgerEscrow,
    LedgerPay,
    LedgerRelease,
    Reply,
    SellerBook,
    SendRequest,
    StartJob,
    StartTraining,
    WakeAt,
)
from meshfed.market.messages import (
    Award,
    Bid,
    DebitAck,
    DebitNote,
    Decline,
    Lease,
    LeaseDecline,
    MarketMessage,
    Release,
    RosterUpdate,
    Settle,
    SettleReason,
    Verification,
    digest,
)
from meshfed.membership.records import Capabilities, PriceAsk
from meshfed.stats import RejectReason

from .simulation import JOB, T0, Market, make_rfq, seller_offer
from .test_messages import market_messages

PEERS = [Identity.generate().peer_id for _ in range(9)]
STRANGER = Identity.generate().peer_id
PRICES = (1000, 2000, 3000, 4000, 5000)


def market(**kwargs: object) -> Market:
    rfq = kwargs.pop("rfq", None) or make_rfq()
    prices = kwargs.pop("prices", PRICES)
    offers = [seller_offer(p) for p in prices]  # type: ignore[attr-defined]
    return Market(rfq, offers, peers=PEERS, **kwargs)  # type: ignore[arg-type]


def by_index(m: Market, counter: Counter[tuple]) -> Counter[tuple]:  # type: ignore[type-arg]
    """Peer ids replaced by their index (0 the buyer), so runs can be compared."""
    index = {peer: i for i, peer in enumerate(PEERS)}
    return Counter({tuple(index.get(x, x) for x in key): n for key, n in counter.items()})


def buyer_actions(m: Market) -> list[object]:
    return [a for who, a in m.trace.actions if who == m.buyer]


# ------------------------------------------------------------------------ honest runs


def test_a_whole_job_pays_every_unit_once_and_both_sides_agree() -> None:
    m = market().run()
    rfq = m.job.rfq
    assert m.job.state is BuyerState.ENDED
    winners = m.job.clearing.winners  # type: ignore[union-attr]
    assert [w.bidder for w in winners] == m.sellers[:2]  # the two cheapest
    assert m.job.paid == {w.bidder: w.price * rfq.units for w in winners}
    pays = {(s, u, a) for (_, s, u, a), n in m.trace.pays().items() if n == 1}
    earns = {(s, u, a) for (_, s, b, u, a), n in m.trace.earns().items() if n == 1 and b == m.buyer}
    assert pays == earns and len(pays) == 2 * rfq.units
    assert sum(m.job.paid.values()) <= rfq.budget
    assert m.trace.rejected == []
    ended = [a for a in buyer_actions(m) if isinstance(a, JobEnded)]
    assert ended == [JobEnded(JOB, "done", None)]


def test_escrow_goes_before_the_awards_and_every_loser_is_released_with_them() -> None:
    m = market()
    m.post()
    actions = buyer_actions(m)
    escrow = next(i for i, a in enumerate(actions) if isinstance(a, LedgerEscrow))
    awards = [
        i
        for i, a in enumerate(actions)
        if isinstance(a, SendRequest) and isinstance(a.message, Award)
    ]
    releases = [
        a.to for a in actions if isinstance(a, SendRequest) and isinstance(a.message, Release)
    ]
    assert escrow < min(awards)
    assert max(awards) < len(actions)
    assert set(releases) == set(m.sellers[2:])
    assert actions[escrow] == LedgerEscrow(JOB, m.job.clearing.total, f"{JOB}:escrow:1")  # type: ignore[union-attr]
    # the losers hold nothing the moment the award is out; the winners hold their lease
    assert [m.books[p].reserved(m.now) for p in m.sellers] == [1, 1, 0, 0, 0]


def test_the_bid_window_closes_as_soon_as_every_asked_peer_answered() -> None:
    m = market()
    m.call(m.buyer, "start", m.now, m.sellers)
    m.settle()  # no time passes
    assert m.now == T0
    assert m.job.state is BuyerState.RUNNING
    assert any(isinstance(a, StartJob) for a in buyer_actions(m))


def test_the_bid_window_waits_for_the_deadline_when_a_peer_is_silent() -> None:
    m = market(silent={4})
    m.call(m.buyer, "start", m.now, m.sellers)
    m.settle()
    assert m.job.state is BuyerState.BIDDING
    m.tick(T0 + 5)
    assert m.job.state is BuyerState.RUNNING
    assert m.now == T0 + 5


def test_no_bid_under_the_reserve_ends_the_job_with_no_bids_and_releases_everyone() -> None:
    # reserve = 30_000 // (2 peers * 3 units) = 5000 per unit: every ask is above it
    m = market(rfq=make_rfq(budget=30_000), prices=(6000, 7000, 8000))
    m.post()
    ended = [a for a in buyer_actions(m) if isinstance(a, JobEnded)]
    assert len(ended) == 1 and isinstance(ended[0].error, NoBids)
    assert not [a for _, a in m.trace.ledger]
    assert [m.books[p].reserved(m.now) for p in m.sellers] == [0, 0, 0]


def test_sellers_that_cannot_do_the_work_decline_with_the_requirement() -> None:
    rfq = make_rfq()
    offers = [
        seller_offer(1000, examples=50),  # too few examples
        dataclasses.replace(  # no data set at all
            seller_offer(1000),
            capabilities=Capabilities(
                roles=["trainer"], prices=[PriceAsk("training", "small", 1000)]
            ),
        ),
        seller_offer(1000, tier="large"),  # no ask for small jobs
        seller_offer(10**6),  # its price is beyond what the budget can pay
    ]
    m = Market(rfq, offers, peers=PEERS)
    m.call(m.buyer, "start", m.now, m.sellers)
    m.settle()
    reasons = {
        s: msg.reason
        for s, r, msg in m.trace.delivered
        if isinstance(msg, Decline) and r == m.buyer
    }
    assert [reasons[p] for p in m.sellers] == ["min_examples", "dataset", "kind", "price"]
    assert m.job.state is BuyerState.ENDED


# ------------------------------------------------------------------- a hostile network


def outcome(m: Market) -> tuple[object, ...]:
    ended = [a for a in buyer_actions(m) if isinstance(a, JobEnded)]
    return (
        by_index(m, m.trace.pays()),
        by_index(m, m.trace.earns()),
        tuple(PEERS.index(p) for p in m.job.roster),
        m.job.state,
        tuple((a.reason, type(a.error)) for a in ended),
        sorted((PEERS.index(p), v) for p, v in m.job.paid.items()),
    )


def scenario(name: str, chaos: random.Random | None) -> Market:
    """A whole job: as asked, with a winner declining, with a winner failing mid-job and
    replaced, or with the buyer away for two rounds."""
    m = market(chaos=chaos, on_award={0: "decline"} if name == "decline" else None)
    m.post()
    m.work(1)
    if name == "failure":
        m.fail(m.job.roster[0], 2)
    if name == "away":
        m.silent.add(m.buyer)
        m.work(2)
        m.tick(m.now + 30)
        m.silent.discard(m.buyer)
        m.tick(m.now + 60)
    m.work(3)
    m.finish()
    return m


SCENARIOS = ("plain", "decline", "failure", "away")
ORDERLY = {name: outcome(scenario(name, None)) for name in SCENARIOS}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SCENARIOS), st.integers(0, 2**32))
def test_reordering_duplicating_and_replaying_messages_changes_nothing(
    name: str, seed: int
) -> None:
    m = scenario(name, random.Random(seed))
    assert outcome(m) == ORDERLY[name]
    # every payment once, every earning once, however often the note or the ack arrived
    assert set(m.trace.pays().values()) == {1}
    assert set(m.trace.earns().values()) == {1}
    assert by_index(m, m.trace.pays()).keys() == {
        (j, s, u, a) for (j, s, b, u, a) in by_index(m, m.trace.earns())
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SCENARIOS), st.integers(0, 2**32))
def test_a_machine_rebuilt_from_the_events_it_took_is_the_same_machine(
    name: str, seed: int
) -> None:
    """What a driver does after kill -9: the machines are deterministic, so the events written
    ahead rebuild them exactly (and the ledger actions that come out again are no-ops by their
    idempotency keys)."""
    m = scenario(name, random.Random(seed))
    job, books = m.rebuild()
    assert vars(job) == vars(m.job)
    for peer, book in books.items():
        assert vars(book) == vars(m.books[peer])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32))
def test_every_payment_has_a_lease_and_a_signed_acknowledgement(seed: int) -> None:
    m = market(chaos=random.Random(seed)).run()
    actions = buyer_actions(m)
    leased = {r: digest(msg) for s, r, msg in m.trace.delivered if isinstance(msg, Award)}
    accepted = {s for s, r, msg in m.trace.delivered if isinstance(msg, Lease) and r == m.buyer}
    for i, pay in enumerate(actions):
        if not isinstance(pay, LedgerPay):
            continue
        assert pay.seller in accepted
        ack = actions[i + 1]
        assert isinstance(ack, Reply) and isinstance(ack.message, DebitAck)
        assert (ack.message.seller, ack.message.unit, ack.message.amount) == (
            pay.seller,
            pay.unit,
            pay.amount,
        )
        assert ack.message.note_digest == pay.note_digest
        note = next(
            msg
            for s, r, msg in m.trace.delivered
            if isinstance(msg, DebitNote) and digest(msg) == pay.note_digest
        )
        assert note.award_digest == leased[pay.seller]
    # and every earning is an acknowledgement the buyer sent
    acks = {digest(msg) for s, r, msg in m.trace.delivered if isinstance(msg, DebitAck)}
    assert all(a.ack_digest in acks for _, a in m.trace.ledger if isinstance(a, LedgerEarn))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 20_000), min_size=2, max_size=6),
    st.integers(1, 200_000),
    st.integers(1, 4),
    st.integers(1, 3),
    st.booleans(),
)
def test_the_buyer_never_pays_beyond_its_budget(
    prices: list[int], budget: int, units: int, max_peers: int, failure: bool
) -> None:
    rfq = make_rfq(units=units, max_peers=max_peers, budget=budget)
    m = Market(rfq, [seller_offer(p) for p in prices], peers=PEERS)
    m.post()
    m.work(1)
    if failure and m.job.state is BuyerState.RUNNING:
        m.fail(m.job.roster[0], min(2, units))
    m.work(units)
    m.finish()
    paid = sum(a.amount for _, a in m.trace.ledger if isinstance(a, LedgerPay))
    escrowed = sum(a.amount for _, a in m.trace.ledger if isinstance(a, LedgerEscrow))
    assert paid <= escrowed <= budget
    assert m.job.escrowed == escrowed


# -------------------------------------------------------------------- replacements


def test_a_winner_that_declines_is_replaced_from_standby() -> None:
    m = market(on_award={0: "decline"}).run()
    assert m.job.roster == (m.sellers[1], m.sellers[2])
    assert m.sellers[0] not in m.job.paid
    assert set(m.job.paid) == {m.sellers[1], m.sellers[2]}
    # the late joiner got the roster the others started with corrected
    changes = [
        a.message
        for a in buyer_actions(m)
        if isinstance(a, SendRequest) and isinstance(a.message, RosterUpdate)
    ]
    assert [c.roster for c in changes] == [[m.sellers[1], m.sellers[2]]]
    assert changes[0].replaced == [m.sellers[0]]


def test_a_winner_that_never_answers_is_replaced_when_its_award_expires() -> None:
    m = market(on_award={1: "drop"})
    m.post()
    assert m.job.state is BuyerState.RUNNING
    assert m.job.roster == (m.sellers[0], m.sellers[2])
    assert m.now >= T0 + 10  # it waited the accept window, no longer


def test_an_acceptance_that_comes_too_late_ends_that_lease_with_nothing_owed() -> None:
    m = market(on_award={1: "drop"})
    m.post()  # seller 1 never answered in time: replaced by seller 2
    late = m.sellers[1]
    award = next(msg for s, r, msg in m.trace.delivered if isinstance(msg, Award) and r == late)
    (accepted, start) = m.books[late].receive(m.buyer, award, T0)  # it did accept, in time
    assert isinstance(accepted, Reply) and isinstance(start, StartTraining)
    m.deliver(late, m.buyer, accepted.message)  # but its acceptance arrives after the window
    m.tick(m.now + 1)
    assert m.job.roster == (m.sellers[0], m.sellers[2])
    assert (late, JobEnded(JOB, "cancelled")) in m.trace.actions
    (withdrawn,) = m.job.receive(late, accepted.message, m.now)  # again: the same settlement
    assert isinstance(withdrawn, Reply) and withdrawn.message.units == 0  # type: ignore[attr-defined]
    m.work(3)
    m.finish()
    assert late not in m.job.paid and m.trace.rejected == []


def _first_winner_fails_in_round_2(
    m: Market,
) -> tuple[PeerId, PeerId, PeerId, list[ChangeRoster]]:
    """Run ``m``'s job of two winners, the first failing in round 2: the one that failed,
    the one kept, its replacement, and the roster changes the kept one took."""
    m.post()
    m.work(1)
    failed, kept = m.job.roster
    m.fail(failed, 2)
    m.work(3)
    m.finish()
    replacement = m.sellers[2]
    assert m.job.roster == (kept, replacement)
    assert m.job.state is BuyerState.ENDED
    seen = [a for who, a in m.trace.actions if who == kept and isinstance(a, ChangeRoster)]
    return failed, kept, replacement, seen


def test_a_peer_failing_mid_job_is_replaced_and_the_roster_change_reaches_the_peers() -> None:
    m = market()
    failed, kept, replacement, seen = _first_winner_fails_in_round_2(m)
    assert m.training[replacement].units == 2  # rounds 2 and 3
    units = m.job.rfq.units
    prices = {w.bidder: w.price for w in m.job.clearing.winners}  # type: ignore[union-attr]
    assert m.job.paid[failed] == prices[failed]  # the round it did
    assert m.job.paid[kept] == prices[kept] * units
    assert m.job.paid[replacement] >= 3000 * 2  # at least its bid, for its two rounds
    assert [(c.roster, c.roster_version, c.from_round) for c in seen] == [
        ((kept,), 2, 2),
        ((kept, replacement), 3, 2),
    ]


def test_a_roster_below_min_peers_is_never_sent_only_the_one_with_the_replacement() -> None:
    # the job cannot run below min_peers: a change to the survivors alone would be refused
    _, kept, replacement, seen = _first_winner_fails_in_round_2(market(rfq=make_rfq(min_peers=2)))
    assert [(c.roster, c.from_round) for c in seen] == [((kept, replacement), 2)]


def test_without_an_affordable_replacement_the_job_settles_with_what_it_did() -> None:
    m = market(rfq=make_rfq(min_peers=2), prices=PRICES[:2])
    m.post()
    m.work(1)
    m.fail(m.job.roster[0], 2)
    m.tick(m.now + 120)
    ended = [a for a in buyer_actions(m) if isinstance(a, JobEnded)]
    assert len(ended) == 1 and isinstance(ended[0].error, NoBids)
    assert ended[0].reason == "cancelled"
    assert any(isinstance(a, LedgerRelease) for a in buyer_actions(m))
    prices = {w.bidder: w.price for w in m.job.clearing.winners}  # type: ignore[union-attr]
    assert m.trace.pays() == Counter({(JOB, p, 1, prices[p]): 1 for p in m.sellers[:2]})
    assert sum(m.job.paid.values()) == sum(
        a.amount for _, a in m.trace.ledger if isinstance(a, LedgerPay)
    )


# ------------------------------------------------------------------ the buyer away


def test_debit_notes_wait_for_a_buyer_away_and_are_paid_when_it_is_back() -> None:
    m = market()
    m.post()
    m.silent.add(m.buyer)
    m.work(2)
    m.tick(m.now + 30)
    notes = [
        a
        for _, a in m.trace.actions
        if isinstance(a, SendRequest) and isinstance(a.message, DebitNote)
    ]
    assert len(notes) > 4  # sent again while nobody answered
    assert not m.trace.pays()
    m.silent.discard(m.buyer)
    m.tick(m.now + 120)
    assert len(m.trace.pays()) == 4 and m.trace.pays().keys() == {
        (j, s, u, a) for (j, s, b, u, a) in m.trace.earns()
    }


def test_a_buyer_away_beyond_the_forfeit_term_forfeits() -> None:
    m = market(rfq=make_rfq(forfeit_after_s=60))
    m.post()
    m.silent.add(m.buyer)
    m.work(1)
    m.tick(m.now + 61)
    forfeits = [(who, a) for who, a in m.trace.actions if isinstance(a, Forfeit)]
    prices = {w.bidder: w.price for w in m.job.clearing.winners}  # type: ignore[union-attr]
    assert sorted(forfeits, key=lambda x: x[0].raw) == sorted(
        [(p, Forfeit(JOB, m.buyer, (1,), prices[p])) for p in m.job.roster], key=lambda x: x[0].raw
    )
    # back too late: its acknowledgements expired with the notes, nothing is booked twice
    m.silent.discard(m.buyer)
    m.tick(m.now + 10)
    assert not m.trace.earns()


def test_notes_a_buyer_settles_without_paying_are_claimed_not_dropped() -> None:
    """The buyer cancels while a round's note is on its way (lost): the seller's receipt
    says what it was paid, and the note it was not paid for is claimed (forfeited), never
    silently forgotten."""
    m = market()
    m.post()
    m.work(1)  # unit 1 noted and paid
    seller = sorted(m.training, key=lambda p: p.raw)[0]
    m.call(seller, "round_done", JOB, 2, bytes([2]) * 32, m.now)
    m.queue.clear()  # unit 2's note is lost
    m.finish(SettleReason.CANCELLED)
    award = m.job.award_to(seller)
    assert award is not None
    claims = [a for who, a in m.trace.actions if who == seller and isinstance(a, Forfeit)]
    assert claims == [Forfeit(JOB, m.buyer, (2,), award.price)]
    assert seller in m.ended and m.books[seller].outbox() == []  # not resent


# ----------------------------------------------------------------------- attacks


def running() -> Market:
    m = market()
    m.post()
    m.work(1)
    return m


def refused(
    machine: BuyerJob | SellerBook, sender: PeerId, message: MarketMessage, now: float
) -> RejectReason:
    before = copy.deepcopy(vars(machine))
    with pytest.raises(RemoteProtocolError) as caught:
        machine.receive(sender, message, now)
    assert vars(machine) == before  # nothing changed
    return caught.value.reason


def test_a_lease_or_a_debit_from_a_peer_never_awarded_is_refused() -> None:
    m = running()
    winner, loser = m.job.roster[0], m.sellers[4]
    award = next(msg for s, r, msg in m.trace.delivered if isinstance(msg, Award) and r == winner)
    lease = Lease(JOB, award.expires_ms, digest(award))
    note = DebitNote(JOB, int(m.now * 1000) + 60_000, digest(award), 2, award.price, bytes(32))
    assert refused(m.job, loser, lease, m.now) is RejectReason.NOT_A_MEMBER
    assert refused(m.job, STRANGER, note, m.now) is RejectReason.NOT_A_MEMBER
    assert refused(m.job, loser, note, m.now) is RejectReason.NOT_A_MEMBER


def test_a_seller_cannot_bill_more_units_another_price_or_another_lease() -> None:
    m = running()
    a, b = m.job.roster
    award_a = next(msg for s, r, msg in m.trace.delivered if isinstance(msg, Award) and r == a)
    expires = int(m.now * 1000) + 60_000
    too_many = DebitNote(JOB, expires, digest(award_a), 4, award_a.price, bytes(32))
    dearer = DebitNote(JOB, expires, digest(award_a), 2, award_a.price + 1, bytes(32))
    theirs = DebitNote(JOB, expires, digest(award_a), 2, award_a.price, bytes(32))
    assert refused(m.job, a, too_many, m.now) is RejectReason.INCONSISTENT
    assert refused(m.job, a, dearer, m.now) is RejectReason.INCONSISTENT
    assert refused(m.job, b, theirs, m.now) is RejectReason.WRONG_CONTEXT


def test_a_sealed_bid_cannot_be_revised_nor_cover_fewer_units_than_asked() -> None:
    m = market(silent={4})  # one peer silent: the window stays open
    m.call(m.buyer, "start", m.now, m.sellers)
    m.settle()
    bidder = m.sellers[0]
    bid = next(msg for s, r, msg in m.trace.delivered if isinstance(msg, Bid) and s == bidder)
    assert m.job.receive(bidder, bid, m.now) == []  # the same bid again: nothing
    cheaper = dataclasses.replace(bid, price=bid.price - 1)
    assert refused(m.job, bidder, cheaper, m.now) is RejectReason.DUPLICATE
    short = dataclasses.replace(bid, units=m.job.rfq.units - 1)
    assert refused(m.job, m.sellers[4], short, m.now) is RejectReason.INCONSISTENT
    assert refused(m.job, STRANGER, bid, m.now) is RejectReason.NOT_A_MEMBER


def test_a_peer_reported_failed_is_paid_for_the_rounds_before_and_no_more() -> None:
    m = market()
    m.post()
    m.work(1)
    victim = m.job.roster[0]
    m.call(m.buyer, "peer_failed", victim, 2, m.now)  # it did not fail: it goes on working
    m.tick(m.now + 1)
    m.work(3)
    price = next(w.price for w in m.job.clearing.winners if w.bidder == victim)  # type: ignore[union-attr]
    assert m.job.paid[victim] == price
    refusals = {
        (s, reason)
        for s, r, kind, reason in m.trace.rejected
        if kind == "meshfed.market.debit_note"
    }
    assert refusals == {(victim, "inconsistent")}


def test_the_same_unit_billed_again_gets_the_same_acknowledgement_and_no_payment() -> None:
    m = running()
    seller = m.job.roster[0]
    note = next(
        msg for s, r, msg in m.trace.delivered if isinstance(msg, DebitNote) and s == seller
    )
    first = next(
        a.message
        for who, a in m.trace.actions
        if who == m.buyer
        and isinstance(a, Reply)
        and isinstance(a.message, DebitAck)
        and a.message.seller == seller
    )
    other_evidence = dataclasses.replace(note, evidence=b"\x07" * 32)
    for again in (note, other_evidence):
        assert m.job.receive(seller, again, m.now) == [Reply(first)]


def test_expired_messages_are_refused() -> None:
    m = running()
    seller = m.job.roster[0]
    award = next(msg for s, r, msg in m.trace.delivered if isinstance(msg, Award) and r == seller)
    late = int(m.now * 1000) - 1
    note = DebitNote(JOB, late, digest(award), 2, award.price, bytes(32))
    assert refused(m.job, seller, note, m.now) is RejectReason.STALE
    rfq = dataclasses.replace(make_rfq(), job="other")
    book = m.books[m.sellers[4]]
    assert refused(book, m.buyer, rfq, T0 + 11) is RejectReason.STALE
    stale_award = dataclasses.replace(
        award, job="other", expires_ms=late, winner=m.sellers[4], roster=[m.sellers[4]]
    )
    assert refused(book, m.buyer, stale_award, m.now) is RejectReason.STALE


def test_an_award_below_the_bid_or_not_for_our_bid_is_declined() -> None:
    rfq = make_rfq()
    me = PEERS[1]
    book = SellerBook(me, seller_offer(3000))
    (bid_reply,) = book.receive(PEERS[0], rfq, T0)
    assert isinstance(bid_reply, Reply) and isinstance(bid_reply.message, Bid)
    award = Award(JOB, int(T0 * 1000) + 10_000, digest(rfq), me, 2999, 3, [me], 1, 600)
    (answer,) = book.receive(PEERS[0], award, T0)
    assert isinstance(answer, Reply) and isinstance(answer.message, LeaseDecline)
    assert "below our bid" in answer.message.detail
    stranger_award = dataclasses.replace(award, price=3000)
    (answer,) = book.receive(STRANGER, stranger_award, T0)
    assert "no bid of ours" in answer.message.detail  # type: ignore[union-attr]
    (lease, start) = book.receive(PEERS[0], stranger_award, T0)
    assert isinstance(lease.message, Lease) and isinstance(start, StartTraining)  # type: ignore[union-attr]
    assert book.receive(PEERS[0], stranger_award, T0) == [lease]  # again: the same lease


def test_only_the_buyer_can_change_the_roster_and_only_forward() -> None:
    m = running()
    seller, other = m.job.roster
    change = RosterUpdate(JOB, int(m.now * 1000) + 60_000, 5, [seller], 2, [other])
    assert refused(m.books[seller], other, change, m.now) is RejectReason.NOT_A_MEMBER
    older = dataclasses.replace(change, roster_version=1)
    assert m.books[seller].receive(m.buyer, older, m.now) == []


def test_a_seller_reserves_once_per_rfq_and_frees_on_release() -> None:
    rfq = make_rfq()
    book = SellerBook(PEERS[1], seller_offer(1000, capacity=1))
    first = book.receive(PEERS[0], rfq, T0)
    assert book.receive(PEERS[0], rfq, T0 + 1) == first  # the same answer, one reservation
    assert book.reserved(T0) == 1
    other = dataclasses.replace(rfq, job="job-2")
    (busy,) = book.receive(PEERS[0], other, T0)
    assert isinstance(busy.message, Decline) and busy.message.reason == "busy"  # type: ignore[union-attr]
    assert (
        refused(book, STRANGER, Release(JOB, int(T0 * 1000) + 1000, digest(rfq)), T0)
        is RejectReason.WRONG_CONTEXT
    )
    assert book.receive(PEERS[0], Release(JOB, int(T0 * 1000) + 1000, digest(rfq)), T0) == []
    assert book.reserved(T0) == 0
    assert book.reserved(T0 + 5 + 31) == 0  # and a reservation ends with its bid anyway


def test_no_rfq_holds_a_reservation_longer_than_the_seller_allows() -> None:
    book = SellerBook(PEERS[1], seller_offer(1000, capacity=1))
    forever = dataclasses.replace(
        make_rfq(), expires_ms=2**62, bid_deadline_ms=int((T0 + 601) * 1000)
    )
    (answer,) = book.receive(PEERS[0], forever, T0)
    assert isinstance(answer, Reply) and isinstance(answer.message, Decline)
    assert answer.message.reason == "deadline" and book.reserved(T0) == 0


def test_a_seller_acknowledgement_must_be_for_its_own_note() -> None:
    m = running()
    seller = m.job.roster[0]
    book = m.books[seller]
    ack = next(msg for s, r, msg in m.trace.delivered if isinstance(msg, DebitAck) and r == seller)
    assert book.receive(m.buyer, ack, m.now) == []  # again: no second earning
    forged = dataclasses.replace(ack, unit=2)
    assert refused(book, m.buyer, forged, m.now) is RejectReason.WRONG_CONTEXT
    wrong_amount = dataclasses.replace(ack, amount=ack.amount + 1)
    assert refused(book, m.buyer, wrong_amount, m.now) is RejectReason.INCONSISTENT


def test_a_dishonest_settlement_gets_the_sellers_own_numbers() -> None:
    m = running()
    seller = m.job.roster[0]
    book = m.books[seller]
    claims_more = Settle(JOB, int(m.now * 1000) + 5000, 3, 10**6, SettleReason.DONE.value)
    assert book.receive(m.buyer, claims_more, m.now) == [WakeAt(m.now + 5.001)]
    (receipt, ended) = book.expire(m.now + 6)
    assert isinstance(receipt, SendRequest) and receipt.message.units == 1  # type: ignore[attr-defined]
    assert isinstance(ended, JobEnded)
    other = dataclasses.replace(claims_more, units=1)
    assert refused(book, m.buyer, other, m.now) is RejectReason.INCONSISTENT


def test_local_misuse_is_a_local_error() -> None:
    m = running()
    with pytest.raises(LocalProtocolError):
        m.job.start(m.now, m.sellers)
    with pytest.raises(LocalProtocolError):
        m.job.peer_failed(STRANGER, 1, m.now)
    book = m.books[m.job.roster[0]]
    with pytest.raises(LocalProtocolError):
        book.round_done(JOB, 4, bytes(32), m.now)
    with pytest.raises(LocalProtocolError):
        book.round_done("nope", 1, bytes(32), m.now)


senders = st.sampled_from([*PEERS[:6], STRANGER])


def _phases() -> dict[str, Market]:
    bidding = market(silent={4})
    bidding.call(bidding.buyer, "start", bidding.now, bidding.sellers)
    bidding.settle()
    settling = running()
    settling.call(settling.buyer, "finish", settling.now, SettleReason.DONE)
    # replicas: 2 of 3 winners, one of which lies; round 2 noted by one winner only (held)
    rfq = make_rfq(min_peers=3, max_peers=3, verification=Verification(2, 0.5, 60))
    offers = [seller_offer(p) for p in PRICES]
    verifying = Market(rfq, offers, peers=PEERS, liars=[2], spot_key=b"s" * 16)
    verifying.post()
    verifying.work(1)
    verifying.silent = set(verifying.job.roster[1:])
    verifying.work(1)
    verifying.silent = set()
    phases = {"bidding": bidding, "running": running(), "settling": settling}
    return {**phases, "verifying": verifying}


PHASES = _phases()


def _bound(m: Market, message: MarketMessage, which: int) -> MarketMessage:
    """``message`` made to name this job and, where it can, a real RFQ or award of it."""
    message = dataclasses.replace(message, job=JOB)  # type: ignore[type-var]
    awards = [digest(msg) for _, _, msg in m.trace.delivered if isinstance(msg, Award)]
    if hasattr(message, "rfq_digest"):
        message = dataclasses.replace(message, rfq_digest=m.job.rfq_digest)  # type: ignore[type-var]
    if hasattr(message, "award_digest") and awards:
        message = dataclasses.replace(message, award_digest=awards[which % len(awards)])  # type: ignore[type-var]
    return message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    market_messages,
    st.sampled_from(["foreign", "ours", "bound"]),
    senders,
    st.integers(0, 5),
    st.sampled_from(sorted(PHASES)),
)
def test_anything_a_peer_sends_is_actions_or_a_counted_refusal(
    message: MarketMessage, how: str, sender: PeerId, target: int, phase: str
) -> None:
    m = copy.deepcopy(PHASES[phase])
    if how == "ours":
        message = dataclasses.replace(message, job=JOB)  # type: ignore[type-var]
    elif how == "bound":
        message = _bound(m, message, target)
    machine: BuyerJob | SellerBook = m.job if target == 0 else m.books[m.sellers[target - 1]]
    before = copy.deepcopy(vars(machine))
    held = {  # notes waiting for their verdict: another's note may get them paid
        (peer, unit) for peer, c in m.job._contracts.items() for unit in c.held
    }
    try:
        actions = machine.receive(sender, message, m.now)
    except RemoteProtocolError as exc:
        assert isinstance(exc.reason, RejectReason)
        assert vars(machine) == before
    else:
        assert all(
            not isinstance(a, LedgerPay) or a.seller == sender or (a.seller, a.unit) in held
            for a in actions
        )
        assert all(not isinstance(a, LedgerEarn) or a.buyer == sender for a in actions)
