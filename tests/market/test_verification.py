"""Verification of the units a job pays for: the pure verifier's rule, and whole markets where
sellers lie, copy evidence they cannot prove, or are late, on a hostile network."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshfed.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from meshfed.identity import Identity, PeerId
from meshfed.market.lease import (
    BuyerJob,
    Forfeit,
    LedgerPay,
    NoteRefused,
    RecordWork,
    Reply,
    RequestProof,
    SendRequest,
)
from meshfed.market.messages import (
    DebitAck,
    DebitNote,
    DebitRefusal,
    ProofQuery,
    RefusalReason,
    Verification,
    digest,
)
from meshfed.market.order import TrainingOrder
from meshfed.market.reputation import PeerEvent
from meshfed.market.verification import (
    AskProof,
    Late,
    Pay,
    Refuse,
    Verifier,
    evidence_of,
    proves,
    spot_checked,
)
from meshfed.stats import RejectReason

from .simulation import JOB, T0, Market, make_rfq, seller_offer

SELLERS = sorted((Identity.generate().peer_id for _ in range(6)), key=lambda p: p.raw)
A, B, C, D = SELLERS[:4]
KEY = b"k" * 32
RIGHT, WRONG, OTHER = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
FAR = T0 + 10_000.0  # a note's expiry, far away


def four(unit: int) -> int:
    """Four sellers are expected to note every unit."""
    return 4


def verifier(replicas: int = 3, spot_rate: float = 0.0, window_s: int = 60) -> Verifier:
    return Verifier(Verification(replicas, spot_rate, window_s), JOB, KEY)


def note(v: Verifier, seller: PeerId, evidence: bytes, *, unit: int = 1, now: float = T0):  # type: ignore[no-untyped-def]
    return v.note(seller, unit, evidence, expires_at=FAR, now=now, expected=four)


# --------------------------------------------------------------------- the pure rule


def test_without_replication_each_note_is_paid_at_once() -> None:
    v = verifier(replicas=1)
    assert note(v, A, RIGHT) == [Pay(A, 1)]
    assert note(v, B, WRONG) == [Pay(B, 1)]  # nothing to compare with: each stands alone
    assert v.next_deadline() is None


def test_a_unit_is_paid_once_replicas_agree_and_no_later_note_could_outvote_them() -> None:
    v = verifier(replicas=3)
    assert note(v, A, RIGHT) == []
    assert note(v, B, RIGHT) == []  # 2 < 3 replicas: held
    assert v.held(A, 1) == RIGHT
    assert note(v, C, RIGHT) == [Pay(A, 1), Pay(B, 1), Pay(C, 1)]  # 3 of 4: decided
    assert note(v, D, WRONG) == [Refuse(D, 1, RefusalReason.WRONG, RIGHT)]
    assert v.held(A, 1) is None


def test_a_liar_noting_first_is_refused_and_honest_replicas_paid() -> None:
    v = verifier(replicas=2)
    assert note(v, D, WRONG) == []
    assert note(v, A, RIGHT) == []
    assert note(v, B, RIGHT) == []  # 2 agree, but the 4th could still tie them: held
    assert note(v, C, RIGHT) == [
        Pay(A, 1),
        Pay(B, 1),
        Pay(C, 1),
        Refuse(D, 1, RefusalReason.WRONG, RIGHT),
    ]


def test_the_deadline_decides_by_a_strict_plurality_of_at_least_replicas() -> None:
    v = verifier(replicas=2, window_s=60)
    note(v, A, RIGHT)
    note(v, B, RIGHT)
    note(v, D, WRONG)
    assert v.next_deadline() == T0 + 60
    assert v.expire(T0 + 59, four) == []
    assert v.expire(T0 + 60, four) == [
        Pay(A, 1),
        Pay(B, 1),
        Refuse(D, 1, RefusalReason.WRONG, RIGHT),
    ]
    assert v.next_deadline() is None


def test_a_tie_or_too_few_notes_at_the_deadline_leave_the_unit_unverified_and_nobody_blamed() -> (
    None
):
    tie = verifier(replicas=2)
    for seller, evidence in ((A, RIGHT), (B, RIGHT), (C, WRONG), (D, WRONG)):
        note(tie, seller, evidence)
    assert tie.expire(T0 + 60, four) == [
        Refuse(s, 1, RefusalReason.UNVERIFIED, b"") for s in sorted((A, B, C, D), key=_raw)
    ]
    few = verifier(replicas=3)
    note(few, A, RIGHT)
    note(few, B, RIGHT)
    assert [d.reason for d in few.expire(T0 + 60, four)] == [RefusalReason.UNVERIFIED] * 2  # type: ignore[union-attr]


def test_a_note_after_the_verdict_is_judged_by_it_and_late_after_the_deadline() -> None:
    v = verifier(replicas=2)
    note(v, A, RIGHT)
    note(v, B, RIGHT)
    note(v, C, RIGHT)  # 3 of 4: decided
    assert note(v, D, RIGHT, now=T0 + 61) == [Late(D, 1), Pay(D, 1)]
    w = verifier(replicas=2)
    note(w, A, RIGHT)
    note(w, B, RIGHT)
    w.expire(T0 + 60, four)
    assert note(w, C, WRONG, now=T0 + 70) == [Late(C, 1), Refuse(C, 1, RefusalReason.WRONG, RIGHT)]


def test_a_verdict_is_due_halfway_to_the_notes_expiry_at_the_latest() -> None:
    v = verifier(replicas=2, window_s=600)
    v.note(A, 1, RIGHT, expires_at=T0 + 100, now=T0, expected=four)
    assert v.next_deadline() == T0 + 50  # the seller still has 50 s to get the verdict


def test_each_unit_is_judged_on_its_own() -> None:
    v = verifier(replicas=2)
    note(v, A, RIGHT, unit=1)
    note(v, B, RIGHT, unit=2)
    assert v.held(A, 1) == RIGHT and v.held(B, 2) == RIGHT  # no agreement across units


def test_a_seller_notes_a_unit_once() -> None:
    v = verifier()
    note(v, A, RIGHT)
    with pytest.raises(LocalProtocolError):
        note(v, A, WRONG)


def test_spot_checks_are_keyed_draws_at_the_rate() -> None:
    draws = [spot_checked(KEY, JOB, A, unit, 0.1) for unit in range(1, 5001)]
    assert 350 < sum(draws) < 650  # 500 expected
    assert draws == [spot_checked(KEY, JOB, A, unit, 0.1) for unit in range(1, 5001)]
    other_key = [spot_checked(b"x" * 32, JOB, A, unit, 0.1) for unit in range(1, 5001)]
    assert other_key != draws  # without the key, which units are checked cannot be told
    assert not any(spot_checked(KEY, JOB, A, unit, 0.0) for unit in range(1, 200))
    assert all(spot_checked(KEY, JOB, A, unit, 1.0) for unit in range(1, 200))


def test_a_spot_checked_note_waits_for_its_proof() -> None:
    v = verifier(replicas=1, spot_rate=1.0, window_s=60)
    assert note(v, A, RIGHT) == [AskProof(A, 1, RIGHT, T0 + 60)]
    assert v.proof(A, 1, True, T0 + 1) == [Pay(A, 1)]
    assert v.proof(A, 1, False, T0 + 2) == []  # after the verdict: nothing
    note(v, B, RIGHT)
    assert v.proof(B, 1, False, T0 + 1) == [Refuse(B, 1, RefusalReason.PROOF, RIGHT)]
    note(v, C, RIGHT)
    assert v.expire(T0 + 60, four) == [Refuse(C, 1, RefusalReason.PROOF, RIGHT)]  # no proof
    with pytest.raises(LocalProtocolError):
        verifier(replicas=1).proof(A, 1, True, T0)  # no spot check was asked


def test_a_failed_proof_does_not_count_towards_agreement() -> None:
    v = Verifier(Verification(2, 1.0, 60), JOB, KEY)
    note(v, A, WRONG)
    note(v, B, WRONG)
    v.proof(A, 1, False, T0)
    v.proof(B, 1, False, T0)
    note(v, C, RIGHT)
    note(v, D, RIGHT)
    v.proof(C, 1, True, T0)
    v.proof(D, 1, True, T0)
    decisions = v.expire(T0 + 60, four)
    assert decisions == [Pay(C, 1), Pay(D, 1)]


def test_spot_checks_need_a_secret() -> None:
    with pytest.raises(LocalProtocolError):
        Verifier(Verification(1, 0.5, 60), JOB, b"")


def test_a_proof_is_the_state_whose_digest_the_note_carries() -> None:
    state = b"the model after round 3"
    assert proves(state, evidence_of(state))
    assert not proves(state + b"!", evidence_of(state))


# ------------------------------------------------------------------ whole markets

PEERS = [Identity.generate().peer_id for _ in range(9)]
PRICES = (1000, 2000, 3000, 4000, 5000, 6000)


def replicated(
    n: int,
    replicas: int,
    *,
    chaos: random.Random | None = None,
    spot_rate: float = 0.0,
    units: int = 3,
    **kwargs: object,
) -> Market:
    rfq = make_rfq(
        units=units,
        min_peers=n,
        max_peers=n,
        verification=Verification(replicas, spot_rate, 60),
    )
    offers = [seller_offer(p) for p in PRICES[: n + 1]]  # one standby
    return Market(rfq, offers, peers=PEERS, chaos=chaos, spot_key=KEY, **kwargs)  # type: ignore[arg-type]


def pays(m: Market) -> Counter[tuple[PeerId, int]]:
    return Counter((a.seller, a.unit) for _, a in m.trace.ledger if isinstance(a, LedgerPay))


def wrong(m: Market) -> set[PeerId]:
    return {
        a.peer
        for who, a in m.trace.actions
        if isinstance(a, RecordWork) and a.event is PeerEvent.WRONG
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(3, 5), st.data(), st.integers(0, 2**32), st.booleans())
def test_liars_are_never_paid_where_honest_replicas_agree_and_honest_sellers_always_are(
    n: int, data: st.DataObject, seed: int, failure: bool
) -> None:
    """Honest sellers outnumber the liars (who collude: they all report the same wrong
    state), at least ``replicas`` of them; messages come in any order, twice, replayed."""
    liars = data.draw(st.integers(0, (n - 1) // 2))
    replicas = data.draw(st.integers(2, n - liars))
    m = replicated(n, replicas, chaos=random.Random(seed), liars=range(liars))
    m.post()
    m.work(1)
    if failure:  # an honest winner dies at round 2: its replacement's units are rounds 2..3
        m.fail(m.job.roster[-1], 2)
    m.work(3)
    m.finish()
    paid = pays(m)
    assert set(paid.values()) <= {1}  # once each
    assert not any(seller in m.liars for seller, _ in paid)
    assert wrong(m) == m.liars
    for seller, start in m.training.items():
        if seller in m.liars:
            continue
        first = m.rfq.units - start.units + 1
        last = first + m.done[seller] - 1
        assert {unit + first - 1 for s, unit in paid if s == seller} == set(
            range(first, last + 1)
        ), "an honest seller is paid for every round it did"
    # the liars saw a signed refusal for every unit and hold no note to forfeit
    for liar in m.liars:
        refused = {
            a.unit for who, a in m.trace.actions if who == liar and isinstance(a, NoteRefused)
        }
        assert refused == set(range(1, m.done[liar] + 1))
        assert m.books[liar].outbox() == []


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32))
def test_a_verifying_machine_rebuilt_from_its_events_is_the_same_machine(seed: int) -> None:
    m = replicated(4, 3, chaos=random.Random(seed), spot_rate=0.5, liars=[0], lazy=[1])
    m.post()
    m.work(3)
    m.finish()
    job, books = m.rebuild()
    assert vars(job) == vars(m.job)
    for peer, book in books.items():
        assert vars(book) == vars(m.books[peer])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32))
def test_every_deferred_payment_is_a_verified_note_with_its_signed_acknowledgement(
    seed: int,
) -> None:
    m = replicated(4, 3, chaos=random.Random(seed), spot_rate=0.3, liars=[0])
    m.post()
    m.work(3)
    m.finish()
    buyer = [a for who, a in m.trace.actions if who == m.buyer]
    notes = {digest(msg): msg for _, _, msg in m.trace.delivered if isinstance(msg, DebitNote)}
    paid = 0
    for i, pay in enumerate(buyer):
        if not isinstance(pay, LedgerPay):
            continue
        paid += pay.amount
        ack = buyer[i + 1]
        assert isinstance(ack, Reply | SendRequest)
        message = ack.message
        assert isinstance(message, DebitAck) and message.note_digest == pay.note_digest
        assert (message.seller, message.unit, message.amount) == (pay.seller, pay.unit, pay.amount)
        assert notes[pay.note_digest].evidence[1] == 0  # an honest state's evidence
    assert 0 < paid <= m.job.escrowed <= m.rfq.budget


def test_a_seller_that_cannot_prove_its_evidence_is_refused_and_marked_wrong() -> None:
    """A lazy seller copies the right evidence (it agrees with the replicas) but holds no
    state: every spot check catches it."""
    m = replicated(4, 2, spot_rate=1.0, lazy=[0])
    m.post()
    m.work(3)
    m.finish()
    lazy = m.sellers[0]
    queries = [a for _, a in m.trace.actions if isinstance(a, RequestProof)]
    assert {q.to for q in queries} == set(m.job.roster)
    assert lazy not in {seller for seller, _ in pays(m)}
    reasons = {
        msg.reason
        for _, to, msg in m.trace.delivered
        if isinstance(msg, DebitRefusal) and to == lazy
    }
    assert reasons == {RefusalReason.PROOF.value}
    assert wrong(m) == {lazy}
    assert len(pays(m)) == 3 * 3  # the three others, every round


def test_a_unit_without_enough_replicas_is_refused_unverified_and_nobody_is_blamed() -> None:
    m = replicated(4, 3)
    m.post()
    m.silent = {m.job.roster[2], m.job.roster[3]}  # they never report (nor are reported failed)
    m.work(1)
    assert pays(m) == Counter()
    m.tick(m.now + 120)  # past the unit's deadline
    assert pays(m) == Counter()
    refusals = [msg for _, _, msg in m.trace.delivered if isinstance(msg, DebitRefusal)]
    assert {r.reason for r in refusals} == {RefusalReason.UNVERIFIED.value}
    assert wrong(m) == set()


def test_held_notes_get_their_verdict_when_the_job_settles() -> None:
    m = replicated(4, 2)
    m.post()
    m.silent = {m.job.roster[3]}
    m.work(1)  # three agree of four expected: decided at once
    assert len(pays(m)) == 3
    m.silent = {m.job.roster[2], m.job.roster[3]}
    m.work(1)  # two agree, the other two could still tie: held
    assert len(pays(m)) == 3
    m.finish()  # settles: two agreeing replicas and nothing against them: paid
    assert len(pays(m)) == 5


def test_a_refused_note_is_never_resent_nor_forfeited() -> None:
    m = replicated(3, 2, liars=[0])
    m.post()
    liar = m.sellers[0]
    m.work(1)
    book = m.books[liar]
    assert book.outbox() == []
    m.silent.add(m.buyer)  # the buyer goes away: the honest notes of round 2 wait for it
    m.work(1)
    m.tick(m.now + 700)  # past the forfeit term
    forfeits = {who: a for who, a in m.trace.actions if isinstance(a, Forfeit)}
    assert 1 not in forfeits[liar].units  # the refused unit is not claimed


def test_a_held_unit_noted_again_with_other_evidence_is_refused() -> None:
    m = replicated(4, 3)
    m.post()
    m.silent = {m.job.roster[1], m.job.roster[2], m.job.roster[3]}
    m.work(1)
    seller = m.job.roster[0]
    ((_, note),) = m.books[seller].outbox()
    assert m.job.receive(seller, note, m.now) == []  # held: the same note again, nothing
    other = dataclasses.replace(note, evidence=OTHER)
    before = copy.deepcopy(vars(m.job))
    with pytest.raises(RemoteProtocolError) as caught:
        m.job.receive(seller, other, m.now)
    assert caught.value.reason is RejectReason.INCONSISTENT
    assert vars(m.job) == before


def test_only_the_buyer_refuses_or_spot_checks_and_only_our_own_notes() -> None:
    m = replicated(3, 2, liars=[0])
    m.post()
    m.work(1)
    liar, honest = m.sellers[0], m.sellers[1]
    refusal = next(msg for _, to, msg in m.trace.delivered if isinstance(msg, DebitRefusal))
    book = m.books[honest]
    (note,) = [n for n in book._leases[JOB].notes.values()]
    lease = book.lease(JOB)
    assert lease is not None
    cases = [
        (m.sellers[2], refusal, RejectReason.NOT_A_MEMBER),  # not from our lease's buyer
        (m.buyer, refusal, RejectReason.WRONG_CONTEXT),  # someone else's note
        (
            m.buyer,
            dataclasses.replace(refusal, seller=honest),  # our unit, not our note
            RejectReason.INCONSISTENT,
        ),
        (
            m.buyer,
            ProofQuery(JOB, int(m.now * 1000) + 9000, lease.award_digest, 1, OTHER),
            RejectReason.INCONSISTENT,  # a proof of evidence we never noted
        ),
        (
            m.buyer,
            ProofQuery(JOB, int(m.now * 1000) + 9000, bytes(32), 1, note.evidence),
            RejectReason.WRONG_CONTEXT,
        ),
    ]
    for sender, message, reason in cases:
        before = copy.deepcopy(vars(book))
        with pytest.raises(RemoteProtocolError) as caught:
            book.receive(sender, message, m.now)
        assert caught.value.reason is reason, message
        assert vars(book) == before
    # the liar's refused note: an acknowledgement for it afterwards is refused
    liar_book = m.books[liar]
    liar_note = liar_book._leases[JOB].notes[1]
    ack = DebitAck(JOB, liar_note.expires_ms, liar, 1, liar_note.amount, digest(liar_note))
    with pytest.raises(RemoteProtocolError) as caught:
        liar_book.receive(m.buyer, ack, m.now)
    assert caught.value.reason is RejectReason.INCONSISTENT


def test_a_replacement_bills_the_jobs_last_rounds() -> None:
    m = replicated(3, 2)
    m.post()
    m.work(1)
    gone = m.job.roster[0]
    m.fail(gone, 2)
    newcomer = next(p for p in m.job.roster if p in m.training and m.training[p].units == 2)
    m.work(2)
    assert m.done[newcomer] == 2
    notes = [msg for s, _, msg in m.trace.delivered if s == newcomer and isinstance(msg, DebitNote)]
    assert {n.unit for n in notes} == {1, 2}  # its lease's units 1..2 are the job's rounds 2..3
    assert {(s, u) for s, u in pays(m) if s == newcomer} == {(newcomer, 1), (newcomer, 2)}
    with pytest.raises(LocalProtocolError):
        m.books[newcomer].round_done(JOB, 1, RIGHT, m.now)  # round 1 was before it joined


def test_a_buyer_job_asking_for_spot_checks_needs_its_secret() -> None:
    rfq = make_rfq(verification=Verification(1, 0.5, 60))
    with pytest.raises(LocalProtocolError):
        BuyerJob(rfq)
    job = BuyerJob(rfq, spot_key=KEY)
    with pytest.raises(LocalProtocolError):
        job.proof_ok(SELLERS[0], 1, True, T0)  # no such seller, no such check


def _raw(peer: PeerId) -> bytes:
    return peer.raw


def test_an_order_asks_for_replicas_only_where_peers_agree_on_a_round() -> None:
    job = {"rounds": 3, "secure": False}
    order = TrainingOrder(job=job, budget=10**6, min_peers=3, max_peers=4,
                          verification=Verification(replicas=3))  # fmt: skip
    assert order.verification.replicas == 3
    with pytest.raises(ConfigError, match="min_peers"):
        TrainingOrder(job=job, budget=10**6, min_peers=2, max_peers=4,
                      verification=Verification(replicas=3))  # fmt: skip
    with pytest.raises(ConfigError, match="exact"):
        TrainingOrder(job={**job, "schedule": "moshpit"}, budget=10**6, min_peers=3,
                      verification=Verification(replicas=2))  # fmt: skip
