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
- failure detection for a running job: a winner whose debit notes fall ``lag_rounds`` behind
  the others', or that membership declares dead, is reported to the machine, which replaces it;
- progress: every event a buyer's job goes through is kept in its :class:`JobHandle` (bids,
  award and clearing price, rounds, roster changes, the end) for the CLI's live view.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import trio

from ..errors import (
    BudgetExceeded,
    ConfigError,
    LocalProtocolError,
    MeshfedError,
    NoMatchingPeers,
    RemoteProtocolError,
    TransportError,
)
from ..identity import PeerId
from ..membership.swim import MemberState
from ..stats import RejectReason
from ..wire import Envelope
from .lease import (
    Action,
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
    SellerOffer,
    SendRequest,
    StartJob,
    StartTraining,
    WakeAt,
)
from .leasebook import LeaseBook
from .ledger import AVAILABLE, Ledger
from .matching import match
from .messages import (
    Award,
    Bid,
    DebitNote,
    Decline,
    JobStatusQuery,
    JobStatusReport,
    MarketMessage,
    PrivacyLevel,
    Receipt,
    Release,
    Rfq,
    RosterChange,
    Settle,
    SettleReason,
)
from .order import TrainingOrder, spec_from
from .pricing import AskPolicy, Conditions, asks, check_budget, estimate
from .reputation import PeerEvent, Reputation
from .terms import MICRO, Tier, WorkKind, credits

if TYPE_CHECKING:
    from ..node import Node
    from ..training.job import RoundReport, TrainingPeer

__all__ = ["JobHandle", "Market", "MarketConfig"]

log = logging.getLogger(__name__)

_SELLER_MESSAGES: tuple[type[MarketMessage], ...] = (Rfq, Award, Release, RosterChange, Settle)
_GRANT_KEY = "initial"


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
        lag_rounds: a winner this many rounds behind the others' debit notes is replaced.
        roster_wait_s: how long a winner waits for the rest of its roster to connect.
        status_every_s: how often a buyer asks its roster how the job is doing.
    """

    capacity: int = 1
    grant: int = 1_000 * MICRO
    asks: AskPolicy = field(default_factory=AskPolicy)
    throughput: float = 0.0
    accept_window_s: float = 10.0
    settle_window_s: float = 30.0
    request_within_s: float = 5.0
    lag_rounds: int = 2
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
        #: the highest unit paid per seller
        self.units_paid: dict[PeerId, int] = {}
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
        """The round every active winner has been paid for (0 before the first)."""
        return min((self.units_paid.get(p, 0) for p in self.buyer.active), default=0)

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
    peer: TrainingPeer | None = None
    round: int = 0
    report: RoundReport | None = None
    state: str = "starting"
    changes: list[ChangeRoster] = field(default_factory=list)


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
        self.seller = SellerBook(node.peer_id, self._offer())
        #: called with every request a buyer sent the seller's book (RFQ, award, release,
        #: roster change, settlement) and the actions the book produced, before they are
        #: carried out: live views, benchmarks
        self.seller_observers: list[Callable[[PeerId, MarketMessage, list[Action]], None]] = []
        self.jobs: dict[str, JobHandle] = {}
        self.work: dict[str, _Work] = {}
        self._nursery: trio.Nursery | None = None
        self._seller_wake = trio.Event()
        self._seller_at = float("inf")

    # -- the service ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sell and buy until cancelled."""
        await self._ledger(self.ledger.grant, self.config.grant, key=_GRANT_KEY, memo="start")
        self.publish_asks()
        for message_type in _SELLER_MESSAGES:
            self.node.handle(message_type, self._as_seller)
        self.node.handle(DebitNote, self._as_buyer)
        self.node.handle(JobStatusQuery, self._status_query)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._seller_timer)
            task_status.started()
            await trio.sleep_forever()

    def publish_asks(self, conditions: Conditions | None = None) -> None:
        """Put this node's asks (from its policy and ``conditions``, default: its load now)
        in its signed record, so buyers can estimate and match."""
        load = self.seller.reserved(time.time()) / max(1, self.config.capacity)
        now = conditions or Conditions(load=min(load, 1.0))
        prices = asks(self.config.asks, now) if self.config.capacity else []
        membership = self.node.membership
        if membership is not None:
            own = membership.table.get(self.node.peer_id)
            if own is not None:
                membership.update_capabilities(replace(own.capabilities, prices=prices))
        self.seller.offer = self._offer()

    def _offer(self) -> SellerOffer:
        membership = self.node.membership
        own = None if membership is None else membership.table.get(self.node.peer_id)
        if own is None:
            from ..membership.records import Capabilities

            caps = Capabilities()
        else:
            caps = own.capabilities
        return SellerOffer(
            capabilities=caps, capacity=self.config.capacity, throughput=self.config.throughput
        )

    # -- seller --------------------------------------------------------------------------------

    async def _as_seller(self, envelope: Envelope, message: MarketMessage) -> MarketMessage | None:
        if isinstance(message, Rfq):
            self.seller.offer = self._offer()
        actions = self.seller.receive(envelope.sender, message, time.time())
        for observe in self.seller_observers:
            observe(envelope.sender, message, actions)
        return await self._apply(actions, envelope, seller=True)

    async def _seller_timer(self) -> None:
        while True:
            with trio.move_on_at(_trio_at(self._seller_at)):
                await self._seller_wake.wait()
            self._seller_wake = trio.Event()
            if time.time() >= self._seller_at:
                self._seller_at = float("inf")
                await self._apply(self.seller.expire(time.time()), None, seller=True)

    def _wake_seller(self, at: float) -> None:
        if at < self._seller_at:
            self._seller_at = at
            self._seller_wake.set()

    async def _train(self, work: _Work) -> None:
        """Run the training a lease won; note a debit for every round done."""
        from ..training.job import TrainingPeer

        start = work.start
        try:
            spec = spec_from(start.spec, [str(peer) for peer in start.roster])
            work.peer = peer = TrainingPeer(self.node, spec, store=self.node.store)
            work.state = "connecting"
            if not await peer.ended_before():
                await peer.connect_roster(within=self.config.roster_wait_s)
            work.state = "running"
            await peer.run(functools.partial(self._round_done, work))
            work.state = peer.state.value
        except MeshfedError as exc:
            work.state = "failed"
            log.warning("leased job failed", extra={"job": start.job, "error": str(exc)})
        except Exception:  # the lease's end, never the node's
            work.state = "failed"
            log.exception("leased job failed", extra={"job": start.job})

    def _round_done(self, work: _Work, report: RoundReport) -> None:
        work.round, work.report = report.round + 1, report
        evidence = hashlib.sha256(json.dumps(asdict(report), sort_keys=True).encode()).digest()
        try:
            actions = self.seller.round_done(work.start.job, work.round, evidence, time.time())
        except LocalProtocolError as exc:  # the lease ended (forfeit) or the job ran longer
            log.info("round not billed", extra={"job": work.start.job, "error": str(exc)})
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._apply, actions, None, True)

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
        membership = self.node.membership
        if membership is None:
            raise LocalProtocolError("buying needs membership (peer records to match)")
        records = membership.peers()
        kind, tier = order.kind, order.tier
        found = match(records, order.requirements, kind=kind, tier=tier, exclude=self.node.peer_id)
        if len(found.peers) < order.min_peers:
            raise NoMatchingPeers(
                f"job {order.job_id!r}: {len(found.peers)} of {len(records)} known peers meet "
                f"the requirements, {order.min_peers} needed",
                excluded=dict(found.excluded),
            )
        history = await trio.to_thread.run_sync(self.book.recent_clearing, kind, tier)
        cost = estimate(
            kind,
            tier,
            order.min_peers,
            order.rounds,
            history=[record.price for record in history],
            asks=[ask for record in records for ask in record.capabilities.prices],
        )
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
        )
        buyer = BuyerJob(
            rfq,
            accept_window_s=self.config.accept_window_s,
            settle_window_s=self.config.settle_window_s,
            reliability=self.reputation.scores(found.peers),
        )
        handle = self.jobs[order.job_id] = JobHandle(self, buyer)
        handle._add("rfq", asked=[str(peer) for peer in found.peers], estimate=cost.total)
        actions = buyer.start(now, found.peers)
        assert self._nursery is not None
        self._nursery.start_soon(self._buyer_loop, handle)
        await self._apply(actions, None, seller=False, handle=handle)
        return handle

    async def _as_buyer(self, envelope: Envelope, message: MarketMessage) -> MarketMessage | None:
        handle = self.jobs.get(message.job)
        if handle is None:
            raise RemoteProtocolError(
                f"no job {message.job!r} posted here", reason=RejectReason.NOT_A_MEMBER
            )
        actions = handle.buyer.receive(envelope.sender, message, time.time())
        return await self._apply(actions, envelope, seller=False, handle=handle)

    async def _buyer_loop(self, handle: JobHandle) -> None:
        """The job's deadlines, its progress reports, failure detection and its end."""
        buyer = handle.buyer
        while buyer.state is not BuyerState.ENDED:
            await trio.sleep(min(self.config.status_every_s, 0.25))
            now = time.time()
            await self._apply(buyer.expire(now), None, seller=False, handle=handle)
            if buyer.state is BuyerState.RUNNING:
                await self._watch_roster(handle, now)

    async def _watch_roster(self, handle: JobHandle, now: float) -> None:
        buyer = handle.buyer
        paid = {peer: handle.units_paid.get(peer, 0) for peer in buyer.active}
        if paid and min(paid.values()) >= buyer.rfq.units:
            await self._finish(handle, SettleReason.DONE)
            return
        ahead = max(paid.values(), default=0)
        membership = self.node.membership
        for peer, done in paid.items():
            dead = membership is not None and membership.swim.state(peer) is MemberState.DEAD
            if dead or ahead - done >= self.config.lag_rounds:
                handle._add("failed", peer=str(peer), round=done + 1, dead=dead)
                self.reputation.record(buyer.job, peer, PeerEvent.FAILED)
                actions = buyer.peer_failed(peer, done + 1, now)
                await self._apply(actions, None, seller=False, handle=handle)
                return
        if now - handle.asked_at >= self.config.status_every_s:
            handle.asked_at = now
            await self._ask_status(handle)

    async def _ask_status(self, handle: JobHandle) -> None:
        for peer in handle.buyer.active:
            query = JobStatusQuery(handle.job_id, _ms(time.time() + 30))
            try:
                envelope = await self.node.request(peer, query, within=2.0)
            except TransportError:
                continue
            if isinstance(envelope.body, JobStatusReport):
                handle.report = envelope.body
                handle._add("status", peer=str(peer), **_report_fields(envelope.body))
                if envelope.body.state in ("done", "stopped", "failed"):
                    await self._finish(handle, SettleReason.DONE)
                return

    async def _finish(self, handle: JobHandle, reason: SettleReason) -> None:
        actions = handle.buyer.finish(time.time(), reason)
        await self._apply(actions, None, seller=False, handle=handle)

    # -- status --------------------------------------------------------------------------------

    async def _status_query(self, envelope: Envelope, query: JobStatusQuery) -> JobStatusReport:
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
                examples=0 if work.peer is None else len(work.peer.shard),
                roster=list(work.start.roster),
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
        actions: list[Action],
        envelope: Envelope | None,
        seller: bool,
        handle: JobHandle | None = None,
    ) -> MarketMessage | None:
        """Carry out ``actions`` in order: ledger first (awaited), then the sends they allow;
        returns the reply to the message being received, if any."""
        reply: MarketMessage | None = None
        evidence = b"" if envelope is None else envelope.frame
        for action in actions:
            if isinstance(action, Reply):
                reply = action.message
            elif isinstance(action, SendRequest):
                assert self._nursery is not None
                self._nursery.start_soon(self._request, action, seller, handle)
                if handle is not None:
                    _note_send(handle, action)
            elif isinstance(action, WakeAt):
                if seller:
                    self._wake_seller(action.at)
            elif isinstance(action, LedgerEscrow):
                await self._ledger(self.ledger.escrow, action.job, action.amount, key=action.key)
            elif isinstance(action, LedgerPay):
                await self._ledger(
                    self.ledger.pay, action.job, action.seller, action.unit, action.amount,
                    evidence=evidence,
                )  # fmt: skip
                if handle is not None:
                    _note_paid(handle, action)
            elif isinstance(action, LedgerRelease):
                await self._ledger(self.ledger.release, action.job, key=action.key)
            elif isinstance(action, LedgerEarn):
                await self._ledger(
                    self.ledger.earn, action.job, action.buyer, action.unit, action.amount,
                    evidence=evidence,
                )  # fmt: skip
            elif isinstance(action, Forfeit):
                for unit in action.units:
                    share = action.amount // len(action.units)
                    await self._ledger(
                        self.ledger.forfeit, action.job, action.buyer, unit, share,
                        evidence=evidence,
                    )  # fmt: skip
            elif isinstance(action, StartTraining):
                work = self.work[action.job] = _Work(action)
                assert self._nursery is not None
                self._nursery.start_soon(self._train, work)
            elif isinstance(action, ChangeRoster):
                work_for = self.work.get(action.job)
                if work_for is not None:
                    work_for.changes.append(action)
            elif isinstance(action, StartJob):
                assert handle is not None
                handle._add("started", roster=[str(peer) for peer in action.roster])
                await self._record_clearing(handle)
            elif isinstance(action, JobEnded) and handle is not None:
                self._ended(handle, action)
        return reply

    async def _request(self, action: SendRequest, seller: bool, handle: JobHandle | None) -> None:
        """Send one request; feed its answer back to the machine that asked."""
        try:
            envelope = await self.node.request(
                action.to, action.message, within=self.config.request_within_s
            )
        except TransportError as exc:
            log.info(
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
                actions = self.seller.receive(envelope.sender, answer, time.time())
            else:
                assert handle is not None
                actions = handle.buyer.receive(envelope.sender, answer, time.time())
                _note_answer(handle, envelope.sender, answer)
        except RemoteProtocolError as exc:
            self.node._rejected(envelope.sender, exc)
            return
        await self._apply(actions, envelope, seller, handle)

    async def _ledger(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(functools.partial(method, *args, **kwargs))

    async def _record_clearing(self, handle: JobHandle) -> None:
        clearing = handle.buyer.clearing
        if clearing is None or not clearing.winners:
            return
        rfq = handle.buyer.rfq
        prices = sorted(winner.price for winner in clearing.winners)
        await self._ledger(
            self.book.record_clearing, WorkKind(rfq.kind), Tier(rfq.tier),
            prices[len(prices) // 2], time.time(),
        )  # fmt: skip

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


def _note_send(handle: JobHandle, action: SendRequest) -> None:
    message = action.message
    if isinstance(message, Award):
        handle._add("award", peer=str(action.to), price=message.price, units=message.units,
                    escrowed=handle.buyer.escrowed)  # fmt: skip
    elif isinstance(message, RosterChange):
        roster = [str(p) for p in message.roster]
        handle._add("roster", to=str(action.to), version=message.roster_version, roster=roster,
                    from_round=message.from_round)  # fmt: skip


def _note_paid(handle: JobHandle, pay: LedgerPay) -> None:
    done = handle.units_paid.get(pay.seller, 0)
    handle.units_paid[pay.seller] = max(done, pay.unit)
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
