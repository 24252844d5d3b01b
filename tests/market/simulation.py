"""Run a whole market, one buyer and N sellers, by routing the lease machines' actions in
memory (no network, no trio).

Messages wait in one queue. The network may be hostile: ``chaos`` (a ``random.Random``)
delivers them in any order, delivers some twice, and plays old ones again (a replay, as an
attacker who recorded the traffic would). Time only moves when nothing is in flight: to the
earliest wake-up any machine asked for. Every ledger action is kept, with who took it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshfed.errors import RemoteProtocolError
from meshfed.identity import Identity, PeerId
from meshfed.market.lease import (
    BuyerJob,
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
from meshfed.market.messages import (
    Award,
    LeaseDecline,
    MarketMessage,
    PrivacyLevel,
    Rfq,
    SettleReason,
    Verification,
    digest,
)
from meshfed.market.terms import Requirements
from meshfed.membership.records import Capabilities, DatasetOffer, PriceAsk

T0 = 1_700_000_000.0
JOB = "job-1"


def seller_offer(
    price: int,
    *,
    examples: int = 500,
    throughput: float = 100.0,
    capacity: int = 4,
    kind: str = "training",
    tier: str = "small",
) -> SellerOffer:
    """A trainer with ``examples`` of "digits" asking ``price`` per unit."""
    return SellerOffer(
        capabilities=Capabilities(
            memory_mb=4096,
            datasets=[DatasetOffer("digits", examples)],
            roles=["trainer"],
            prices=[PriceAsk(kind, tier, price)],
        ),
        capacity=capacity,
        throughput=throughput,
    )


def make_rfq(
    *,
    units: int = 3,
    min_peers: int = 1,
    max_peers: int = 2,
    budget: int = 1_000_000,
    forfeit_after_s: int = 600,
    now: float = T0,
    verification: Verification | None = None,
) -> Rfq:
    return Rfq(
        job=JOB,
        expires_ms=int((now + 10) * 1000),
        kind="training",
        tier="small",
        requirements=Requirements(dataset="digits", min_examples=100),
        units=units,
        min_peers=min_peers,
        max_peers=max_peers,
        budget=budget,
        bid_deadline_ms=int((now + 5) * 1000),
        privacy=PrivacyLevel.SECAGG.value,
        forfeit_after_s=forfeit_after_s,
        spec=b"the job spec",
        scoring=[],
        verification=verification or Verification(),
    )


@dataclass
class Trace:
    """What happened: ledger actions by actor, every other action, rejections."""

    ledger: list[tuple[PeerId, LeaseAction]] = field(default_factory=list)
    #: every action any machine returned, with the machine's peer, in order
    actions: list[tuple[PeerId, LeaseAction]] = field(default_factory=list)
    rejected: list[tuple[PeerId, PeerId, str, str]] = field(default_factory=list)
    delivered: list[tuple[PeerId, PeerId, MarketMessage]] = field(default_factory=list)

    def pays(self) -> Counter[tuple[str, PeerId, int, int]]:
        """The buyer's payments: (job, seller, unit, amount) -> times."""
        return Counter(
            (a.job, a.seller, a.unit, a.amount) for _, a in self.ledger if isinstance(a, LedgerPay)
        )

    def earns(self) -> Counter[tuple[str, PeerId, PeerId, int, int]]:
        """The sellers' earnings: (job, seller, buyer, unit, amount) -> times."""
        return Counter(
            (a.job, who, a.buyer, a.unit, a.amount)
            for who, a in self.ledger
            if isinstance(a, LedgerEarn)
        )

    def of(self, kind: type) -> list[tuple[PeerId, object]]:
        return [(who, a) for who, a in self.actions if isinstance(a, kind)]


class Market:
    """One buyer, N sellers, one job, a queue in between."""

    def __init__(
        self,
        rfq: Rfq,
        offers: list[SellerOffer],
        *,
        chaos: random.Random | None = None,
        silent: Collection[int] = (),
        on_award: Mapping[int, str] | None = None,
        accept_window_s: float = 10.0,
        peers: list[PeerId] | None = None,
        liars: Collection[int] = (),
        lazy: Collection[int] = (),
        spot_key: bytes = b"",
    ) -> None:
        ids = peers or [Identity.generate().peer_id for _ in range(len(offers) + 1)]
        self.buyer, self.sellers = ids[0], ids[1 : len(offers) + 1]
        self.rfq, self.offers, self.accept_window_s = rfq, offers, accept_window_s
        self.spot_key = spot_key
        self.job, self.books = self.machines()
        #: every event each machine took (and did not refuse), in order: (method, *args)
        self.inputs: dict[PeerId, list[tuple[Any, ...]]] = {
            p: [] for p in [self.buyer, *self.sellers]
        }
        #: peers that receive nothing and run no deadlines (gone, or away); the buyer too
        self.silent = {self.sellers[i] for i in silent}
        #: sellers that answer an award otherwise: "decline" it, or "drop" it (never answer)
        self.on_award = {self.sellers[i]: how for i, how in (on_award or {}).items()}
        self.chaos = chaos
        self.now = T0
        self.queue: list[tuple[PeerId, PeerId, MarketMessage]] = []
        self.history: list[tuple[PeerId, PeerId, MarketMessage]] = []
        self.wakes: list[float] = []
        self.trace = Trace()
        #: seller -> its StartTraining, and how many units it reported done
        self.training: dict[PeerId, StartTraining] = {}
        self.done: Counter[PeerId] = Counter()
        #: peers whose job or lease ended
        self.ended: set[PeerId] = set()
        #: sellers that report a wrong result for every unit
        self.liars: set[PeerId] = {self.sellers[i] for i in liars}
        #: sellers that report the right evidence but hold no state to prove it
        self.lazy: set[PeerId] = {self.sellers[i] for i in lazy}

    def machines(self) -> tuple[BuyerJob, dict[PeerId, SellerBook]]:
        """Fresh machines for this market's buyer and sellers."""
        job = BuyerJob(self.rfq, accept_window_s=self.accept_window_s, spot_key=self.spot_key)
        books = {
            peer: SellerBook(peer, offer)
            for peer, offer in zip(self.sellers, self.offers, strict=True)
        }
        return job, books

    def call(self, me: PeerId, method: str, *args: Any) -> None:
        """Run one event on ``me``'s machine, remember it, carry out what it returns."""
        machine = self.job if me == self.buyer else self.books[me]
        actions = getattr(machine, method)(*args)
        self.inputs[me].append((method, *args))
        self.apply(me, actions, answering=args[0] if method == "receive" else None)

    def rebuild(self) -> tuple[BuyerJob, dict[PeerId, SellerBook]]:
        """Fresh machines fed every event the live ones took (what a driver does after a
        crash, from the events it wrote ahead)."""
        job, books = self.machines()
        for peer, events in self.inputs.items():
            machine = job if peer == self.buyer else books[peer]
            for method, *args in events:
                getattr(machine, method)(*args)
        return job, books

    # -------------------------------------------------------------------- plumbing

    def apply(
        self, me: PeerId, actions: list[LeaseAction], answering: PeerId | None = None
    ) -> None:
        for action in actions:
            self.trace.actions.append((me, action))
            if isinstance(action, SendRequest):
                self.queue.append((me, action.to, action.message))
            elif isinstance(action, Reply):
                assert answering is not None
                self.queue.append((me, answering, action.message))
            elif isinstance(action, LedgerEscrow | LedgerPay | LedgerRelease | LedgerEarn):
                self.trace.ledger.append((me, action))
            elif isinstance(action, WakeAt):
                self.wakes.append(action.at)
            elif isinstance(action, StartTraining):
                self.training[me] = action
            elif isinstance(action, JobEnded):
                self.ended.add(me)
            elif isinstance(action, RequestProof):
                self.queue.append((me, action.to, action.query))
            elif isinstance(action, ServeProof):  # the buyer fetches the state and checks it
                if action.buyer not in self.silent:
                    honest = me not in self.liars | self.lazy
                    self.call(action.buyer, "proof_ok", me, action.unit, honest, self.now)
            elif isinstance(action, StartJob | ChangeRoster | Forfeit | RecordWork | NoteRefused):
                pass
            else:  # pragma: no cover - a new action the simulation must learn
                raise AssertionError(action)

    def deliver(self, sender: PeerId, receiver: PeerId, message: MarketMessage) -> None:
        self.history.append((sender, receiver, message))
        if receiver in self.silent:
            return
        self.trace.delivered.append((sender, receiver, message))
        if isinstance(message, Award) and receiver in self.on_award:
            if self.on_award[receiver] == "decline":
                answer = LeaseDecline(message.job, message.expires_ms, digest(message), "no")
                self.queue.append((receiver, sender, answer))
            return
        try:
            self.call(receiver, "receive", sender, message, self.now)
        except RemoteProtocolError as exc:
            self.trace.rejected.append((sender, receiver, message.TYPE, exc.reason.value))

    def settle(self) -> None:
        """Deliver everything in flight (in the chaos's order, with its copies and replays)."""
        while self.queue:
            chaos = self.chaos
            index = chaos.randrange(len(self.queue)) if chaos else 0
            item = self.queue[index] if chaos and chaos.random() < 0.2 else self.queue.pop(index)
            self.deliver(*item)
            if chaos and self.history and chaos.random() < 0.1:
                self.deliver(*chaos.choice(self.history))  # an old message played again

    def tick(self, until: float) -> None:
        """Move time to each wake-up up to ``until``, running deadlines, delivering all."""
        self.settle()
        while True:
            due = [t for t in self.wakes if t <= until]
            if not due:
                break
            self.now = max(self.now, min(due))
            self.wakes = [t for t in self.wakes if t > self.now]
            for peer in [self.buyer, *self.sellers]:
                if peer not in self.silent:
                    self.call(peer, "expire", self.now)
            self.settle()
        self.now = max(self.now, until)

    # ----------------------------------------------------------------------- a job

    def post(self) -> None:
        """The buyer asks every seller; bids, awards and leases run to a quiet network."""
        self.call(self.buyer, "start", self.now, self.sellers)
        self.tick(self.now + 60)

    def work(self, units: int = 1) -> None:
        """Every seller in training does ``units`` more units (up to its lease's)."""
        for _ in range(units):
            for peer, start in sorted(self.training.items(), key=lambda kv: kv[0].raw):
                if peer in self.silent | self.ended or self.done[peer] >= start.units:
                    continue
                self.done[peer] += 1
                round_ = self.done[peer] + self.rfq.units - start.units  # the job's round
                self.call(peer, "round_done", JOB, round_, self.evidence(peer, round_), self.now)
            self.tick(self.now + 1)

    def evidence(self, peer: PeerId, round_: int) -> bytes:
        """What ``peer`` reports for ``round_``: the round's state, the same on every honest
        peer (``liars`` report their own)."""
        return bytes([round_ % 256, peer in self.liars]) * 16

    def fail(self, peer: PeerId, at_round: int) -> None:
        """``peer`` dies; the buyer learns it failed from round ``at_round`` on."""
        self.silent.add(peer)
        self.call(self.buyer, "peer_failed", peer, at_round, self.now)
        self.tick(self.now + 1)

    def finish(self, reason: SettleReason = SettleReason.DONE) -> None:
        self.call(self.buyer, "finish", self.now, reason)
        self.tick(self.now + 120)

    def run(self) -> Market:
        """A whole job: post, every unit, settle."""
        self.post()
        self.work(self.job.rfq.units)
        self.finish()
        return self
