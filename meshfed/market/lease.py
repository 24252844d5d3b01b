"""The market's lease state machines: one :class:`BuyerJob` per posted job, one
:class:`SellerBook` per node. Sans-IO: events in, actions out; time is passed in (seconds).

Theory of operation (SPEC.md, "Market messages and leases").

The buyer::

    BIDDING --every asked peer answered, or the bid deadline--> clear()
        --no winners--> ENDED (NoBids)
        --winners--> LedgerEscrow(total), Award to every winner, Release to every loser
    AWARDING --a Lease from every winner--> StartJob(roster)             RUNNING
             --a LeaseDecline, or no answer by the award's expiry--> replace() from standby
             --a Lease after the award's expiry--> Reply(Settle(0, "cancelled")), replace()
    RUNNING  --peer_failed--> RosterUpdate without it; replace(); its Lease--> RosterUpdate
             --DebitNote--> LedgerPay, then Reply(DebitAck)   (the same unit again: the same ack)
                  with verification (replicas, spot checks: verification.py) the note is
                  held until its verdict: LedgerPay then DebitAck, or a DebitRefusal
                  (RequestProof for a spot check, answered by proof_ok)
    finish() / cancel() / no replacement affordable--> LedgerRelease, Settle to every seller
    SETTLING --a Receipt from every seller, or the settle deadline--> ENDED

The seller (per RFQ, then per lease)::

    Rfq --requirements, price, capacity--> Reply(Bid) (reserves until the bid expires)
                                        or Reply(Decline(reason))
    Release --> the reservation is freed at once
    Award for its own bid --> Reply(Lease), StartTraining     (else Reply(LeaseDecline))
    round_done --> DebitNote to the buyer, resent (WakeAt) until acknowledged
    DebitAck --> LedgerEarn                       (once per unit, whatever arrives again)
    DebitRefusal --> NoteRefused: the note leaves the outbox (never resent nor forfeited)
    ProofQuery for a note of ours --> ServeProof (the driver serves that unit's state)
    a note unacknowledged until it expires (the lease's forfeit term) --> Forfeit, lease ends
    Settle --> Reply(Receipt): the seller's own acknowledged totals (once the acks the
               settlement counts are in, or when it expires)

Every event is checked in full before anything changes: a message that fails a check raises
:class:`~meshfed.errors.RemoteProtocolError` with its counted reason and leaves the machine as
it was. Every message is idempotent: one that arrives again (replayed, duplicated, resent)
gives the answer it gave the first time and no second ledger action. A peer that holds no
award is refused with ``NOT_A_MEMBER`` ("not awarded", :class:`~meshfed.errors.NotAwarded`'s
case on the wire); an expired message with ``STALE``.

The driver applies every ledger action before it sends the message after it (write-ahead):
``LedgerEscrow`` before the awards, ``LedgerPay`` before the acknowledgement. For the ledger's
evidence it attaches the signed frame of the seller's note ``note_digest`` to a ``LedgerPay``
(with verification a note held for its verdict is paid in a later event: the frame of that
note, received before) and the buyer's acknowledgement being received to a ``LedgerEarn``.
Both machines are deterministic functions of their events, so a driver that writes each
event ahead rebuilds them after a crash by feeding the events again.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from dataclasses import replace as with_fields

from ..errors import (
    BudgetExceeded,
    LocalProtocolError,
    MarketError,
    NoBids,
    RemoteProtocolError,
)
from ..identity import PeerId
from ..membership.records import Capabilities
from ..stats import RejectReason
from .auction import AuctionTerms, Clearing, Offer, Winner, clear, replace
from .matching import ask_for, unmet
from .messages import (
    MAX_ROSTER,
    Award,
    Bid,
    BidCapabilities,
    DebitAck,
    DebitNote,
    DebitRefusal,
    Decline,
    DeclineReason,
    Lease,
    LeaseDecline,
    MarketMessage,
    ProofQuery,
    Receipt,
    RefusalReason,
    Release,
    Rfq,
    RosterUpdate,
    Settle,
    SettleReason,
    Verification,
    check_fresh,
    digest,
)
from .reputation import PeerEvent
from .terms import Tier, WorkKind
from .tiers import scoring_for
from .verification import AskProof, Late, Pay, Verdict, Verifier

__all__ = [
    "LeaseAction",
    "BuyerJob",
    "BuyerState",
    "ChangeRoster",
    "Forfeit",
    "JobEnded",
    "LedgerEarn",
    "LedgerEscrow",
    "LedgerPay",
    "LedgerRelease",
    "NoteRefused",
    "RecordWork",
    "Reply",
    "RequestProof",
    "SellerBook",
    "SellerOffer",
    "SendRequest",
    "ServeProof",
    "StartJob",
    "StartTraining",
    "WakeAt",
]


# ---------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Send ``message`` to ``to`` (its answer, if any, comes back through ``receive``)."""

    to: PeerId
    message: MarketMessage


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the message being received with ``message``."""

    message: MarketMessage


@dataclass(frozen=True, slots=True)
class LedgerEscrow:
    """Move ``amount`` from the buyer's available credits into the job's escrow (``key``
    makes it idempotent). Applied before the awards it pays for go out."""

    job: str
    amount: int
    key: str


@dataclass(frozen=True, slots=True)
class LedgerPay:
    """Pay ``seller`` ``amount`` for ``unit`` of its lease out of the job's escrow (idempotent
    by job, seller, unit); evidence: the seller's signed note ``note_digest``. Applied before
    the acknowledgement is sent."""

    job: str
    seller: PeerId
    unit: int
    amount: int
    note_digest: bytes


@dataclass(frozen=True, slots=True)
class LedgerRelease:
    """Return what is left in the job's escrow to the buyer (idempotent by ``key``)."""

    job: str
    key: str


@dataclass(frozen=True, slots=True)
class LedgerEarn:
    """Book ``amount`` earned from ``buyer`` for ``unit`` (idempotent by job, buyer, unit);
    evidence: the buyer's signed acknowledgement ``ack_digest``."""

    job: str
    buyer: PeerId
    unit: int
    amount: int
    ack_digest: bytes


@dataclass(frozen=True, slots=True)
class StartJob:
    """Buyer: every winner holds its lease; the job runs with ``roster``."""

    job: str
    roster: tuple[PeerId, ...]
    roster_version: int


@dataclass(frozen=True, slots=True)
class StartTraining:
    """Seller: the lease is ours; run ``spec`` (the RFQ's job spec bytes) with ``roster``,
    reporting each unit with :meth:`SellerBook.round_done`."""

    job: str
    buyer: PeerId
    spec: bytes
    roster: tuple[PeerId, ...]
    roster_version: int
    units: int


@dataclass(frozen=True, slots=True)
class ChangeRoster:
    """Seller: the buyer signed a new roster for the job from round ``from_round`` on."""

    job: str
    roster: tuple[PeerId, ...]
    roster_version: int
    from_round: int


@dataclass(frozen=True, slots=True)
class Forfeit:
    """Seller: the buyer left ``units`` unacknowledged past the lease's forfeit term; the lease
    ends and ``amount`` is claimed against the buyer's escrow (evidence: the award, the lease
    and the unanswered notes)."""

    job: str
    buyer: PeerId
    units: tuple[int, ...]
    amount: int


@dataclass(frozen=True, slots=True)
class JobEnded:
    """The job (buyer) or the lease (seller) is over: ``reason``, and on the buyer side the
    error that ended it early (None when it ended as asked)."""

    job: str
    reason: str
    error: MarketError | None = None


@dataclass(frozen=True, slots=True)
class RequestProof:
    """Buyer, spot check: send ``query`` to ``to``, fetch the state it names (the unit's
    bytes, outside the message) and report ``verification.proves(state, query.evidence)``
    with :meth:`BuyerJob.proof_ok` (nothing by ``query.expires_ms`` counts as a failure)."""

    to: PeerId
    query: ProofQuery


@dataclass(frozen=True, slots=True)
class RecordWork:
    """Buyer: record ``event`` (a late or wrong result) for ``peer`` in the reputation book."""

    job: str
    peer: PeerId
    event: PeerEvent


@dataclass(frozen=True, slots=True)
class ServeProof:
    """Seller: ``buyer`` spot-checks ``unit`` (the lease's): let it fetch the state that unit
    produced, whose digest is ``evidence``."""

    job: str
    buyer: PeerId
    unit: int
    evidence: bytes


@dataclass(frozen=True, slots=True)
class NoteRefused:
    """Seller: the buyer refused to pay ``unit`` (the lease's) for ``reason``
    (:class:`~meshfed.market.messages.RefusalReason`); the note is dropped."""

    job: str
    buyer: PeerId
    unit: int
    reason: str


@dataclass(frozen=True, slots=True)
class WakeAt:
    """Call ``expire(now)`` at ``at`` seconds (a deadline passes then)."""

    at: float


LeaseAction = (
    SendRequest
    | Reply
    | LedgerEscrow
    | LedgerPay
    | LedgerRelease
    | LedgerEarn
    | StartJob
    | StartTraining
    | ChangeRoster
    | Forfeit
    | JobEnded
    | RequestProof
    | RecordWork
    | ServeProof
    | NoteRefused
    | WakeAt
)


def _ms(now: float) -> int:
    return int(now * 1000)


def _reject(reason: RejectReason, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason=reason)


def _not_awarded(peer: PeerId, job: str) -> RemoteProtocolError:
    return _reject(RejectReason.NOT_A_MEMBER, f"not awarded: {peer} holds no award in {job!r}")


# ------------------------------------------------------------------------------------ buyer


class BuyerState(enum.StrEnum):
    """Where a posted job is; see the module docstring."""

    NEW = "new"
    BIDDING = "bidding"
    AWARDING = "awarding"
    RUNNING = "running"
    SETTLING = "settling"
    ENDED = "ended"


@dataclass(slots=True)
class _Contract:
    """One award the buyer made, and what became of it."""

    award: Award
    digest: bytes
    accepted: bool = False
    #: the units it may be paid for (its award's, or fewer once it failed or declined)
    payable: int = 0
    #: unit -> the acknowledgement sent for it
    acks: dict[int, DebitAck] = field(default_factory=dict)
    #: unit -> its note while it waits for its verdict (verification)
    held: dict[int, DebitNote] = field(default_factory=dict)
    #: unit -> the refusal sent for it
    refusals: dict[int, DebitRefusal] = field(default_factory=dict)
    #: set once it is out of the job (declined, timed out, failed)
    gone: bool = False

    @property
    def paid(self) -> int:
        return sum(ack.amount for ack in self.acks.values())

    @property
    def committed(self) -> int:
        """What the buyer may still owe it plus what it paid."""
        return self.paid + (self.payable - len(self.acks)) * self.award.price


class BuyerJob:
    """One job a buyer posts, from its RFQ to the last receipt.

    Args:
        rfq: the request for quotes (the driver builds it; its ``job`` names the job).
        accept_window_s: how long a winner has to accept its award.
        settle_window_s: how long the buyer waits for receipts.
        reliability: the buyer's reputation score per peer in [0, 1] (0.5 for strangers).
        locality: how close each locality hint is, in [0, 1] (0.5 for hints not listed).
        spot_key: the buyer's secret that draws the spot checks (at least 16 bytes when the
            RFQ asks for them; the same on every replay of the job).

    Raises:
        ConfigError: the RFQ's scoring overrides are not the tier's weights.
        LocalProtocolError: spot checks asked without a key.
    """

    def __init__(
        self,
        rfq: Rfq,
        *,
        accept_window_s: float = 10.0,
        settle_window_s: float = 60.0,
        reliability: Mapping[PeerId, float] | None = None,
        locality: Mapping[str, float] | None = None,
        spot_key: bytes = b"",
    ) -> None:
        self.rfq = rfq
        self.rfq_digest = digest(rfq)
        tier = Tier(rfq.tier)
        overrides = {weight.name: weight.value for weight in rfq.scoring}
        self._terms = AuctionTerms(
            tier=tier,
            units=rfq.units,
            min_winners=rfq.min_peers,
            max_winners=rfq.max_peers,
            budget=rfq.budget,
            scoring=scoring_for(tier, **overrides) if overrides else None,
            salt=rfq.job.encode(),
        )
        self._accept_window_s = accept_window_s
        self._settle_window_s = settle_window_s
        self._reliability = dict(reliability or {})
        self._locality = dict(locality or {})
        self.state = BuyerState.NEW
        self._asked: frozenset[PeerId] = frozenset()
        self._bids: dict[PeerId, Bid] = {}
        self._declines: dict[PeerId, Decline] = {}
        self.clearing: Clearing | None = None
        #: current award per seller
        self._contracts: dict[PeerId, _Contract] = {}
        self._by_award: dict[bytes, _Contract] = {}
        self.roster: tuple[PeerId, ...] = ()
        self.roster_version = 0
        self._removed: list[PeerId] = []
        self._round = 0
        self.escrowed = 0
        self._escrows = 0
        self._settles: dict[PeerId, tuple[Settle, bytes]] = {}
        #: sellers whose acceptance came too late, and the settlement that ended their lease
        self._withdrawn: dict[PeerId, tuple[Settle, bytes]] = {}
        self._receipts: dict[PeerId, Receipt] = {}
        self._settle_reason = SettleReason.DONE
        self._settle_deadline = 0.0
        self.error: MarketError | None = None
        self._verifier = Verifier(rfq.verification, rfq.job, spot_key)

    # ------------------------------------------------------------------ what a user reads

    @property
    def job(self) -> str:
        return self.rfq.job

    @property
    def paid(self) -> dict[PeerId, int]:
        """Micro-credits paid per seller so far."""
        return {peer: c.paid for peer, c in self._contracts.items() if c.acks}

    @property
    def refused(self) -> dict[PeerId, int]:
        """Units refused per seller so far (verification's verdicts: never paid)."""
        return {peer: len(c.refusals) for peer, c in self._contracts.items() if c.refusals}

    def award_to(self, peer: PeerId) -> Award | None:
        """The current award to ``peer``, if any."""
        contract = self._contracts.get(peer)
        return None if contract is None else contract.award

    @property
    def active(self) -> tuple[PeerId, ...]:
        """The sellers holding an accepted lease that is not over."""
        return tuple(p for p, c in self._contracts.items() if c.accepted and not c.gone)

    # ------------------------------------------------------------------------- events

    def start(self, now: float, peers: Collection[PeerId]) -> list[LeaseAction]:
        """Ask every peer in ``peers`` (those whose records match) for a quote, all at once.

        Raises:
            LocalProtocolError: started twice, or with no peer to ask.
        """
        if self.state is not BuyerState.NEW:
            raise LocalProtocolError(f"job {self.job!r} was started already")
        if not peers:
            raise LocalProtocolError(f"job {self.job!r}: no peer to ask for a quote")
        self._asked = frozenset(peers)
        self.state = BuyerState.BIDDING
        actions: list[LeaseAction] = [
            SendRequest(peer, self.rfq) for peer in sorted(self._asked, key=_raw)
        ]
        actions.append(WakeAt(self.rfq.bid_deadline_ms / 1000))
        return actions

    def receive(self, sender: PeerId, message: MarketMessage, now: float) -> list[LeaseAction]:
        """Take one message ``sender`` signed.

        Raises:
            RemoteProtocolError: the message is refused (with its counted reason); nothing
                changed.
        """
        if message.job != self.job:
            raise _reject(RejectReason.WRONG_CONTEXT, f"{message.TYPE} for another job")
        if isinstance(message, Bid | Decline):
            return self._on_answer(sender, message, now)
        if isinstance(message, Lease | LeaseDecline):
            return self._on_lease(sender, message, now)
        if isinstance(message, DebitNote):
            return self._on_note(sender, message, now)
        if isinstance(message, Receipt):
            return self._on_receipt(sender, message, now)
        raise _reject(RejectReason.WRONG_CONTEXT, f"a buyer takes no {message.TYPE}")

    def expire(self, now: float) -> list[LeaseAction]:
        """Deadlines up to ``now`` passed: close the bid window, replace winners that did not
        accept in time, end a settlement whose receipts did not all come."""
        now_ms = _ms(now)
        if self.state is BuyerState.BIDDING and now_ms >= self.rfq.bid_deadline_ms:
            return self._close(now)
        if self.state in (BuyerState.AWARDING, BuyerState.RUNNING):
            verdicts = self._decided(self._verifier.expire(now, self._expected), None)
            late = [
                peer
                for peer, c in self._contracts.items()
                if not c.accepted and not c.gone and c.award.expires_ms < now_ms
            ]
            if late:
                return verdicts + self._replace(late, now, at_round=self._round)
            return verdicts + self._next_wake()
        if self.state is BuyerState.SETTLING and now >= self._settle_deadline:
            self.state = BuyerState.ENDED
            return [JobEnded(self.job, self._settle_reason.value, self.error)]
        return []

    def peer_failed(self, peer: PeerId, at_round: int, now: float) -> list[LeaseAction]:
        """``peer`` stopped working from round ``at_round`` (1-based) on: take it off the
        roster at once and award its remaining rounds to the best standby bid.

        Raises:
            LocalProtocolError: ``peer`` is not in the running job's roster.
        """
        if self.state not in (BuyerState.AWARDING, BuyerState.RUNNING) or peer not in self.roster:
            raise LocalProtocolError(f"{peer} is not in the roster of job {self.job!r}")
        if not 1 <= at_round <= self.rfq.units:
            raise LocalProtocolError(f"round {at_round} is outside 1..{self.rfq.units}")
        self._round = max(self._round, at_round)
        return self._replace([peer], now, at_round=at_round)

    def proof_ok(self, seller: PeerId, unit: int, ok: bool, now: float) -> list[LeaseAction]:
        """The spot check of ``seller``'s note for ``unit`` (its lease's unit, as in the
        :class:`RequestProof`) passed (``ok``) or failed. An outcome after the note's verdict
        changes nothing.

        Raises:
            LocalProtocolError: no spot check of that note was asked.
        """
        contract = self._contracts.get(seller)
        if contract is None:
            raise LocalProtocolError(f"{seller} holds no award in job {self.job!r}")
        decisions = self._verifier.proof(seller, unit + self._skipped(contract), ok, now)
        return self._decided(decisions, None) + self._next_wake()

    def finish(self, now: float, reason: SettleReason = SettleReason.DONE) -> list[LeaseAction]:
        """End the job (done, or cancelled by the user): release the escrow's rest and settle
        every lease. A second call changes nothing."""
        if self.state in (BuyerState.SETTLING, BuyerState.ENDED):
            return []
        if self.state in (BuyerState.NEW, BuyerState.BIDDING):
            releases = self._release_bidders(now)
            self.state = BuyerState.ENDED
            return [*releases, JobEnded(self.job, reason.value, self.error)]
        return self._settle(now, reason)

    def cancel(self, now: float) -> list[LeaseAction]:
        """The user cancels the job: :meth:`finish` with reason ``cancelled``."""
        return self.finish(now, SettleReason.CANCELLED)

    # -------------------------------------------------------------------------- bids

    def _on_answer(self, sender: PeerId, answer: Bid | Decline, now: float) -> list[LeaseAction]:
        if sender not in self._asked:
            raise _reject(RejectReason.NOT_A_MEMBER, f"{sender} was not asked for a quote")
        if answer.rfq_digest != self.rfq_digest:
            raise _reject(RejectReason.WRONG_CONTEXT, "an answer to another RFQ")
        before = self._bids.get(sender) or self._declines.get(sender)
        if before == answer:
            return []  # the same answer again
        if before is not None:
            raise _reject(RejectReason.DUPLICATE, f"{sender} answered already (bids are sealed)")
        if self.state is not BuyerState.BIDDING:
            raise _reject(RejectReason.LATE, f"the bid window of {self.job!r} is closed")
        check_fresh(answer, _ms(now))
        if isinstance(answer, Bid):
            if answer.units < self.rfq.units:
                raise _reject(
                    RejectReason.INCONSISTENT,
                    f"a bid reserving {answer.units} of the {self.rfq.units} units asked",
                )
            self._bids[sender] = answer
        else:
            self._declines[sender] = answer
        if len(self._bids) + len(self._declines) == len(self._asked):
            return self._close(now)  # everyone answered: no reason to wait
        return []

    def _offer(self, bidder: PeerId, bid: Bid, fastest: float) -> Offer:
        seen = bid.capabilities
        return Offer(
            bidder=bidder,
            price=bid.price,
            speed=seen.throughput / fastest if fastest > 0 else 0.5,
            reliability=min(1.0, max(0.0, self._reliability.get(bidder, 0.5))),
            locality=min(1.0, max(0.0, self._locality.get(seen.locality, 0.5))),
            accelerator=bool(seen.accelerator),
        )

    def _close(self, now: float) -> list[LeaseAction]:
        """The bid window closes: clear, escrow, award the winners, release the losers."""
        now_ms = _ms(now)
        live = {peer: bid for peer, bid in self._bids.items() if bid.expires_ms >= now_ms}
        fastest = max((bid.capabilities.throughput for bid in live.values()), default=0.0)
        offers = [self._offer(peer, bid, fastest) for peer, bid in sorted(live.items(), key=_kraw)]
        try:
            clearing = clear(self._terms, offers)
        except NoBids as exc:
            self.error = exc
            self.state = BuyerState.ENDED
            return [*self._release_bidders(now), JobEnded(self.job, "no bids", exc)]
        self.clearing = clearing
        self.state = BuyerState.AWARDING
        self.roster = tuple(winner.bidder for winner in clearing.winners)
        self.roster_version = 1
        actions: list[LeaseAction] = [*self._escrow(clearing.total)]
        for winner in clearing.winners:
            actions.append(self._award(winner, self.rfq.units, now))
        winners = set(self.roster)
        actions += [
            SendRequest(peer, Release(self.job, self._expiry(now), self.rfq_digest))
            for peer in sorted(self._bids, key=_raw)
            if peer not in winners
        ]
        return [*actions, *self._next_wake()]

    def _release_bidders(self, now: float) -> list[LeaseAction]:
        return [
            SendRequest(peer, Release(self.job, self._expiry(now), self.rfq_digest))
            for peer in sorted(self._bids, key=_raw)
        ]

    def _expiry(self, now: float) -> int:
        return _ms(now + self._accept_window_s)

    def _escrow(self, needed: int) -> list[LeaseAction]:
        """Escrow up to ``needed`` in all (nothing if it is escrowed already)."""
        if needed <= self.escrowed:
            return []
        self._escrows += 1
        amount, self.escrowed = needed - self.escrowed, needed
        return [LedgerEscrow(self.job, amount, key=f"{self.job}:escrow:{self._escrows}")]

    def _award(self, winner: Winner, units: int, now: float) -> SendRequest:
        award = Award(
            job=self.job,
            expires_ms=self._expiry(now),
            rfq_digest=self.rfq_digest,
            winner=winner.bidder,
            price=winner.price,
            units=units,
            roster=list(self.roster),
            roster_version=self.roster_version,
            forfeit_after_s=self.rfq.forfeit_after_s,
        )
        contract = _Contract(award, digest(award), payable=units)
        self._contracts[winner.bidder] = contract
        self._by_award[contract.digest] = contract
        return SendRequest(winner.bidder, award)

    # ------------------------------------------------------------------------ leases

    def _on_lease(
        self, sender: PeerId, answer: Lease | LeaseDecline, now: float
    ) -> list[LeaseAction]:
        contract = self._by_award.get(answer.award_digest)
        if contract is None or contract.award.winner != sender:
            if sender not in self._contracts:
                raise _not_awarded(sender, self.job)
            raise _reject(RejectReason.WRONG_CONTEXT, "an answer to an award we did not make")
        if contract.accepted:
            if isinstance(answer, Lease):
                return []  # the same acceptance again
            raise _reject(RejectReason.INCONSISTENT, f"{sender} accepted, then declined")
        withdrawn = self._withdrawn.get(sender)
        if withdrawn is not None:  # its acceptance came too late before: the same answer
            return [Reply(withdrawn[0])] if isinstance(answer, Lease) else []
        if isinstance(answer, LeaseDecline) and contract.gone:
            return []  # declined (or timed out) before
        now_ms = _ms(now)
        check_fresh(answer, now_ms)
        live = self.state in (BuyerState.AWARDING, BuyerState.RUNNING)
        if isinstance(answer, LeaseDecline):
            if not live:
                raise _reject(RejectReason.LATE, f"job {self.job!r} is over")
            return self._replace([sender], now, at_round=self._round)
        if live and not contract.gone and contract.award.expires_ms >= now_ms:
            contract.accepted = True
            return self._roster_formed(now)
        # Accepted too late (the award expired, was replaced, or the job is over): the seller
        # may have started, so its lease is ended at once, with nothing owed either way.
        actions: list[LeaseAction] = []
        if live and not contract.gone:
            actions = self._replace([sender], now, at_round=self._round)
        contract.gone = True
        settle = Settle(self.job, _ms(now + self._settle_window_s), 0, 0, "cancelled")
        self._withdrawn[sender] = (settle, digest(settle))
        return [*actions, Reply(settle)]

    def _roster_formed(self, now: float) -> list[LeaseAction]:
        """After an acceptance: start the job once every award is accepted, or tell a running
        job's peers who joined."""
        if any(not c.accepted for c in self._contracts.values() if not c.gone):
            return self._next_wake()
        if self.state is BuyerState.AWARDING:
            self.state = BuyerState.RUNNING
            stale = [
                peer
                for peer in self.roster
                if self._contracts[peer].award.roster_version < self.roster_version
            ]
            start: list[LeaseAction] = [StartJob(self.job, self.roster, self.roster_version)]
            return start + self._roster_change(now, stale, from_round=0)
        self.roster_version += 1
        return self._roster_change(now, list(self.roster), from_round=self._round)

    def _roster_change(self, now: float, to: list[PeerId], *, from_round: int) -> list[LeaseAction]:
        if not to:
            return []
        change = RosterUpdate(
            job=self.job,
            expires_ms=_ms(now + self._settle_window_s),
            roster_version=self.roster_version,
            roster=list(self.roster),
            from_round=from_round,
            replaced=[peer for peer in self._removed if peer not in self.roster][-MAX_ROSTER:],
        )
        return [SendRequest(peer, change) for peer in to]

    def _replace(self, gone: list[PeerId], now: float, *, at_round: int) -> list[LeaseAction]:
        """``gone`` are out of the job: replace them from standby, or carry on without them
        while ``min_peers`` remain, or end the job."""
        assert self.clearing is not None
        for peer in gone:
            contract = self._contracts[peer]
            contract.gone = True
            if contract.accepted:  # paid for the rounds before ``at_round`` it did
                before = at_round - 1 - self._skipped(contract)
                contract.payable = max(len(contract.acks), min(contract.payable, before))
            else:
                contract.payable = 0
        self._removed += gone
        self.roster = tuple(peer for peer in self.roster if peer not in gone)
        self.roster_version += 1
        actions: list[LeaseAction] = []
        if self.state is BuyerState.RUNNING and len(self.roster) >= self.rfq.min_peers:
            # below min_peers the job cannot run (its order said so): the peers hear of the
            # change once the replacements accepted, or the job settles
            actions += self._roster_change(now, list(self.roster), from_round=at_round)
        units = self.rfq.units
        if self.state is BuyerState.RUNNING:
            units -= max(0, at_round - 1)  # the rounds still to do
        committed = sum(c.committed for c in self._contracts.values())
        try:
            chosen = replace(
                with_fields(self._terms, units=units),
                self.clearing,
                gone=set(self._contracts),
                needed=len(gone),
                budget_left=self.rfq.budget - committed,
            )
        except (NoBids, BudgetExceeded) as exc:
            if len(self.roster) >= self.rfq.min_peers:
                return [*actions, *self._roster_formed_after_loss(now)]
            self.error = exc
            reason = (
                SettleReason.BUDGET if isinstance(exc, BudgetExceeded) else SettleReason.CANCELLED
            )
            return [*actions, *self._settle(now, reason)]
        self.roster = self.roster + tuple(winner.bidder for winner in chosen)
        new_total = committed + sum(winner.price for winner in chosen) * units
        actions += self._escrow(new_total)
        actions += [self._award(winner, units, now) for winner in chosen]
        return [*actions, *self._next_wake()]

    def _roster_formed_after_loss(self, now: float) -> list[LeaseAction]:
        if self.state is BuyerState.AWARDING:
            return self._roster_formed(now)
        return self._next_wake()

    def _next_wake(self) -> list[LeaseAction]:
        pending = [
            (c.award.expires_ms + 1) / 1000
            for c in self._contracts.values()
            if not c.accepted and not c.gone
        ]
        verdict = self._verifier.next_deadline()
        if verdict is not None:
            pending.append(verdict)
        return [WakeAt(min(pending))] if pending else []

    # ------------------------------------------------------------------------- debits

    def _on_note(self, sender: PeerId, note: DebitNote, now: float) -> list[LeaseAction]:
        contract = self._by_award.get(note.award_digest)
        if contract is None or contract.award.winner != sender:
            if sender not in self._contracts:
                raise _not_awarded(sender, self.job)
            raise _reject(RejectReason.WRONG_CONTEXT, "a note for a lease it does not hold")
        if not contract.accepted:
            raise _not_awarded(sender, self.job)
        if note.amount != contract.award.price:
            raise _reject(
                RejectReason.INCONSISTENT,
                f"a note of {note.amount} for a unit leased at {contract.award.price}",
            )
        done = contract.acks.get(note.unit)
        if done is not None:
            return [Reply(done)]  # the same unit again: the same acknowledgement, no payment
        refused = contract.refusals.get(note.unit)
        if refused is not None:
            return [Reply(refused)]  # the same unit again: the same refusal
        held = contract.held.get(note.unit)
        if held is not None:
            if held.evidence != note.evidence:
                raise _reject(
                    RejectReason.INCONSISTENT, f"unit {note.unit} noted again with other evidence"
                )
            return []  # the same unit again, still waiting for its verdict
        if not 1 <= note.unit <= contract.payable:
            raise _reject(
                RejectReason.INCONSISTENT, f"unit {note.unit} outside 1..{contract.payable}"
            )
        if self.state not in (BuyerState.AWARDING, BuyerState.RUNNING):
            raise _reject(RejectReason.LATE, f"job {self.job!r} is settled")
        check_fresh(note, _ms(now))
        contract.held[note.unit] = note
        decisions = self._verifier.note(
            sender,
            note.unit + self._skipped(contract),
            note.evidence,
            expires_at=note.expires_ms / 1000,
            now=now,
            expected=self._expected,
        )
        return self._decided(decisions, (sender, note.unit)) + self._next_wake()

    # ------------------------------------------------------------------- verification

    def _skipped(self, contract: _Contract) -> int:
        """The job's units before ``contract``'s first: a lease's unit k is the job's unit
        k + skipped (a replacement's units are the job's last)."""
        return self.rfq.units - contract.award.units

    def _expected(self, unit: int) -> int:
        """How many sellers are expected to note the job's ``unit``: the awards still live
        or accepted whose payable units cover it."""
        return sum(
            1
            for c in self._contracts.values()
            if (c.accepted or not c.gone)
            and self._skipped(c) < unit <= self._skipped(c) + c.payable
        )

    def _decided(
        self, decisions: list[Verdict], answering: tuple[PeerId, int] | None
    ) -> list[LeaseAction]:
        """The actions the verifier's ``decisions`` call for; the answer to the note being
        received (``answering``: its seller and unit) is a reply, any other a request."""
        actions: list[LeaseAction] = []
        for decision in decisions:
            contract = self._contracts[decision.seller]
            unit = decision.unit - self._skipped(contract)
            if isinstance(decision, Late):
                actions.append(RecordWork(self.job, decision.seller, PeerEvent.LATE))
                continue
            if isinstance(decision, AskProof):
                query = ProofQuery(
                    self.job, _ms(decision.by), contract.digest, unit, decision.evidence
                )
                actions.append(RequestProof(decision.seller, query))
                continue
            note = contract.held.pop(unit)
            answer: DebitAck | DebitRefusal
            if isinstance(decision, Pay) and unit <= contract.payable:
                answer = DebitAck(
                    self.job, note.expires_ms, decision.seller, unit, note.amount, digest(note)
                )
                contract.acks[unit] = answer
                actions.append(
                    LedgerPay(self.job, decision.seller, unit, note.amount, answer.note_digest)
                )
            else:  # refused, or verified for a unit no longer the seller's (it failed before)
                reason, agreed = RefusalReason.LEASE, b""
                if not isinstance(decision, Pay):
                    reason, agreed = decision.reason, decision.agreed
                answer = DebitRefusal(
                    self.job, note.expires_ms, decision.seller, unit, digest(note), reason, agreed
                )
                contract.refusals[unit] = answer
                if reason in (RefusalReason.WRONG, RefusalReason.PROOF):
                    actions.append(RecordWork(self.job, decision.seller, PeerEvent.WRONG))
            here = answering == (decision.seller, unit)
            actions.append(Reply(answer) if here else SendRequest(decision.seller, answer))
        return actions

    # ---------------------------------------------------------------------- settlement

    def _settle(self, now: float, reason: SettleReason) -> list[LeaseAction]:
        # the notes still held get their verdicts first: the settlement counts them
        actions = self._decided(self._verifier.close(now), None)
        self.state = BuyerState.SETTLING
        self._settle_reason = reason
        self._settle_deadline = now + self._settle_window_s
        actions.append(LedgerRelease(self.job, key=f"{self.job}:release"))
        for peer, contract in sorted(self._contracts.items(), key=_kraw):
            if not contract.accepted:
                continue
            settle = Settle(
                job=self.job,
                expires_ms=_ms(self._settle_deadline),
                units=len(contract.acks),
                amount=contract.paid,
                reason=reason.value,
            )
            self._settles[peer] = (settle, digest(settle))
            actions.append(SendRequest(peer, settle))
        if not self._settles:
            self.state = BuyerState.ENDED
            return [*actions, JobEnded(self.job, reason.value, self.error)]
        return [*actions, WakeAt(self._settle_deadline)]

    def _on_receipt(self, sender: PeerId, receipt: Receipt, now: float) -> list[LeaseAction]:
        withdrawn = self._withdrawn.get(sender)
        if withdrawn is not None and receipt.settle_digest == withdrawn[1]:
            return []  # the receipt for a lease withdrawn before it began: nothing to record
        sent = self._settles.get(sender)
        if sent is None:
            if sender not in self._contracts:
                raise _not_awarded(sender, self.job)
            raise _reject(RejectReason.WRONG_CONTEXT, f"{sender} was sent no settlement")
        settle, settle_digest = sent
        if receipt.settle_digest != settle_digest:
            raise _reject(RejectReason.WRONG_CONTEXT, "a receipt for another settlement")
        if (receipt.units, receipt.amount) != (settle.units, settle.amount):
            raise _reject(
                RejectReason.INCONSISTENT,
                f"{sender} acknowledges {receipt.units} units, {receipt.amount} paid; "
                f"we settled {settle.units} units, {settle.amount}",
            )
        if sender in self._receipts:
            return []
        if self.state is not BuyerState.SETTLING:
            raise _reject(RejectReason.LATE, f"job {self.job!r} ended")
        check_fresh(receipt, _ms(now))
        self._receipts[sender] = receipt
        if len(self._receipts) == len(self._settles):
            self.state = BuyerState.ENDED
            return [JobEnded(self.job, self._settle_reason.value, self.error)]
        return []


def _raw(peer: PeerId) -> bytes:
    return peer.raw


def _kraw(item: tuple[PeerId, object]) -> bytes:
    return item[0].raw


# ----------------------------------------------------------------------------------- seller


@dataclass(frozen=True, slots=True)
class SellerOffer:
    """What this node offers the market (its own data, not the network's).

    Attributes:
        capabilities: what its signed record says (data sets, memory, battery, roles, and
            the asks: its price per unit by kind and tier; no ask, no bid).
        capacity: how many reservations and leases it holds at once.
        throughput: examples (or requests) per second it expects to sustain.
        locality: a hint for buyers (region, network).
        hold_s: how long past the bid deadline a bid holds its reservation.
        max_wait_s: the furthest bid deadline it bids for (so that no RFQ holds a
            reservation for longer than ``max_wait_s + hold_s``).
        paused: why the device takes no work now (its policy's reasons: battery,
            temperature, ...); while any, it declines RFQs and awards.
    """

    capabilities: Capabilities
    capacity: int = 1
    throughput: float = 0.0
    locality: str = ""
    hold_s: float = 30.0
    max_wait_s: float = 600.0
    paused: tuple[str, ...] = ()


@dataclass(slots=True)
class _Quote:
    """One RFQ this seller answered."""

    buyer: PeerId
    rfq: Rfq
    answer: Bid | Decline
    reserved: bool  # holds capacity until the bid expires or is released


@dataclass(slots=True)
class _SellerLease:
    buyer: PeerId
    award: Award
    award_digest: bytes
    accepted: Lease
    roster_version: int
    #: the job's units before the lease's first (a replacement's units are the job's last)
    skipped: int = 0
    #: how the buyer checks the units (the RFQ's terms): spot checks ask for their states
    verification: Verification = field(default_factory=Verification)
    notes: dict[int, DebitNote] = field(default_factory=dict)
    acks: dict[int, DebitAck] = field(default_factory=dict)
    refusals: dict[int, DebitRefusal] = field(default_factory=dict)
    next_try: dict[int, tuple[float, float]] = field(default_factory=dict)  # unit: at, delay
    #: the buyer's settlement, once it came, and our receipt, once we gave it
    settle: Settle | None = None
    receipt: Receipt | None = None
    ended: bool = False

    @property
    def outbox(self) -> list[DebitNote]:
        return [
            note
            for unit, note in sorted(self.notes.items())
            if unit not in self.acks and unit not in self.refusals
        ]

    def totals(self) -> tuple[int, int]:
        """Units acknowledged and what they earned."""
        return len(self.acks), sum(ack.amount for ack in self.acks.values())

    def close(self, settle: Settle) -> Receipt:
        """End the lease with our receipt for ``settle``: our own acknowledged totals."""
        units, amount = self.totals()
        self.receipt = Receipt(settle.job, settle.expires_ms, digest(settle), units, amount)
        self.ended = True
        return self.receipt


class SellerBook:
    """Every quote and lease of one node, as a seller.

    Args:
        me: this node's peer id.
        offer: what it offers (see :class:`SellerOffer`).
        retry_s: the first delay before a debit note is sent again (doubling up to
            ``max_retry_s``).
        max_quotes: RFQs remembered at most (the oldest unreserved are forgotten first).
    """

    def __init__(
        self,
        me: PeerId,
        offer: SellerOffer,
        *,
        retry_s: float = 1.0,
        max_retry_s: float = 60.0,
        max_quotes: int = 4096,
    ) -> None:
        self.me = me
        self.offer = offer
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._max_quotes = max_quotes
        self._quotes: OrderedDict[tuple[PeerId, bytes], _Quote] = OrderedDict()
        self._leases: dict[str, _SellerLease] = {}

    # ------------------------------------------------------------------ what a user reads

    def reserved(self, now: float) -> int:
        """Reservations and leases held at ``now`` (at most ``offer.capacity``)."""
        now_ms = _ms(now)
        held = sum(
            1
            for quote in self._quotes.values()
            if quote.reserved and quote.answer.expires_ms >= now_ms
        )
        return held + sum(1 for lease in self._leases.values() if not lease.ended)

    def lease(self, job: str) -> _SellerLease | None:
        """This node's lease in ``job``, if it holds one."""
        return self._leases.get(job)

    def outbox(self) -> list[tuple[PeerId, DebitNote]]:
        """Every debit note not yet acknowledged, with its buyer (the driver persists these)."""
        return [
            (lease.buyer, note)
            for lease in self._leases.values()
            if not lease.ended
            for note in lease.outbox
        ]

    # ------------------------------------------------------------------------- events

    def receive(self, sender: PeerId, message: MarketMessage, now: float) -> list[LeaseAction]:
        """Take one message ``sender`` signed.

        Raises:
            RemoteProtocolError: the message is refused (with its counted reason); nothing
                changed.
        """
        if isinstance(message, Rfq):
            return self._on_rfq(sender, message, now)
        if isinstance(message, Release):
            return self._on_release(sender, message)
        if isinstance(message, Award):
            return self._on_award(sender, message, now)
        lease = self._leases.get(message.job)
        if lease is None or lease.buyer != sender:
            raise _reject(RejectReason.NOT_A_MEMBER, f"no lease from {sender} in {message.job!r}")
        if isinstance(message, DebitAck):
            return self._on_ack(lease, message, now)
        if isinstance(message, RosterUpdate):
            return self._on_roster(lease, message, now)
        if isinstance(message, Settle):
            return self._on_settle(lease, message, now)
        if isinstance(message, DebitRefusal):
            return self._on_refusal(lease, message, now)
        if isinstance(message, ProofQuery):
            return self._on_proof_query(lease, message, now)
        raise _reject(RejectReason.WRONG_CONTEXT, f"a seller takes no {message.TYPE}")

    def withdraw(self, now: float) -> list[LeaseAction]:
        """The device paused: every open bid stops holding its reservation (an award for one
        is declined while paused: the buyer replaces it from its standby bids)."""
        for quote in self._quotes.values():
            quote.reserved = False
        return []

    def round_done(self, job: str, round: int, evidence: bytes, now: float) -> list[LeaseAction]:
        """The job's unit ``round`` (1-based: the job's round, whatever unit of the lease it
        is) is done: note the debit to the buyer (resent until acknowledged). The same unit
        again changes nothing.

        Raises:
            LocalProtocolError: no lease in ``job``, a unit outside the lease, or evidence
                that is not a 32-byte digest.
        """
        lease = self._leases.get(job)
        if lease is None or lease.ended:
            raise LocalProtocolError(f"no running lease in job {job!r}")
        unit = round - lease.skipped
        if not 1 <= unit <= lease.award.units:
            first, last = lease.skipped + 1, lease.skipped + lease.award.units
            raise LocalProtocolError(f"round {round} outside the lease's {first}..{last}")
        if len(evidence) != 32:
            raise LocalProtocolError("evidence is a 32-byte digest")
        if unit in lease.notes:
            return []
        note = DebitNote(
            job=job,
            expires_ms=_ms(now + lease.award.forfeit_after_s),
            award_digest=lease.award_digest,
            unit=unit,
            amount=lease.award.price,
            evidence=evidence,
        )
        lease.notes[unit] = note
        lease.next_try[unit] = (now + self._retry_s, self._retry_s)
        return [SendRequest(lease.buyer, note), WakeAt(now + self._retry_s)]

    def expire(self, now: float) -> list[LeaseAction]:
        """Send again every note due for a retry; forfeit leases whose buyer left a note
        unacknowledged past its expiry."""
        now_ms = _ms(now)
        actions: list[LeaseAction] = []
        wake: list[float] = []
        for job, lease in self._leases.items():
            if lease.ended:
                continue
            if lease.settle is not None and lease.settle.expires_ms < now_ms:
                actions += self._unpaid(job, lease)  # the acks it promised never came
                receipt = lease.close(lease.settle)
                actions += [SendRequest(lease.buyer, receipt), JobEnded(job, lease.settle.reason)]
                continue
            if any(note.expires_ms < now_ms for note in lease.outbox):
                lease.ended = True  # the claim stands for its notes: no late ack is taken
                actions += self._unpaid(job, lease)
                actions.append(JobEnded(job, SettleReason.FORFEIT.value))
                continue
            if lease.settle is not None:
                wake.append(lease.settle.expires_ms / 1000 + 0.001)
            for note in lease.outbox:
                at, delay = lease.next_try[note.unit]
                if at <= now:
                    delay = min(delay * 2, self._max_retry_s)
                    at = now + delay
                    lease.next_try[note.unit] = (at, delay)
                    actions.append(SendRequest(lease.buyer, note))
                wake.append(min(at, note.expires_ms / 1000 + 0.001))
        if wake:
            actions.append(WakeAt(min(wake)))
        return actions

    @staticmethod
    def _unpaid(job: str, lease: _SellerLease) -> list[LeaseAction]:
        """The lease ends with notes neither paid nor refused: claim them (a buyer that settles
        owes them still; they are not sent again)."""
        claimed = lease.outbox
        if not claimed:
            return []
        for note in claimed:
            del lease.notes[note.unit]
        units = tuple(note.unit for note in claimed)
        return [Forfeit(job, lease.buyer, units, sum(note.amount for note in claimed))]

    # -------------------------------------------------------------------------- quotes

    def _on_rfq(self, buyer: PeerId, rfq: Rfq, now: float) -> list[LeaseAction]:
        key = (buyer, digest(rfq))
        known = self._quotes.get(key)
        if known is not None:
            return [Reply(known.answer)]  # the same RFQ again: the same answer
        now_ms = _ms(now)
        check_fresh(rfq, now_ms)
        if rfq.bid_deadline_ms < now_ms:
            raise _reject(RejectReason.LATE, f"the bid window of {rfq.job!r} closed")
        price = self._ask(rfq)
        reason = DeclineReason.PAUSED if self.offer.paused else self._unfit(rfq, price)
        if reason is None and rfq.bid_deadline_ms > _ms(now + self.offer.max_wait_s):
            reason = DeclineReason.DEADLINE
        if reason is None and self.reserved(now) >= self.offer.capacity:
            reason = DeclineReason.BUSY
        answer: Bid | Decline
        if reason is None and price is not None:
            answer = Bid(
                job=rfq.job,
                expires_ms=rfq.bid_deadline_ms + int(self.offer.hold_s * 1000),
                rfq_digest=key[1],
                price=price,
                units=rfq.units,
                capabilities=self._snapshot(rfq),
            )
        else:
            why = (reason or DeclineReason.KIND).value
            detail = ", ".join(self.offer.paused) if reason is DeclineReason.PAUSED else ""
            answer = Decline(rfq.job, rfq.bid_deadline_ms, key[1], why, detail)
        self._remember(key, _Quote(buyer, rfq, answer, reserved=isinstance(answer, Bid)))
        return [Reply(answer)]

    def _remember(self, key: tuple[PeerId, bytes], quote: _Quote) -> None:
        self._quotes[key] = quote
        while len(self._quotes) > self._max_quotes:
            oldest = next(
                (k for k, q in self._quotes.items() if not q.reserved), next(iter(self._quotes))
            )
            del self._quotes[oldest]

    def _unfit(self, rfq: Rfq, price: int | None) -> DeclineReason | None:
        """The first requirement of ``rfq`` this node fails (``price``: our ask), or None."""
        kind, tier = WorkKind(rfq.kind), Tier(rfq.tier)
        unfit = unmet(rfq.requirements, self.offer.capabilities, kind=kind, tier=tier)
        if unfit is None and price is not None and price * rfq.units * rfq.max_peers > rfq.budget:
            return DeclineReason.PRICE
        return unfit

    def _ask(self, rfq: Rfq) -> int | None:
        """Our price per unit for the RFQ's kind and tier (None: we do not sell it)."""
        return ask_for(self.offer.capabilities, WorkKind(rfq.kind), Tier(rfq.tier))

    def _snapshot(self, rfq: Rfq) -> BidCapabilities:
        caps = self.offer.capabilities
        held = {offer.name: offer.examples for offer in caps.datasets}
        return BidCapabilities(
            examples=held.get(rfq.requirements.dataset, 0),
            throughput=self.offer.throughput,
            accelerator=caps.accelerator,
            memory_mb=caps.memory_mb,
            battery_pct=caps.battery_pct,
            locality=self.offer.locality,
        )

    def _on_release(self, buyer: PeerId, release: Release) -> list[LeaseAction]:
        quote = self._quotes.get((buyer, release.rfq_digest))
        if quote is None or quote.rfq.job != release.job:
            raise _reject(RejectReason.WRONG_CONTEXT, f"no quote of ours for {buyer} to release")
        quote.reserved = False  # again, or after the award it lost to: nothing more
        return []

    # -------------------------------------------------------------------------- leases

    def _on_award(self, buyer: PeerId, award: Award, now: float) -> list[LeaseAction]:
        if award.winner != self.me:
            raise _reject(RejectReason.WRONG_CONTEXT, "an award to another peer")
        award_digest = digest(award)
        held = self._leases.get(award.job)
        if held is not None and held.award_digest == award_digest:
            return [Reply(held.accepted)]  # the same award again: the same acceptance
        now_ms = _ms(now)
        check_fresh(award, now_ms)
        quote = self._quotes.get((buyer, award.rfq_digest))
        refusal = self._refusal(quote, award, now)
        if refusal:
            return [Reply(LeaseDecline(award.job, award.expires_ms, award_digest, refusal))]
        assert quote is not None
        quote.reserved = False  # the lease holds the capacity now
        # the acceptance is good for the lease's term (the buyer refuses it past the award's)
        accepted = Lease(award.job, now_ms + award.forfeit_after_s * 1000, award_digest)
        self._leases[award.job] = _SellerLease(
            buyer,
            award,
            award_digest,
            accepted,
            award.roster_version,
            skipped=max(0, quote.rfq.units - award.units),
            verification=quote.rfq.verification,
        )
        return [
            Reply(accepted),
            StartTraining(
                job=award.job,
                buyer=buyer,
                spec=quote.rfq.spec,
                roster=tuple(award.roster),
                roster_version=award.roster_version,
                units=award.units,
            ),
        ]

    def _refusal(self, quote: _Quote | None, award: Award, now: float) -> str:
        """Why this node will not take ``award`` ("" if it will)."""
        if quote is None or not isinstance(quote.answer, Bid) or quote.rfq.job != award.job:
            return "no bid of ours"
        if self.offer.paused:
            return f"device paused: {', '.join(self.offer.paused)}"
        if award.job in self._leases:
            return "already leased in this job"
        if award.price < quote.answer.price:
            return f"price {award.price} below our bid {quote.answer.price}"
        if award.units > quote.answer.units:
            return f"{award.units} units, we bid for {quote.answer.units}"
        if award.forfeit_after_s != quote.rfq.forfeit_after_s:
            return "forfeit terms differ from the RFQ's"
        held = quote.reserved and quote.answer.expires_ms >= _ms(now)
        if not held and self.reserved(now) >= self.offer.capacity:
            return "busy"
        return ""

    def _on_ack(self, lease: _SellerLease, ack: DebitAck, now: float) -> list[LeaseAction]:
        note = lease.notes.get(ack.unit)
        if ack.seller != self.me or note is None:
            raise _reject(RejectReason.WRONG_CONTEXT, "an acknowledgement of no note of ours")
        if ack.note_digest != digest(note) or ack.amount != note.amount:
            raise _reject(RejectReason.INCONSISTENT, "an acknowledgement that is not our note's")
        if ack.unit in lease.refusals:
            raise _reject(RejectReason.INCONSISTENT, "an acknowledgement of a refused note")
        if ack.unit in lease.acks:
            return []
        check_fresh(ack, _ms(now))
        lease.acks[ack.unit] = ack
        del lease.next_try[ack.unit]
        actions: list[LeaseAction] = [
            LedgerEarn(ack.job, lease.buyer, ack.unit, ack.amount, digest(ack))
        ]
        settle = lease.settle
        if (
            settle is not None
            and not lease.ended
            and lease.totals() >= (settle.units, settle.amount)
        ):
            actions += [
                SendRequest(lease.buyer, lease.close(settle)),
                JobEnded(ack.job, settle.reason),
            ]
        return actions

    def _on_refusal(
        self, lease: _SellerLease, refusal: DebitRefusal, now: float
    ) -> list[LeaseAction]:
        note = lease.notes.get(refusal.unit)
        if refusal.seller != self.me or note is None:
            raise _reject(RejectReason.WRONG_CONTEXT, "a refusal of no note of ours")
        if refusal.note_digest != digest(note):
            raise _reject(RejectReason.INCONSISTENT, "a refusal that is not of our note")
        if refusal.unit in lease.acks:
            raise _reject(RejectReason.INCONSISTENT, "a refusal of an acknowledged note")
        known = lease.refusals.get(refusal.unit)
        if known is not None:
            if known != refusal:
                raise _reject(RejectReason.INCONSISTENT, "a second, different refusal")
            return []
        check_fresh(refusal, _ms(now))
        lease.refusals[refusal.unit] = refusal
        del lease.next_try[refusal.unit]
        return [NoteRefused(refusal.job, lease.buyer, refusal.unit, refusal.reason)]

    def _on_proof_query(
        self, lease: _SellerLease, query: ProofQuery, now: float
    ) -> list[LeaseAction]:
        if query.award_digest != lease.award_digest:
            raise _reject(RejectReason.WRONG_CONTEXT, "a spot check of another lease")
        note = lease.notes.get(query.unit)
        if note is None or note.evidence != query.evidence:
            raise _reject(RejectReason.INCONSISTENT, "a spot check of no note of ours")
        check_fresh(query, _ms(now))
        return [ServeProof(query.job, lease.buyer, query.unit, query.evidence)]

    def _on_roster(
        self, lease: _SellerLease, change: RosterUpdate, now: float
    ) -> list[LeaseAction]:
        if change.roster_version <= lease.roster_version:
            return []  # an older or the same change: we hold a newer roster
        if lease.ended:
            raise _reject(RejectReason.LATE, f"the lease in {change.job!r} is over")
        check_fresh(change, _ms(now))
        lease.roster_version = change.roster_version
        actions: list[LeaseAction] = [
            ChangeRoster(change.job, tuple(change.roster), change.roster_version, change.from_round)
        ]
        return actions

    def _on_settle(self, lease: _SellerLease, settle: Settle, now: float) -> list[LeaseAction]:
        if lease.settle is not None:
            if lease.settle != settle:
                raise _reject(RejectReason.INCONSISTENT, f"a second settlement of {settle.job!r}")
            return [] if lease.receipt is None else [Reply(lease.receipt)]
        check_fresh(settle, _ms(now))
        lease.settle = settle
        if lease.ended or lease.totals() >= (settle.units, settle.amount):
            # over already (forfeited), or every unit the buyer says it paid is acknowledged;
            # notes it settled without paying are claimed
            done = (
                []
                if lease.ended
                else [*self._unpaid(settle.job, lease), JobEnded(settle.job, settle.reason)]
            )
            return [Reply(lease.close(settle)), *done]
        # acknowledgements the buyer sent are still on their way: receipt once they are in
        return [WakeAt(settle.expires_ms / 1000 + 0.001)]
