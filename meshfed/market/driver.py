"""The market on a node: the trio driver of the lease machines (:mod:`.lease`).

:class:`Market` is one service per node (``open_node`` starts it when the node has a store).
As a seller it answers RFQs from its own offer (its signed record's capabilities, the asks
:mod:`.pricing` computes, its free capacity), accepts awards, runs the training it won
(:class:`~meshfed.training.job.TrainingPeer`) and notes a debit to the buyer for every round
it finished. As a buyer it posts the orders its user submits (:meth:`Market.submit_training`):
RFQs to every peer whose record matches, in parallel; the awards; a roster change when a
winner fails; an acknowledgement for every debit; the settlement at the end.

What the driver adds to the sans-IO machines:

- every ledger action is applied (in a worker thread: the store fsyncs) before any message
  after it in the same list is sent (write-ahead: no award without its escrow, no
  acknowledgement without its payment); the evidence of a payment is the counterpart's raw
  signed frame (:attr:`~meshfed.wire.Envelope.frame`);
- the requests a machine asks for go out at once, each in its own task with a deadline; the
  answer goes back into the machine; a peer that does not answer is dealt with by the
  machine's own deadlines (:class:`~.lease.WakeAt`);
- failure detection for a running job: a winner that stops answering status polls is
  reported to the machine, which replaces it;
- progress: every event a buyer's job goes through is kept in its :class:`JobHandle` (bids,
  award and clearing price, rounds, roster changes, the end) for the CLI's live view.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from ..arrays import ArrayHeader
from ..audit import AuditKind
from ..codec import schema_of
from ..errors import (
    BudgetExceeded,
    ConfigError,
    LocalProtocolError,
    MeshfedError,
    NoMatchingPeers,
    RemoteProtocolError,
    TransportError,
)
from ..heap import bulk_import
from ..identity import PeerId
from ..membership.records import Capabilities, PeerRecord
from ..membership.swim import MemberState
from ..stats import RejectReason
from ..wire import Envelope
from .delivery import ModelDelivery
from .journal import Journal, decode_message, encode_message
from .lease import (
    BuyerJob,
    BuyerState,
    ChangeRoster,
    Forfeit,
    JobEnded,
    LeaseAction,
    LedgerEarn,
    LedgerEscrow,
    LedgerPay,
    LedgerRelease,
    NoteRefused,
    RecordWork,
    Reply,
    RequestProof,
    SellerBook,
    SellerOffer,
    SendRequest,
    ServeProof,
    StartJob,
    StartTraining,
    WakeAt,
)
from .leasebook import LeaseBook, LeaseRole, LeaseState
from .ledger import AVAILABLE, Ledger
from .matching import Match, match
from .messages import (
    Award,
    Bid,
    DebitAck,
    DebitNote,
    DebitRefusal,
    Decline,
    JobStatusQuery,
    JobStatusReport,
    Lease,
    MarketMessage,
    PrivacyLevel,
    ProofQuery,
    Receipt,
    Release,
    Rfq,
    RosterUpdate,
    Settle,
    SettleReason,
    digest,
)
from .order import TrainingOrder, spec_from
from .pricing import AskPolicy, Conditions, Estimate, asks, check_budget, estimate
from .reputation import PeerEvent, Reputation
from .terms import MICRO, Tier, WorkKind, credits
from .verification import evidence_of, proves

if TYPE_CHECKING:
    from ..device.service import DeviceService
    from ..node import Node
    from ..training.job import RoundReport, TrainingPeer
    from ..training.participation import JobEvents

__all__ = ["JobHandle", "Market", "MarketConfig"]

log = logging.getLogger(__name__)

#: what a buyer sends a seller as a request (acknowledgements and refusals of notes held for
#: verification come later, as requests of their own)
_SELLER_MESSAGES: tuple[type[MarketMessage], ...] = (
    Rfq, Award, Release, RosterUpdate, Settle, DebitAck, DebitRefusal, ProofQuery,
)  # fmt: skip
#: what replaying the journal does not do again (sends, starts)
_NOT_ON_REPLAY = (SendRequest, StartJob, RequestProof, ServeProof)
#: the actions that move credits: applied in the journal's order (see ``_write``)
_LEDGER = (LedgerEscrow, LedgerPay, LedgerRelease, LedgerEarn, Forfeit)
_LedgerAction = LedgerEscrow | LedgerPay | LedgerRelease | LedgerEarn | Forfeit
#: spot-check proofs travel as arrays named ``<prefix><job hex>:<lease unit>``
_PROOF_PREFIX = "marketproof."
#: the round states a seller keeps for a spot-checked lease (the oldest unpaid go first)
_KEEP_STATES = 64
_GRANT_KEY = "initial"
#: the journal's machine names: the seller book, and one buyer job per posted job
_SELLER = "seller"
#: the quote messages whose events need not wait for the disk (see ``Market._event``)
_QUOTES = (Rfq, Release, Bid, Decline)
#: how long an event that need not wait for the disk (a quote's) may stay unwritten: it is
#: written with the next one that waits (the award, the close) or at the latest after this
_LIGHT_WRITE_S = 0.5
#: the clearing prices an estimate looks at (``LeaseBook.recent_clearing``'s default)
_CLEARINGS_KEPT = 32
#: the states of a winner's training that end its work (:class:`~meshfed.store.JobState`)
_ENDED_WORK = frozenset({"finished", "converged"})
#: a winner that says so stopped working on the job (its training failed, its device paused)
_GAVE_UP_WORK = frozenset({"failed", "paused"})
_BUYER = "buyer:"
#: how long a restarted winner asks its buyer whether the job still counts on it
_RESUME_ASK_S = 5.0


@dataclass(frozen=True, kw_only=True)
class MarketConfig:
    """How a node buys and sells.

    Attributes:
        capacity: leases (and reservations) it holds at once as a seller (0: it does not sell).
        grant: credits (micro) a new node starts with, granted once.
        asks: how it prices its work (:class:`~.pricing.AskPolicy`).
        throughput: examples per second it expects to sustain (its bids say so; buyers
            score speed by it, relative to the fastest bid).
        accept_window_s: how long a winner has to accept an award.
        settle_window_s: how long the buyer waits for receipts.
        request_within_s: the deadline of each market request.
        silent_polls: a winner that answers this many status polls in a row with silence is
            replaced.
        roster_wait_s: how long a winner waits for the rest of its roster to connect.
        status_every_s: how often a buyer asks its roster how the job is doing.
    """

    capacity: int = 1
    grant: int = 1_000 * MICRO
    asks: AskPolicy = field(default_factory=AskPolicy)
    throughput: float = 0.0
    accept_window_s: float = 10.0
    settle_window_s: float = 30.0
    request_within_s: float = 10.0
    silent_polls: int = 5
    roster_wait_s: float = 60.0
    status_every_s: float = 2.0


class JobHandle:
    """A job this node bought: its progress, as events, and its end.

    ``events`` are dicts with an ``event`` key: ``rfq`` (peers asked), ``bid`` / ``decline``
    (one per answer), ``award`` (winners and prices, total escrowed), ``started`` (the roster
    accepted), ``round`` (a debit note acknowledged: seller, unit), ``status`` (a roster peer's
    report), ``roster`` (a change), ``ended`` (reason, paid, error).
    """

    def __init__(self, market: Market, buyer: BuyerJob) -> None:
        self._market = market
        self.buyer = buyer
        self.events: list[dict[str, Any]] = []
        self.report: JobStatusReport | None = None
        #: the units paid per seller (units are paid in any order: a buyer that was away gets
        #: the notes of the rounds it missed by backoff, after later ones)
        self.paid_units: dict[PeerId, set[int]] = {}
        #: the signed frame of every debit note taken, by its digest (a held note's payment
        #: comes in a later event; its evidence is still the note)
        self.note_frames: dict[bytes, bytes] = {}
        #: spot checks asked and not answered yet: (seller, its lease unit) -> the query
        self.proofs: dict[tuple[PeerId, int], ProofQuery] = {}
        #: when the job's machine next needs :meth:`~.lease.BuyerJob.expire`
        self.wake_at = float("inf")
        #: status polls in a row each winner did not answer
        self.silence: dict[PeerId, int] = {}
        #: the furthest round any winner reported doing (a replacement joins after it)
        self.furthest = 0
        #: when the roster was last asked for a status report
        self.asked_at = 0.0
        self._changed = trio.Event()
        self._ended = trio.Event()

    @property
    def job_id(self) -> str:
        """The job's name."""
        return self.buyer.job

    def status(self) -> dict[str, Any]:
        """Where the job is now: state, roster, rounds paid, spent, the last report."""
        rounds = self.rounds_done()
        report = self.report
        return {
            "job_id": self.job_id,
            "state": self.buyer.state.value,
            "roster": [str(peer) for peer in self.buyer.roster],
            "rounds": self.buyer.rfq.units,
            "rounds_done": rounds,
            "escrowed": self.buyer.escrowed,
            "paid": sum(self.buyer.paid.values()),
            "accuracy": None if report is None else report.accuracy,
            "error": None if self.buyer.error is None else str(self.buyer.error),
        }

    def rounds_done(self) -> int:
        """How many rounds every active winner has been paid for (0 before the first)."""
        return min((self.units_paid(p) for p in self.buyer.active), default=0)

    def units_paid(self, seller: PeerId) -> int:
        """How many units ``seller`` was paid for."""
        return len(self.paid_units.get(seller, ()))

    async def wait(self) -> dict[str, Any]:
        """Wait until the job ended (settled, cancelled, or failed); its final status."""
        await self._ended.wait()
        return self.status()

    async def cancel(self) -> None:
        """End the job now: the escrow's rest comes back, every lease is settled."""
        await self._market._finish(self, SettleReason.CANCELLED)

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """Every event, from the first, as it happens; ends after ``ended``."""
        seen = 0
        while True:
            while seen < len(self.events):
                seen += 1
                yield self.events[seen - 1]
            if self._ended.is_set():
                return
            await self._changed.wait()

    def _add(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, "at": time.time(), **fields})
        self._changed.set()
        self._changed = trio.Event()
        if event == "ended":
            self._ended.set()


@dataclass(slots=True)
class _Work:
    """A lease this node won and the training it runs for it."""

    start: StartTraining
    #: the training peer while the training runs (its model, data and sessions: let go after)
    peer: TrainingPeer | None = None
    #: the examples it trains on (kept for the job's status after the peer is let go)
    examples: int = 0
    #: the training returned (done, failed, paused or cancelled): roster changes are moot
    finished: bool = False
    round: int = 0
    report: RoundReport | None = None
    state: str = "starting"
    #: roster changes signed by the buyer before the training peer exists (handed to it then)
    changes: list[ChangeRoster] = field(default_factory=list)
    #: the model's bytes after each job round (1-based) not paid yet: a spot check's proof
    states: dict[int, bytes] = field(default_factory=dict)
    #: the device paused: stop after the round under way (billed), status ``paused``
    leaving: bool = False
    #: rounds billed (noted, or about to be): fewer than the rounds done after a catch-up
    billed: int = 0
    #: the training's scope: cancelled when the lease ends (settled, cancelled, forfeited)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Market:
    """The market service of one node. Start with ``nursery.start(market.run)``.

    Raises:
        ConfigError: the node has no store (the ledger lives there).
    """

    def __init__(self, node: Node, config: MarketConfig | None = None) -> None:
        if node.store is None:
            raise ConfigError("the market needs the node's store (config store_file)")
        self.node = node
        self.config = config or MarketConfig()
        self.ledger = Ledger(node.store)
        self.book = LeaseBook(node.store)
        self.reputation = Reputation(node.store)
        self.journal = Journal(node.store)
        self.seller = SellerBook(node.peer_id, self._offer())
        #: called with every request a buyer sent the seller's book (RFQ, award, release,
        #: roster change, settlement) and the actions the book produced, once the journal
        #: holds it and before the actions are carried out: live views, benchmarks
        self.seller_observers: list[Callable[[PeerId, MarketMessage, list[LeaseAction]], None]] = []
        self.jobs: dict[str, JobHandle] = {}
        self.work: dict[str, _Work] = {}
        #: get the events of the work this node leased (``job_started``, ``round``, ...)
        self.observers: list[JobEvents] = []
        self._nursery: trio.Nursery | None = None
        self._unwritten: list[
            tuple[str, str, dict[str, Any], list[tuple[_LedgerAction, bytes]], trio.Event]
        ] = []
        #: an event is queued; an event waits for the disk
        self._journal_queued = trio.Event()
        self._journal_wanted = trio.Event()
        self._journal_error: MeshfedError | None = None
        self._seller_wake = trio.Event()
        self._seller_at = float("inf")
        #: set once the journal is replayed: requests that came before wait for it
        self._replayed = trio.Event()
        #: the newest clearing prices by kind and tier, newest first (the estimate's history):
        #: read from the store once, then kept here as auctions clear (no read on the way
        #: of a posting)
        self._clearings: dict[tuple[WorkKind, Tier], list[int]] = {}
        #: ledger actions applied with the journal write of the event that produced them (an
        #: action is its operation: equal ones are one, idempotent by key): None, or why the
        #: ledger refused (``_apply`` raises it)
        self._ledgered: dict[_LedgerAction, MeshfedError | None] = {}
        #: the lease book's writes, in the order they were asked for (FIFO): a lease's end is
        #: never written before the lease (whose write does not hold up the acceptance)
        self._book_turn = trio.Lock()
        #: the model, from the winners to the buyer (7f.6)
        self.delivery = ModelDelivery(
            node, buyer_of=self._buyer_of, within_s=self.config.request_within_s
        )

    # -- the service ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sell and buy until cancelled: first the journal is replayed (the leases and jobs of
        before a restart come back and go on), then the market's messages are answered (those
        that come meanwhile wait for the replay, within their senders' deadlines)."""
        await self._store_call(self.ledger.grant, self.config.grant, key=_GRANT_KEY, memo="start")
        for message_type in _SELLER_MESSAGES:
            self.node.handle(message_type, self._as_seller)
        self.node.handle(DebitNote, self._as_buyer)
        self.node.on_array(self._on_proof, prefix=_PROOF_PREFIX)
        self.node.handle(JobStatusQuery, self._status_query)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.delivery.start(nursery)
            nursery.start_soon(self._journal_writer)
            await self._replay()
            await self.publish_asks()
            self._replayed.set()
            nursery.start_soon(self._seller_timer)
            if self.node.device is not None:
                nursery.start_soon(self._follow_device, self.node.device)
            task_status.started()
            await trio.sleep_forever()

    async def _replay(self) -> None:
        """Rebuild the machines from the journal; resume the work and jobs still open."""
        entries = await trio.to_thread.run_sync(self.journal.entries)
        for entry in entries:
            actions = self._call(entry.machine, entry.event, entry.body)
            handle = self.jobs.get(entry.machine.removeprefix(_BUYER))
            evidence = entry.body.get("frame", b"")
            # an acceptance: in the book before its end is (a kill -9 between the journal's
            # write and the book's lost it); the type read as kept, ``_call`` decoded it
            accepted = entry.event == "receive" and entry.body["message"][0] == Lease.TYPE
            if handle is not None and accepted:
                sender = PeerId.of(entry.body["sender"])
                await self._put_lease(handle.job_id, LeaseRole.BUYER, sender, evidence)
            await self._apply(actions, evidence, seller=entry.machine == _SELLER, handle=handle,
                              replaying=True)  # fmt: skip
        assert self._nursery is not None
        for job, work in self.work.items():
            lease = self.seller.lease(job)
            if lease is not None and not lease.ended:
                self._nursery.start_soon(self._resume_work, work, lease.buyer)
        for handle in self.jobs.values():
            if handle.buyer.state is not BuyerState.ENDED:
                self._nursery.start_soon(self._buyer_loop, handle)
        if entries:
            log.info("market journal replayed", extra={"events": len(entries)})

    # -- the machines, journaled ---------------------------------------------------------------

    def _call(self, machine: str, event: str, body: dict[str, Any]) -> list[LeaseAction]:
        """Feed one event to its machine: the same code live and on replay (live, a message
        in ``body`` is the one the wire decoded; the journal keeps it encoded)."""
        now = body.get("now", 0.0)
        if machine == _SELLER:
            book = self.seller
            if event == "offer":
                caps = schema_of(Capabilities).decode(body["capabilities"], "capabilities")
                book.offer = SellerOffer(
                    capabilities=caps,
                    capacity=body["capacity"],
                    throughput=body.get("throughput", 0.0),
                    paused=tuple(body.get("paused", ())),
                )
                return []
            if event == "withdraw":
                return book.withdraw(now)
            if event == "receive":
                message = _message(body, "message")
                return book.receive(PeerId.of(body["sender"]), message, now)
            if event == "expire":
                return book.expire(now)
            if event == "round_done":
                return book.round_done(body["job"], body["unit"], body["evidence"], now)
        elif event == "new":
            rfq = _message(body, "rfq")
            assert isinstance(rfq, Rfq)
            buyer = BuyerJob(
                rfq,
                accept_window_s=body["accept_s"],
                settle_window_s=body["settle_s"],
                reliability={PeerId.of(raw): score for raw, score in body["reliability"]},
                spot_key=body.get("spot_key", b""),
            )
            self.jobs[rfq.job] = JobHandle(self, buyer)
            return []
        else:
            buyer = self.jobs[machine.removeprefix(_BUYER)].buyer
            if event == "start":
                return buyer.start(now, [PeerId.of(raw) for raw in body["peers"]])
            if event == "receive":
                message = _message(body, "message")
                actions = buyer.receive(PeerId.of(body["sender"]), message, now)
                if isinstance(message, DebitNote):  # its payment's evidence, now or later
                    self.jobs[buyer.job].note_frames[digest(message)] = body["frame"]
                return actions
            if event == "proof_ok":
                return buyer.proof_ok(PeerId.of(body["seller"]), body["unit"], body["ok"], now)
            if event == "expire":
                return buyer.expire(now)
            if event == "peer_failed":
                return buyer.peer_failed(PeerId.of(body["peer"]), body["at_round"], now)
            if event == "finish":
                return buyer.finish(now, SettleReason(body["reason"]))
        raise LocalProtocolError(f"market journal: no event {event!r} for {machine}")

    async def _event(
        self, machine: str, event: str, *, light: bool = False, **body: Any
    ) -> list[LeaseAction]:
        """Feed one event, then wait until the journal holds it (a refused one raises and is
        not journaled). Taken and queued with no checkpoint between: the journal's order is
        the machines' order, so a later event durable means every earlier one is.

        ``light``: a quote's event (an RFQ or a release at the seller, a bid or a decline at
        the buyer) does not wait for the disk when all it produced is its answer or a
        deadline: lost in a crash, the seller forgets a bid (and declines its award, which
        is replaced) or the buyer a bid (it is not awarded). It is written with the next
        event that waits (the award it led to, the close of the bid window), or
        ``_LIGHT_WRITE_S`` after it at the latest. A job's posting (``new``) is light too:
        its ``start``, queued right after it, waits for both. Anything else waits."""
        actions = self._call(machine, event, body)
        durable = not (light and all(_answers_a_quote(action) for action in actions))
        written = trio.Event()
        handle = None if machine == _SELLER else self.jobs.get(machine.removeprefix(_BUYER))
        evidence = body.get("frame", b"")
        ledger = [
            (action, _ledger_evidence(action, evidence, handle))
            for action in actions
            if isinstance(action, _LEDGER)
        ]
        self._unwritten.append((machine, event, body, ledger, written))
        self._journal_queued.set()
        if durable:
            self._journal_wanted.set()
            await written.wait()
            if self._journal_error is not None:
                raise self._journal_error
        return actions

    async def _journal_writer(self) -> None:
        """Write what :meth:`_event` queued, in batches (one fsync each), in order: at once
        when an event waits for it, else (light events only) ``_LIGHT_WRITE_S`` later; on
        the way out (the node stops), what is queued."""
        try:
            while True:
                await self._journal_queued.wait()
                with trio.move_on_after(_LIGHT_WRITE_S):
                    await self._journal_wanted.wait()
                await self._write_queued()
        finally:
            with trio.CancelScope(shield=True):
                await self._write_queued()

    async def _write_queued(self) -> None:
        """Write every queued event in one batch, then wake whoever waits for them."""
        self._journal_queued, self._journal_wanted = trio.Event(), trio.Event()
        batch, self._unwritten = self._unwritten, []
        if not batch:
            return
        events = [(machine, event, body) for machine, event, body, _, _ in batch]
        ledger = [actions for *_, actions, _ in batch]
        try:
            self._ledgered.update(await self._store_call(self._write, events, ledger))
        except MeshfedError as exc:  # the store failed: every waiter learns it
            self._journal_error = exc
        for *_, written in batch:
            written.set()

    def _write(
        self,
        events: list[tuple[str, str, dict[str, Any]]],
        ledger: list[list[tuple[_LedgerAction, bytes]]],
    ) -> dict[_LedgerAction, MeshfedError | None]:
        """In a worker thread: journal ``events``, then apply the ledger actions each produced
        (with their evidence), in the machines' order: one trip to the thread, and no action
        overtakes an earlier one (a job's release applied before a payment its machine made
        first would leave the payment to an empty escrow). An event's actions after one the
        ledger refused are not applied (``_apply`` stops at the refusal). What each came
        to."""
        self.journal.append([(machine, event, _encoded(body)) for machine, event, body in events])
        outcomes: dict[_LedgerAction, MeshfedError | None] = {}
        for actions in ledger:
            for action, evidence in actions:
                outcomes[action] = refused = self._ledger_apply(action, evidence)
                if refused is not None:
                    break
        return outcomes

    def _ledger_apply(self, action: _LedgerAction, evidence: bytes) -> MeshfedError | None:
        """Apply one ledger action (idempotent by its key: a replayed one moves nothing);
        None, or why the ledger refused."""
        try:
            if isinstance(action, LedgerEscrow):
                self.ledger.escrow(action.job, action.amount, key=action.key)
            elif isinstance(action, LedgerPay):
                self.ledger.pay(
                    action.job, action.seller, action.unit, action.amount, evidence=evidence
                )
            elif isinstance(action, LedgerRelease):
                self.ledger.release(action.job, key=action.key)
            elif isinstance(action, LedgerEarn):
                self.ledger.earn(
                    action.job, action.buyer, action.unit, action.amount, evidence=evidence
                )
            else:  # every note of a lease is for the same price: the claim splits evenly (any
                # remainder on the last unit, so the books hold the claim to the micro-credit)
                each, rest = divmod(action.amount, len(action.units))
                for unit in action.units:
                    share = each + (rest if unit == action.units[-1] else 0)
                    self.ledger.forfeit(action.job, action.buyer, unit, share, evidence=evidence)
        except MeshfedError as exc:
            return exc
        return None

    async def _received(
        self, machine: str, envelope: Envelope, message: MarketMessage
    ) -> list[LeaseAction]:
        actions = await self._event(
            machine, "receive", light=isinstance(message, _QUOTES),
            sender=envelope.sender.raw, message=message, frame=envelope.frame,
            now=time.time(),
        )  # fmt: skip
        if machine != _SELLER and isinstance(message, Lease):  # accepted: its signature kept
            assert self._nursery is not None
            self._nursery.start_soon(
                self._put_lease, message.job, LeaseRole.BUYER, envelope.sender, envelope.frame
            )
        return actions

    async def publish_asks(self, conditions: Conditions | None = None) -> None:
        """Put this node's asks (from its policy and ``conditions``, default: its load and
        its device's readings now) in its signed record, so buyers can estimate and match."""
        load = self.seller.reserved(time.time()) / max(1, self.config.capacity)
        device = None if self.node.device is None else self.node.device.readings
        now = conditions or Conditions(
            load=min(load, 1.0),
            battery_pct=None if device is None else device.battery_pct,
            charging=None if device is None else device.charging,
            temperature_c=None if device is None else device.temperature_c,
        )
        prices = asks(self.config.asks, now) if self.config.capacity else []
        membership = self.node.membership
        if membership is not None:
            own = membership.table.get(self.node.peer_id)
            if own is not None:
                membership.update_capabilities(replace(own.capabilities, prices=prices))
        await self._offer_changed()

    async def _offer_changed(self) -> None:
        """Journal the offer the seller answers with, if it changed (a bid depends on it)."""
        offer = self._offer()
        if offer != self.seller.offer:
            caps = schema_of(Capabilities).encode(offer.capabilities)
            await self._event(
                _SELLER, "offer", capabilities=caps, capacity=offer.capacity,
                throughput=offer.throughput, paused=list(offer.paused),
            )  # fmt: skip

    def _offer(self) -> SellerOffer:
        membership = self.node.membership
        own = None if membership is None else membership.table.get(self.node.peer_id)
        caps = Capabilities() if own is None else own.capabilities
        device = self.node.device
        paused = () if device is None else tuple(r.value for r in device.decision.reasons)
        return SellerOffer(
            capabilities=caps, capacity=self.config.capacity, throughput=self.config.throughput,
            paused=paused,
        )  # fmt: skip

    async def _follow_device(self, device: DeviceService) -> None:
        """The device's policy paused it: open bids stop holding their reservations, awards
        and RFQs are declined, and each running lease stops after the round it is in (billed)
        and says so in its status (``paused``: its buyer replaces it). Cleared: it bids
        again."""
        async for decision in device.changes():
            await self._offer_changed()
            if decision.allowed:
                for work in self.work.values():  # cleared before the round under way ended
                    work.leaving = False
                await self.publish_asks()
                continue
            log.warning("device paused: no new work", extra={"reasons": decision.describe()})
            await self._event(_SELLER, "withdraw", now=time.time())
            for work in self.work.values():
                work.leaving = True

    # -- seller --------------------------------------------------------------------------------

    async def _as_seller(self, envelope: Envelope, message: MarketMessage) -> MarketMessage | None:
        await self._replayed.wait()
        if isinstance(message, Rfq | Award):  # answered with the offer as it is now
            await self._offer_changed()
        actions = await self._received(_SELLER, envelope, message)
        for observe in self.seller_observers:
            observe(envelope.sender, message, actions)
        return await self._apply(actions, envelope.frame, seller=True)

    async def _seller_timer(self) -> None:
        while True:
            with trio.move_on_at(_trio_at(self._seller_at)):
                await self._seller_wake.wait()
            self._seller_wake = trio.Event()
            if time.time() >= self._seller_at:
                self._seller_at = float("inf")
                actions = await self._event(_SELLER, "expire", now=time.time())
                await self._apply(actions, b"", seller=True)

    def _wake_seller(self, at: float) -> None:
        if at < self._seller_at:
            self._seller_at = at
            self._seller_wake.set()

    async def _resume_work(self, work: _Work, buyer: PeerId) -> None:
        """A lease open when this node stopped: train on, unless its buyer says the job went
        on without us (it replaced us meanwhile: nobody else would tell us) or is over. A
        buyer that does not answer leaves it to the roster (the training's catch-up)."""
        job = work.start.job
        report = None
        with contextlib.suppress(TransportError):
            answer = await self.node.request(
                buyer, JobStatusQuery(job, _ms(time.time() + 30)), within=_RESUME_ASK_S
            )
            report = answer.body if isinstance(answer.body, JobStatusReport) else None
        if report is not None and report.job == job:
            over = report.state in (BuyerState.SETTLING.value, BuyerState.ENDED.value)
            if over or self.node.peer_id not in report.roster:
                work.state, work.finished = "ended" if over else "replaced", True
                log.info("leased job went on without us", extra={"job": job, "buyer": report.state})
                return
        await self._train(work)

    async def _train(self, work: _Work) -> None:
        """Run the training a lease won; note a debit for every round done."""
        # torch's import takes seconds: in a worker thread, so that the loop answers the award
        # meanwhile (on the loop it held the answer past its deadline: a winner lost)
        # what it imports is frozen before this job's objects exist, if no other job's do
        with bulk_import(lambda: all(w.finished for w in self.work.values() if w is not work)):
            await trio.to_thread.run_sync(importlib.import_module, "meshfed.training.job")
        from ..training.participation import failure_reason, take_part

        start = work.start
        events = functools.partial(self._work_event, work)
        try:
            spec = spec_from(start.spec, [str(peer) for peer in start.roster])
        except ConfigError as exc:  # the buyer's job is bad: the lease's end
            work.finished = True
            events("job_failed", {"job_id": start.job, "error": failure_reason(exc)})
            return
        from ..training.roster import RosterChange

        joining = None
        if start.units < spec.rounds:  # a replacement: it joins the running job
            joining = RosterChange(
                roster=tuple(spec.roster), from_round=spec.rounds - start.units,
                version=start.roster_version,
            )  # fmt: skip
        work.state = "connecting"
        if self.node.device is not None:
            self.node.device.set_load(1.0)
        try:
            with work.scope:
                await take_part(
                    self.node, spec, events, roster_wait=self.config.roster_wait_s,
                    joining=joining, on_peer=functools.partial(self._peer_made, work),
                    on_round=functools.partial(self._round_done, work),
                )  # fmt: skip
        finally:  # its model, data and sessions: a node works on many leases in its life
            work.peer, work.finished = None, True
            work.changes.clear()
            if self.node.device is not None:
                self.node.device.set_load(0.0)
        if work.scope.cancelled_caught and work.state == "paused":
            events("job_failed", {"job_id": start.job, "error": "the device paused: handed back"})
        elif work.scope.cancelled_caught:
            work.state = "ended"
            events("job_failed", {"job_id": start.job, "error": "the lease ended"})

    def _peer_made(self, work: _Work, peer: TrainingPeer) -> None:
        work.peer, work.examples = peer, len(peer.shard)
        for change in work.changes:
            _change_roster(peer, change)
        work.changes.clear()

    def _work_event(self, work: _Work, event: str, document: dict[str, Any]) -> None:
        if event == "job_started":
            work.state = "running"
        elif event == "job_done":
            work.state = document["state"]
        elif event == "job_failed" and work.state != "paused":  # a pause is no failure
            work.state = "failed"
            log.warning("leased job failed", extra={"job": work.start.job, **document})
        for observer in self.observers:
            observer(event, document)

    def _round_done(self, work: _Work, report: RoundReport) -> None:
        """A round is done: its evidence is the digest of the model it ended with (the same
        bytes on every roster peer of an exact round: what replication compares), kept
        until the round is paid (what a spot check asks for)."""
        work.round, work.report = report.round + 1, report
        assert work.peer is not None and self._nursery is not None
        state = work.peer.parameters.tobytes()
        lease = self.seller.lease(work.start.job)
        if lease is not None and lease.verification.spot_rate > 0:  # it may be asked for
            work.states[work.round] = state
            while len(work.states) > _KEEP_STATES:
                del work.states[min(work.states)]
        work.billed += 1
        self._nursery.start_soon(self._bill, work, work.round, evidence_of(state))
        if work.leaving:  # handed back: the buyer sees ``paused`` and replaces us
            work.state = "paused"
            work.scope.cancel()

    def _forget_state(self, job: str, unit: int) -> None:
        """The lease's ``unit`` was paid or refused: its state is no longer asked for."""
        work, lease = self.work.get(job), self.seller.lease(job)
        if work is not None and lease is not None:
            work.states.pop(unit + lease.skipped, None)

    async def _serve_proof(self, serve: ServeProof) -> None:
        """Send the buyer the state of the unit it spot-checks (nothing if we lack it: the
        buyer's deadline fails the check)."""
        work, lease = self.work.get(serve.job), self.seller.lease(serve.job)
        state = None
        if work is not None and lease is not None:
            state = work.states.get(serve.unit + lease.skipped)
        if state is None or not proves(state, serve.evidence):
            log.warning("spot check of a round we no longer hold", extra={"job": serve.job})
            return
        name = f"{_PROOF_PREFIX}{serve.job.encode().hex()}:{serve.unit}"
        try:
            await self.node.send_array(
                serve.buyer, np.frombuffer(state, np.uint8), name=name,
                within=self.config.request_within_s,
            )  # fmt: skip
        except (TransportError, RemoteProtocolError) as exc:
            log.warning("spot-check proof not delivered", extra={"error": str(exc)})

    async def _on_proof(self, envelope: Envelope, header: ArrayHeader, array: Any) -> None:
        """A seller's proof for a spot check we asked for: judge it."""
        await self._replayed.wait()
        job_hex, _, unit_text = header.name.removeprefix(_PROOF_PREFIX).partition(":")
        try:
            job, unit = bytes.fromhex(job_hex).decode(), int(unit_text)
        except ValueError:
            job, unit = "", 0
        handle = self.jobs.get(job)
        query = None if handle is None else handle.proofs.pop((envelope.sender, unit), None)
        if handle is None or query is None:
            raise RemoteProtocolError(
                "a spot-check proof nobody asked for", reason=RejectReason.WRONG_CONTEXT
            )
        ok = array.dtype == np.uint8 and proves(array.tobytes(), query.evidence)
        actions = await self._event(
            _BUYER + job, "proof_ok", seller=envelope.sender.raw, unit=unit, ok=bool(ok),
            now=time.time(),
        )  # fmt: skip
        await self._apply(actions, b"", seller=False, handle=handle)

    async def _bill(self, work: _Work, unit: int, evidence: bytes) -> None:
        """Note the debit for one round done."""
        job = work.start.job
        try:
            actions = await self._event(
                _SELLER, "round_done", job=job, unit=unit, evidence=evidence, now=time.time()
            )
        except LocalProtocolError as exc:  # the lease ended (forfeit) or the job ran longer
            work.billed -= 1
            log.info("round not billed", extra={"job": job, "error": str(exc)})
            return
        await self._apply(actions, b"", seller=True)

    # -- buyer ---------------------------------------------------------------------------------

    async def submit_training(self, order: TrainingOrder) -> JobHandle:
        """Post ``order``: ask every matching peer for a quote; returns once the RFQs are out.

        Raises:
            NoMatchingPeers: no known peer meets the requirements (counts per requirement).
            BudgetTooLow: the budget is below the estimate (the error carries it).
            BudgetExceeded: the budget is more than this node's available credits.
            LocalProtocolError: a job of this name was posted already.
        """
        if order.job_id in self.jobs:
            raise LocalProtocolError(f"job {order.job_id!r} was posted already")
        records = self._records()
        kind, tier = order.kind, order.tier
        found = self.matching(order, records)
        if len(found.peers) < order.min_peers:
            raise NoMatchingPeers(
                f"job {order.job_id!r}: {len(found.peers)} of {len(records)} known peers meet "
                f"the requirements, {order.min_peers} needed",
                excluded=dict(found.excluded),
            )
        cost = await self.pricing_estimate(kind, tier, order.min_peers, order.rounds, records)
        check_budget(order.budget, cost)
        available = self.ledger.balance(AVAILABLE)
        if order.budget > available:
            raise BudgetExceeded(
                f"job {order.job_id!r}: budget {credits(order.budget)} exceeds the "
                f"{credits(available)} credits available"
            )
        now = time.time()
        rfq = Rfq(
            job=order.job_id,
            expires_ms=_ms(now + order.bid_window_s + self.config.accept_window_s),
            kind=kind.value,
            tier=order.tier.value,
            requirements=order.requirements,
            units=order.rounds,
            min_peers=order.min_peers,
            max_peers=order.max_peers,
            budget=order.budget,
            bid_deadline_ms=_ms(now + order.bid_window_s),
            privacy=_privacy(order.job),
            forfeit_after_s=int(order.forfeit_after_s),
            spec=order.job_bytes(),
            scoring=[],
            verification=order.verification,
        )
        machine = _BUYER + order.job_id
        scores = self.reputation.scores(found.peers)
        # the job and its start are written together: the start waits for both (one fsync)
        await self._event(
            machine, "new", light=True, rfq=rfq,
            accept_s=self.config.accept_window_s,
            settle_s=self.config.settle_window_s,
            reliability=[[peer.raw, score] for peer, score in scores.items()],
            spot_key=os.urandom(32),  # the journal is sealed in the store: it stays ours
        )  # fmt: skip
        handle = self.jobs[order.job_id]
        handle._add("rfq", asked=[str(peer) for peer in found.peers], estimate=cost.total)
        peers = [peer.raw for peer in found.peers]
        actions = await self._event(machine, "start", now=now, peers=peers)
        assert self._nursery is not None
        self._nursery.start_soon(self._buyer_loop, handle)
        await self._apply(actions, b"", seller=False, handle=handle)
        return handle

    async def pricing_estimate(
        self,
        kind: WorkKind,
        tier: Tier,
        participants: int,
        units: int,
        records: list[PeerRecord] | None = None,
    ) -> Estimate:
        """What ``participants`` peers doing ``units`` units each of ``kind`` in ``tier``
        cost, with its breakdown: the median of this node's recent clearing prices for the
        kind and tier, else of the asks in the records it holds, else the default price, less
        the tier's discount (:func:`~.pricing.estimate`)."""
        history = self._clearings.get((kind, tier))
        if history is None:  # read once; then every auction this node clears is added
            kept = await trio.to_thread.run_sync(self.book.recent_clearing, kind, tier)
            history = self._clearings.setdefault((kind, tier), [r.price for r in kept])
        known = self._records() if records is None else records
        return estimate(
            kind,
            tier,
            participants,
            units,
            history=history,
            asks=[ask for record in known for ask in record.capabilities.prices],
        )

    def matching(self, order: TrainingOrder, records: list[PeerRecord] | None = None) -> Match:
        """The known peers whose records meet ``order``'s requirements (this node excluded)."""
        return match(
            self._records() if records is None else records,
            order.requirements,
            kind=order.kind,
            tier=order.tier,
            exclude=self.node.peer_id,
        )

    def _records(self) -> list[PeerRecord]:
        membership = self.node.membership
        if membership is None:
            raise LocalProtocolError("buying needs membership (peer records to match)")
        return membership.peers()

    async def _as_buyer(self, envelope: Envelope, message: MarketMessage) -> MarketMessage | None:
        await self._replayed.wait()
        handle = self.jobs.get(message.job)
        if handle is None:
            raise RemoteProtocolError(
                f"no job {message.job!r} posted here", reason=RejectReason.NOT_A_MEMBER
            )
        actions = await self._received(_BUYER + message.job, envelope, message)
        return await self._apply(actions, envelope.frame, seller=False, handle=handle)

    async def _buyer_loop(self, handle: JobHandle) -> None:
        """The job's deadlines, its progress reports, failure detection and its end."""
        buyer = handle.buyer
        while buyer.state is not BuyerState.ENDED:
            await trio.sleep(min(self.config.status_every_s, 0.25))
            now = time.time()
            if now >= handle.wake_at:  # a deadline of the machine's passed
                handle.wake_at = float("inf")
                actions = await self._event(_BUYER + buyer.job, "expire", now=now)
                await self._apply(actions, b"", seller=False, handle=handle)
            if buyer.state is BuyerState.RUNNING:
                await self._watch_roster(handle, now)

    async def _watch_roster(self, handle: JobHandle, now: float) -> None:
        """Ask the roster how the job goes; end it once every winner is paid for every unit
        or reports it stopped (converged); replace a winner that is dead, silent for
        ``silent_polls`` polls in a row (rounds behind is no signal: push-sum peers run apart).

        Debit notes are no failure signal: a buyer that was away gets them late, by backoff."""
        buyer = handle.buyer
        # the units of each winner's lease that were judged (paid, or refused by verification)
        judged = {
            peer: handle.units_paid(peer) + buyer.refused.get(peer, 0) for peer in buyer.active
        }
        units = {peer: _lease_units(buyer, peer) for peer in buyer.active}
        if judged and all(judged[peer] >= units[peer] for peer in judged):
            await self._done(handle)
            return
        if now - handle.asked_at < self.config.status_every_s:
            return
        handle.asked_at = now
        reports = await self._poll(handle)
        ended = [r for r in reports.values() if r.state in _ENDED_WORK]
        # every winner stopped (converged early, or all rounds ran), or the job's last round
        # is done (a replacement that never caught up has nothing left to do)
        last = any(r.round >= buyer.rfq.units for r in ended)
        if ended and (len(ended) == len(judged) or last):
            noted = {p: 0 if p not in reports else reports[p].noted for p in judged}
            if all(judged[p] >= noted[p] for p in judged):  # every note they billed is in
                await self._done(handle)
            return
        membership = self.node.membership
        for peer in buyer.active:
            report = reports.get(peer)
            silence = handle.silence.get(peer, 0)
            dead = membership is not None and membership.swim.state(peer) is MemberState.DEAD
            silent = silence >= self.config.silent_polls or (dead and silence > 0)
            gave_up = report is not None and report.state in _GAVE_UP_WORK
            if silent or gave_up:  # membership's verdict alone is not enough: it asks too
                # from the round after the furthest any winner said it did: the replacement
                # joins the running job there (a peer that died early may never have said)
                at_round = min(buyer.rfq.units, max(1, handle.furthest + 1))
                state = None if report is None else report.state
                handle._add("failed", peer=str(peer), round=at_round, dead=dead, silent=silent,
                            state=state)  # fmt: skip
                if state != "paused":  # a device's pause hands the lease back: no failure
                    self.reputation.record(buyer.job, peer, PeerEvent.FAILED)
                actions = await self._event(
                    _BUYER + buyer.job, "peer_failed", peer=peer.raw, at_round=at_round, now=now
                )
                await self._apply(actions, b"", seller=False, handle=handle)
                return

    async def _poll(self, handle: JobHandle) -> dict[PeerId, JobStatusReport]:
        """Every active winner's report (asked in parallel); counts the silent ones."""
        reports: dict[PeerId, JobStatusReport] = {}

        async def ask(peer: PeerId) -> None:
            query = JobStatusQuery(handle.job_id, _ms(time.time() + 30))
            try:
                envelope = await self.node.request(peer, query)
            except TransportError:
                handle.silence[peer] = handle.silence.get(peer, 0) + 1
                return
            if isinstance(envelope.body, JobStatusReport) and envelope.body.job == handle.job_id:
                reports[peer] = envelope.body
                handle.furthest = max(handle.furthest, envelope.body.round)
                handle.silence[peer] = 0

        async with trio.open_nursery() as nursery:
            for peer in handle.buyer.active:
                nursery.start_soon(ask, peer)
        if reports:
            latest = max(reports.values(), key=lambda report: report.round)
            handle.report = latest
            handle._add("status", **_report_fields(latest))
        return reports

    def _buyer_of(self, job: str) -> PeerId | None:
        lease = self.seller.lease(job)
        return None if lease is None else lease.buyer

    async def _done(self, handle: JobHandle) -> None:
        """Every unit is done: take the model the winners agree on (7f.6), then settle."""
        await self.delivery.collect(handle)
        await self._finish(handle, SettleReason.DONE)

    async def _finish(self, handle: JobHandle, reason: SettleReason) -> None:
        actions = await self._event(
            _BUYER + handle.job_id, "finish", now=time.time(), reason=reason.value
        )
        await self._apply(actions, b"", seller=False, handle=handle)

    # -- status --------------------------------------------------------------------------------

    async def _status_query(self, envelope: Envelope, query: JobStatusQuery) -> JobStatusReport:
        await self._replayed.wait()
        report = self.local_status(query.job)
        if report is None:
            raise RemoteProtocolError(
                f"no job {query.job!r} here", reason=RejectReason.NOT_A_MEMBER
            )
        return report

    def local_status(self, job_id: str) -> JobStatusReport | None:
        """``job_id`` as this node sees it (a lease it works on, or a job it bought)."""
        expires = _ms(time.time() + 30)
        work = self.work.get(job_id)
        if work is not None:
            report = work.report
            accuracy = None if report is None else min(1.0, max(0.0, report.accuracy))
            return JobStatusReport(
                job=job_id,
                expires_ms=expires,
                state=work.state,
                round=work.round,
                rounds=work.start.units,
                accuracy=accuracy,
                examples=work.examples,
                roster=list(work.start.roster),
                noted=work.billed,
            )
        handle = self.jobs.get(job_id)
        if handle is None:
            return None
        last = handle.report
        return JobStatusReport(
            job=job_id,
            expires_ms=expires,
            state=handle.buyer.state.value,
            round=handle.rounds_done(),
            rounds=handle.buyer.rfq.units,
            accuracy=None if last is None else last.accuracy,
            examples=0 if last is None else last.examples,
            roster=list(handle.buyer.roster),
            noted=handle.rounds_done(),
        )

    async def job_status(self, job_id: str, *, within: float = 5.0) -> JobStatusReport:
        """``job_id`` as this node knows it, else as the first roster peer that answers says.

        Raises:
            LocalProtocolError: this node knows no such job and no peer answered.
        """
        handle = self.jobs.get(job_id)
        if handle is not None and handle.report is not None:
            return handle.report  # the roster's latest word beats the buyer's own view
        local = self.local_status(job_id)
        if local is not None:
            return local
        for record in [] if self.node.membership is None else self.node.membership.peers():
            with contextlib.suppress(TransportError):
                envelope = await self.node.request(
                    record.peer, JobStatusQuery(job_id, _ms(time.time() + 30)), within=within
                )
                if isinstance(envelope.body, JobStatusReport):
                    return envelope.body
        raise LocalProtocolError(f"no peer knows job {job_id!r}")

    # -- actions -------------------------------------------------------------------------------

    async def _apply(
        self,
        actions: list[LeaseAction],
        evidence: bytes,
        seller: bool,
        handle: JobHandle | None = None,
        *,
        replaying: bool = False,
    ) -> MarketMessage | None:
        """Carry out ``actions`` in order: ledger first (awaited), then the sends they allow;
        returns the reply to the message being received, if any. ``evidence``: the signed
        frame of that message. Replaying the journal, nothing is sent and no work started
        (the ledger's idempotency makes its actions no-ops)."""
        reply: MarketMessage | None = None
        for action in actions:
            if isinstance(action, Reply):
                reply = action.message
                if handle is not None and isinstance(reply, DebitRefusal):
                    _note_refused(handle, reply)
            elif replaying and isinstance(action, _NOT_ON_REPLAY):
                continue
            elif isinstance(action, SendRequest):
                assert self._nursery is not None
                self._nursery.start_soon(self._request, action, seller, handle)
                if handle is not None:
                    _note_send(handle, action)
                if isinstance(action.message, Award):  # the audit log (meshfed/audit.py)
                    award = action.message
                    self.node.audit(
                        AuditKind.AWARD, role="buyer", job=award.job, peer=str(action.to),
                        price=award.price, units=award.units,
                    )  # fmt: skip
            elif isinstance(action, WakeAt):
                if seller:
                    self._wake_seller(action.at)
                elif handle is not None:
                    handle.wake_at = min(handle.wake_at, action.at)
            elif isinstance(action, _LEDGER):
                # applied with the journal write (``_write``), or now when replayed (a no-op
                # by its key if it was applied before the stop)
                refused = self._ledgered.pop(action, _UNAPPLIED)
                if refused is _UNAPPLIED:
                    refused = await self._store_call(
                        self._ledger_apply, action, _ledger_evidence(action, evidence, handle)
                    )
                if refused is not None:
                    raise refused
                if isinstance(action, LedgerPay) and handle is not None:
                    _note_paid(handle, action)
                elif isinstance(action, LedgerEarn):
                    self._forget_state(action.job, action.unit)
            elif isinstance(action, StartTraining):
                # the journal holds the award: the lease book may follow after the answer;
                # replayed, nothing waits for one, and the book has it before its end
                if replaying:
                    await self._put_lease(action.job, LeaseRole.SELLER, action.buyer, evidence)
                else:
                    assert self._nursery is not None
                    self._nursery.start_soon(
                        self._put_lease, action.job, LeaseRole.SELLER, action.buyer, evidence
                    )
                work = self.work[action.job] = _Work(action)
                if not replaying:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._train, work)
            elif isinstance(action, ChangeRoster):
                work_for = self.work.get(action.job)
                if work_for is not None and work_for.peer is not None:
                    _change_roster(work_for.peer, action)
                elif work_for is not None and not work_for.finished:
                    work_for.changes.append(action)
            elif isinstance(action, StartJob):
                assert handle is not None
                handle._add("started", roster=[str(peer) for peer in action.roster])
                await self._record_clearing(handle)
            elif isinstance(action, JobEnded):
                await self._lease_ended(action, handle)
                if handle is not None and not replaying:  # the audit log (meshfed/audit.py)
                    paid = sum(handle.buyer.paid.values())
                    self.node.audit(
                        AuditKind.SETTLEMENT, role="buyer", job=action.job, reason=action.reason,
                        paid=paid,
                    )  # fmt: skip
            elif isinstance(action, RecordWork):
                self.reputation.record(action.job, action.peer, action.event)
            elif isinstance(action, RequestProof):
                assert handle is not None and self._nursery is not None
                handle.proofs[action.to, action.query.unit] = action.query
                self._nursery.start_soon(self._request, SendRequest(action.to, action.query),
                                         False, handle)  # fmt: skip
            elif isinstance(action, ServeProof):
                assert self._nursery is not None
                self._nursery.start_soon(self._serve_proof, action)
            elif isinstance(action, NoteRefused):
                log.warning(
                    "a round was not paid",
                    extra={"job": action.job, "unit": action.unit, "reason": action.reason},
                )
                self._forget_state(action.job, action.unit)
        return reply

    async def _request(self, action: SendRequest, seller: bool, handle: JobHandle | None) -> None:
        """Send one request; feed its answer back to the machine that asked."""
        try:
            envelope = await self.node.request(
                action.to, action.message, within=self.config.request_within_s
            )
        except TransportError as exc:  # the machine's deadlines deal with it
            log.warning(
                "market request unanswered",
                extra={"peer": action.to.short(), "type": action.message.TYPE, "error": str(exc)},
            )
            return
        except RemoteProtocolError:
            return  # counted by the node
        answer = envelope.body
        if not isinstance(answer, MarketMessage):
            return  # an Ack (a Release, a Receipt taken)
        try:
            if seller:
                actions = await self._received(_SELLER, envelope, answer)
            else:
                assert handle is not None
                actions = await self._received(_BUYER + handle.job_id, envelope, answer)
                _note_answer(handle, envelope.sender, answer)
        except RemoteProtocolError as exc:
            self.node.count_rejection(envelope.sender, exc)
            log.warning(
                "market answer refused",
                extra={"peer": envelope.sender.short(), "type": answer.TYPE, "error": str(exc)},
            )
            return
        reply = await self._apply(actions, envelope.frame, seller, handle)
        if reply is not None:  # an answer that calls for one of ours (a late acceptance: settle)
            follow = SendRequest(envelope.sender, reply)
            assert self._nursery is not None
            self._nursery.start_soon(self._request, follow, seller, handle)

    async def _put_lease(self, job: str, role: LeaseRole, peer: PeerId, signed: bytes) -> None:
        """Keep the lease with the counterpart's signature on it (its award, or its
        acceptance)."""
        terms = self._terms(job, role, peer)
        if terms is not None:
            price, units = terms
            async with self._book_turn:
                await self._store_call(
                    self.book.put_lease, job, role, peer, price=price, units=units,
                    award=signed, state=LeaseState.ACTIVE,
                )  # fmt: skip

    def _terms(self, job: str, role: LeaseRole, peer: PeerId) -> tuple[int, int] | None:
        if role is LeaseRole.SELLER:
            lease = self.seller.lease(job)
            return None if lease is None else (lease.award.price, lease.award.units)
        handle = self.jobs.get(job)
        award = None if handle is None else handle.buyer.award_to(peer)
        return None if award is None else (award.price, award.units)

    async def _lease_ended(self, ended: JobEnded, handle: JobHandle | None) -> None:
        final = {
            SettleReason.DONE.value: LeaseState.SETTLED,
            SettleReason.FORFEIT.value: LeaseState.FORFEITED,
        }.get(ended.reason, LeaseState.CANCELLED)
        if handle is None:
            work = self.work.get(ended.job)
            if work is not None and ended.reason != SettleReason.DONE.value:
                work.scope.cancel()  # cancelled, out of budget or forfeited: no one pays more
            lease = self.seller.lease(ended.job)
            ends = [] if lease is None else [(LeaseRole.SELLER, lease.buyer)]
        else:
            ends = [(LeaseRole.BUYER, peer) for peer in handle.buyer.active]
        async with self._book_turn:  # after the lease's own write, if it is under way
            for role, peer in ends:
                with contextlib.suppress(LocalProtocolError):
                    await self._store_call(self.book.set_lease_state, ended.job, role, peer, final)
        if handle is not None:
            self._ended(handle, ended)

    async def _store_call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(functools.partial(method, *args, **kwargs))

    async def _record_clearing(self, handle: JobHandle) -> None:
        clearing = handle.buyer.clearing
        if clearing is None or not clearing.winners:
            return
        kind, tier = WorkKind(handle.buyer.rfq.kind), Tier(handle.buyer.rfq.tier)
        prices = sorted(winner.price for winner in clearing.winners)
        price = prices[len(prices) // 2]
        await self._store_call(self.book.record_clearing, kind, tier, price, time.time())
        history = self._clearings.get((kind, tier))
        if history is not None:  # newest first, as the store gives them
            history.insert(0, price)
            del history[_CLEARINGS_KEPT:]

    def _ended(self, handle: JobHandle, ended: JobEnded) -> None:
        buyer = handle.buyer
        for peer, paid in buyer.paid.items():
            if paid:
                self.reputation.record(buyer.job, peer, PeerEvent.DELIVERED)
        handle._add(
            "ended",
            reason=ended.reason,
            paid=sum(buyer.paid.values()),
            error=None if ended.error is None else str(ended.error),
        )


def _change_roster(peer: TrainingPeer, change: ChangeRoster) -> None:
    """Hand the buyer's signed roster change to the running training (rounds are 1-based in
    the market, 0-based in training: a change from the market's round r plans round r - 1)."""
    from ..training.roster import RosterChange

    roster = tuple(str(member) for member in change.roster)
    try:
        peer.change_roster(
            RosterChange(
                roster=roster, from_round=max(0, change.from_round - 1),
                version=change.roster_version,
            )
        )  # fmt: skip
    except ConfigError as exc:  # the buyer signed a roster training cannot plan
        log.warning("roster change refused", extra={"job": change.job, "error": str(exc)})


def _message(body: dict[str, Any], key: str) -> MarketMessage:
    """The message an event's ``body`` holds under ``key``: live, as the wire (or this node)
    made it; replayed, decoded from the journal (as strictly as from the wire)."""
    value = body[key]
    message = value if isinstance(value, MarketMessage) else decode_message(value)
    assert isinstance(message, MarketMessage)
    return message


def _encoded(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as the journal keeps it: its messages encoded (:func:`.journal.encode_message`;
    in the writer's thread, off the way of the answer)."""
    return {
        key: encode_message(value) if isinstance(value, MarketMessage) else value
        for key, value in body.items()
    }


def _answers_a_quote(action: LeaseAction) -> bool:
    return isinstance(action, WakeAt) or (
        isinstance(action, Reply) and isinstance(action.message, Bid | Decline)
    )


def _note_send(handle: JobHandle, action: SendRequest) -> None:
    message = action.message
    if isinstance(message, Award):
        handle._add("award", peer=str(action.to), price=message.price, units=message.units,
                    escrowed=handle.buyer.escrowed)  # fmt: skip
    elif isinstance(message, RosterUpdate):
        roster = [str(p) for p in message.roster]
        handle._add("roster", to=str(action.to), version=message.roster_version, roster=roster,
                    from_round=message.from_round)  # fmt: skip
    elif isinstance(message, DebitRefusal):
        _note_refused(handle, message)


def _note_refused(handle: JobHandle, refusal: DebitRefusal) -> None:
    handle._add("refused", peer=str(refusal.seller), unit=refusal.unit, reason=refusal.reason)


def _lease_units(buyer: BuyerJob, peer: PeerId) -> int:
    """The units of ``peer``'s lease (a replacement's are the job's last rounds)."""
    award = buyer.award_to(peer)
    return buyer.rfq.units if award is None else award.units


def _note_paid(handle: JobHandle, pay: LedgerPay) -> None:
    handle.paid_units.setdefault(pay.seller, set()).add(pay.unit)
    handle._add("round", seller=str(pay.seller), unit=pay.unit, amount=pay.amount)


def _note_answer(handle: JobHandle, sender: PeerId, answer: MarketMessage) -> None:
    if isinstance(answer, Bid):
        handle._add("bid", peer=str(sender), price=answer.price)
    elif isinstance(answer, Decline):
        handle._add("decline", peer=str(sender), reason=answer.reason)
    elif isinstance(answer, Receipt):
        handle._add("receipt", peer=str(sender), amount=answer.amount, units=answer.units)


def _report_fields(report: JobStatusReport) -> dict[str, Any]:
    return {
        "state": report.state,
        "round": report.round,
        "rounds": report.rounds,
        "accuracy": report.accuracy,
    }


def _privacy(job: dict[str, Any] | Any) -> str:
    secure = bool(job.get("secure", True))
    dp = bool(job.get("dp_clip", 0))
    level = {
        (False, False): PrivacyLevel.NONE,
        (True, False): PrivacyLevel.SECAGG,
        (False, True): PrivacyLevel.DP,
        (True, True): PrivacyLevel.SECAGG_DP,
    }
    return level[secure, dp].value


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _trio_at(wall: float) -> float:
    """The trio clock's time at wall-clock ``wall`` (seconds since the epoch)."""
    if wall == float("inf"):
        return wall
    return trio.current_time() + max(0.0, wall - time.time())


#: ``_ledgered`` holds no outcome for the action (it was not journaled: a replay)
_UNAPPLIED: Any = object()


def _ledger_evidence(action: _LedgerAction, evidence: bytes, handle: JobHandle | None) -> bytes:
    """What a ledger action keeps as its evidence: a payment, the seller's signed note
    (paid when it came, or on its verdict later); any other, the signed frame of the
    message whose event produced it (``evidence``)."""
    if isinstance(action, LedgerPay) and handle is not None:
        return handle.note_frames.get(action.note_digest, evidence)
    return evidence
