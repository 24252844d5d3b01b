"""The market's wire messages, RFQ to Receipt (SPEC.md, "Market messages").

Every message is a frozen dataclass travelling in a signed envelope (:mod:`meshfed.wire`), so
the envelope says who said it and the signature binds them to it. Each one carries:

- ``job``: the job id (1..128 characters), the same in every message of one job;
- ``expires_ms``: the wall-clock millisecond after which a receiver refuses it
  (:func:`check_fresh`), so that an old bid, award or note cannot be played into a later state.

Messages that answer or accept another name it by its :func:`digest` (``rfq_digest``,
``award_digest``, ``note_digest``, ``settle_digest``): a bid is for that exact RFQ, a lease
accepts that exact award. The digest is also the idempotency key of the lease machines: the
same message twice is the same digest, and changes nothing the second time.

Amounts are integers in micro-credits, 0..:data:`~meshfed.market.terms.MAX_AMOUNT`.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from ..codec import bounded, schema_of
from ..errors import RemoteProtocolError
from ..identity import PeerId
from ..stats import RejectReason
from ..wire import Message, message
from .terms import MAX_AMOUNT, Requirements, Tier, WorkKind

__all__ = [
    "DIGEST_BYTES",
    "MAX_DETAIL",
    "MAX_EXPIRES_MS",
    "MAX_FORFEIT_S",
    "MAX_JOB",
    "MAX_ROSTER",
    "MAX_SPEC_BYTES",
    "MAX_UNITS",
    "Award",
    "Bid",
    "BidCapabilities",
    "DebitAck",
    "DebitNote",
    "DebitRefusal",
    "Decline",
    "DeclineReason",
    "JobStatusQuery",
    "JobStatusReport",
    "Lease",
    "LeaseDecline",
    "MarketMessage",
    "ModelOffer",
    "ModelQuery",
    "PrivacyLevel",
    "ProofQuery",
    "Receipt",
    "RefusalReason",
    "Release",
    "Rfq",
    "RosterUpdate",
    "ScoringWeight",
    "Settle",
    "SettleReason",
    "Verification",
    "check_fresh",
    "digest",
]

#: the longest job id
MAX_JOB = 128
#: sha256
DIGEST_BYTES = 32
#: the most peers a roster lists (enterprise jobs run 500+)
MAX_ROSTER = 1024
#: the most units (peer-rounds, inference requests) one lease holds
MAX_UNITS = 1_000_000
#: the largest job spec an RFQ carries
MAX_SPEC_BYTES = 64 * 1024
#: the longest forfeit window a lease may set (30 days)
MAX_FORFEIT_S = 30 * 24 * 3600
#: the latest expiry (the codec's int64)
MAX_EXPIRES_MS = 2**63 - 1
#: the longest free-text detail (decline reasons)
MAX_DETAIL = 256

_DIGEST_DOMAIN = b"meshfed-market-digest-v1\x00"


class PrivacyLevel(enum.StrEnum):
    """How a training job protects each peer's update."""

    #: plain averaging
    NONE = "none"
    #: secure aggregation (no peer sees another's update)
    SECAGG = "secagg"
    #: differential privacy noise on each update
    DP = "dp"
    #: both
    SECAGG_DP = "secagg+dp"


class DeclineReason(enum.StrEnum):
    """Why a peer does not bid (a requirement it fails, or no room for the work)."""

    BUSY = "busy"
    DATASET = "dataset"
    MIN_EXAMPLES = "min_examples"
    MODEL = "model"
    ROLES = "roles"
    MEMORY = "memory"
    ACCELERATOR = "accelerator"
    BATTERY = "battery"
    METERED = "metered"
    CHARGING = "charging"
    KIND = "kind"
    PRICE = "price"
    #: the bid deadline is further ahead than this seller holds a reservation open
    DEADLINE = "deadline"
    #: the device's policy stops it taking work now (low battery, heat, a metered link, quiet
    #: hours: the detail says which)
    PAUSED = "paused"


class SettleReason(enum.StrEnum):
    """Why a job's leases end."""

    DONE = "done"
    CANCELLED = "cancelled"
    BUDGET = "budget"
    FORFEIT = "forfeit"


class RefusalReason(enum.StrEnum):
    """Why the buyer refuses to pay a debit note (:class:`DebitRefusal`)."""

    #: its evidence is not the one the unit's replicas agreed on
    WRONG = "wrong"
    #: it was spot-checked and its proof failed or did not come in time
    PROOF = "proof"
    #: the unit got no agreement before its deadline: nobody is paid for it, nobody blamed
    UNVERIFIED = "unverified"
    #: the unit is no longer the seller's (reported failed before it) or the job settled
    LEASE = "lease"


def _job() -> Any:
    return bounded(min_len=1, max_len=MAX_JOB)


def _expires() -> Any:
    return bounded(ge=0, le=MAX_EXPIRES_MS)


def _digest() -> Any:
    return bounded(min_len=DIGEST_BYTES, max_len=DIGEST_BYTES)


def _amount() -> Any:
    return bounded(ge=0, le=MAX_AMOUNT)


def _units(least: int = 1) -> Any:
    return bounded(ge=least, le=MAX_UNITS)


def _enum_value(value: str, kind: type[enum.StrEnum], field: str) -> None:
    if value not in kind.__members__.values():
        raise ValueError(f"{field} {value[:32]!r} is not one of {[str(v) for v in kind]}")


def _distinct(peers: list[PeerId], field: str) -> None:
    if len(set(peers)) != len(peers):
        raise ValueError(f"{field} lists a peer twice")


class MarketMessage(Message):
    """Base of the market's messages: every one names its job and when it expires."""

    job: str
    expires_ms: int


@dataclass(frozen=True, slots=True)
class ScoringWeight:
    """One scoring override of an RFQ (``name`` as in the tier's scoring, e.g. ``"cost"``)."""

    name: str = bounded(min_len=1, max_len=32)
    value: float = bounded(ge=0.0, le=1e6)


@dataclass(frozen=True, slots=True)
class Verification:
    """How a job checks its units' results (``verification.py``): ``replicas`` notes must
    agree on one evidence before a unit is paid (1: each note stands alone); each (seller,
    unit) is spot-checked with probability ``spot_rate``; a unit waits at most ``window_s``
    for its replicas, a spot-checked note as long for its proof."""

    replicas: int = bounded(ge=1, le=MAX_ROSTER, default=1)
    spot_rate: float = bounded(ge=0.0, le=1.0, default=0.0)
    window_s: int = bounded(ge=1, le=MAX_FORFEIT_S, default=120)

    @property
    def active(self) -> bool:
        """Whether any note waits for a verdict (replication or spot checks asked)."""
        return self.replicas > 1 or self.spot_rate > 0


@message("meshfed.market.rfq")
@dataclass(frozen=True, slots=True)
class Rfq(MarketMessage):
    """A request for quotes, buyer to each matching peer.

    ``units`` is per winner (rounds of training); ``budget`` caps the whole job (all winners,
    all units); bids are taken until ``bid_deadline_ms`` (which is also ``expires_ms`` at most).
    ``spec`` is the job spec the winners will run, as bytes (the driver's encoding), so that a
    bid and the award are for that exact work. ``forfeit_after_s`` is the lease term: a buyer
    that leaves a debit note unacknowledged that long forfeits to the work done.
    ``verification``: how the units' results are checked (at most ``min_peers`` replicas).
    """

    job: str = _job()
    expires_ms: int = _expires()
    kind: str = bounded(max_len=16)
    tier: str = bounded(max_len=16)
    requirements: Requirements = bounded()
    units: int = _units()
    min_peers: int = bounded(ge=1, le=MAX_ROSTER)
    max_peers: int = bounded(ge=1, le=MAX_ROSTER)
    budget: int = _amount()
    bid_deadline_ms: int = _expires()
    privacy: str = bounded(max_len=16)
    forfeit_after_s: int = bounded(ge=1, le=MAX_FORFEIT_S)
    spec: bytes = bounded(max_len=MAX_SPEC_BYTES)
    scoring: list[ScoringWeight] = bounded(max_len=16)
    verification: Verification = bounded(default=Verification())

    def __post_init__(self) -> None:
        _enum_value(self.kind, WorkKind, "kind")
        _enum_value(self.tier, Tier, "tier")
        _enum_value(self.privacy, PrivacyLevel, "privacy")
        if self.min_peers > self.max_peers:
            raise ValueError(f"min_peers {self.min_peers} > max_peers {self.max_peers}")
        if self.bid_deadline_ms > self.expires_ms:
            raise ValueError("the bid deadline is after the RFQ expires")
        if len({weight.name for weight in self.scoring}) != len(self.scoring):
            raise ValueError("a scoring weight is named twice")
        if self.verification.replicas > self.min_peers:
            raise ValueError(
                f"{self.verification.replicas} replicas asked of at least {self.min_peers} peers"
            )


@dataclass(frozen=True, slots=True)
class BidCapabilities:
    """What a bidder offers for this job, as it reports it at bid time.

    ``examples``: examples of the RFQ's data set it holds; ``throughput``: examples (or
    requests) per second it expects to sustain; ``locality``: a free hint (region, network).
    ``battery_pct`` is None for a peer without a battery.
    """

    examples: int = bounded(ge=0, le=2**40)
    throughput: float = bounded(ge=0.0, le=1e12)
    accelerator: str = bounded(max_len=64)
    memory_mb: int = bounded(ge=0, le=2**40)
    battery_pct: int | None = bounded(ge=0, le=100)
    locality: str = bounded(max_len=64)


@message("meshfed.market.bid")
@dataclass(frozen=True, slots=True)
class Bid(MarketMessage):
    """A sealed bid for the RFQ whose digest is ``rfq_digest``: ``price`` micro-credits per
    unit, ``units`` held in reserve for the buyer until ``expires_ms`` (the reservation's end)."""

    job: str = _job()
    expires_ms: int = _expires()
    rfq_digest: bytes = _digest()
    price: int = _amount()
    units: int = _units()
    capabilities: BidCapabilities = bounded()


@message("meshfed.market.decline")
@dataclass(frozen=True, slots=True)
class Decline(MarketMessage):
    """No bid for the RFQ ``rfq_digest``: which requirement fails, or busy."""

    job: str = _job()
    expires_ms: int = _expires()
    rfq_digest: bytes = _digest()
    reason: str = bounded(max_len=32)
    detail: str = bounded(max_len=MAX_DETAIL)

    def __post_init__(self) -> None:
        _enum_value(self.reason, DeclineReason, "reason")


@message("meshfed.market.award")
@dataclass(frozen=True, slots=True)
class Award(MarketMessage):
    """The buyer awards ``winner`` (the receiver) ``units`` at ``price`` per unit (its clearing
    price, at least its bid) for the RFQ ``rfq_digest``; accept by ``expires_ms``.

    ``roster`` is every winner at ``roster_version``; ``forfeit_after_s`` repeats the RFQ's
    lease term.
    """

    job: str = _job()
    expires_ms: int = _expires()
    rfq_digest: bytes = _digest()
    winner: PeerId = bounded()
    price: int = _amount()
    units: int = _units()
    roster: list[PeerId] = bounded(min_len=1, max_len=MAX_ROSTER)
    roster_version: int = bounded(ge=1, le=MAX_UNITS)
    forfeit_after_s: int = bounded(ge=1, le=MAX_FORFEIT_S)

    def __post_init__(self) -> None:
        _distinct(self.roster, "roster")
        if self.winner not in self.roster:
            raise ValueError("the winner is not in the roster")


@message("meshfed.market.lease")
@dataclass(frozen=True, slots=True)
class Lease(MarketMessage):
    """The winner accepts the award ``award_digest``: the lease is the award plus this
    signature."""

    job: str = _job()
    expires_ms: int = _expires()
    award_digest: bytes = _digest()


@message("meshfed.market.lease_decline")
@dataclass(frozen=True, slots=True)
class LeaseDecline(MarketMessage):
    """The winner does not take the award ``award_digest``."""

    job: str = _job()
    expires_ms: int = _expires()
    award_digest: bytes = _digest()
    detail: str = bounded(max_len=MAX_DETAIL)


@message("meshfed.market.release")
@dataclass(frozen=True, slots=True)
class Release(MarketMessage):
    """To a losing bidder: the award is out without it; free what the bid reserved."""

    job: str = _job()
    expires_ms: int = _expires()
    rfq_digest: bytes = _digest()


@message("meshfed.market.roster_update")
@dataclass(frozen=True, slots=True)
class RosterUpdate(MarketMessage):
    """The buyer's new roster from round ``from_round`` on: ``replaced`` left it.

    Only the buyer's signature (the envelope's) makes it count; versions only go up.
    """

    job: str = _job()
    expires_ms: int = _expires()
    roster_version: int = bounded(ge=1, le=MAX_UNITS)
    roster: list[PeerId] = bounded(min_len=1, max_len=MAX_ROSTER)
    from_round: int = bounded(ge=0, le=MAX_UNITS)
    replaced: list[PeerId] = bounded(max_len=MAX_ROSTER)

    def __post_init__(self) -> None:
        _distinct(self.roster, "roster")
        if set(self.replaced) & set(self.roster):
            raise ValueError("a replaced peer is still in the roster")


@message("meshfed.market.debit_note")
@dataclass(frozen=True, slots=True)
class DebitNote(MarketMessage):
    """The seller asks to be paid ``amount`` for unit ``unit`` (1-based) of its lease
    ``award_digest``; ``evidence`` is the digest of what the unit produced (e.g. the round's
    report). ``expires_ms`` is the seller's forfeit deadline for this note."""

    job: str = _job()
    expires_ms: int = _expires()
    award_digest: bytes = _digest()
    unit: int = _units()
    amount: int = _amount()
    evidence: bytes = _digest()


@message("meshfed.market.debit_ack")
@dataclass(frozen=True, slots=True)
class DebitAck(MarketMessage):
    """The buyer acknowledges (and so has paid) ``seller``'s note ``note_digest`` for
    ``unit``: the seller's receipt for one unit, signed by the buyer."""

    job: str = _job()
    expires_ms: int = _expires()
    seller: PeerId = bounded()
    unit: int = _units()
    amount: int = _amount()
    note_digest: bytes = _digest()


@message("meshfed.market.debit_refusal")
@dataclass(frozen=True, slots=True)
class DebitRefusal(MarketMessage):
    """The buyer will not pay ``seller``'s note ``note_digest`` for ``unit``, and why
    (:class:`RefusalReason`); ``agreed`` is the evidence the unit's replicas agreed on (empty
    when none did). Final: the note leaves the seller's outbox and is never forfeited."""

    job: str = _job()
    expires_ms: int = _expires()
    seller: PeerId = bounded()
    unit: int = _units()
    note_digest: bytes = _digest()
    reason: str = bounded(max_len=16)
    agreed: bytes = bounded(max_len=DIGEST_BYTES)

    def __post_init__(self) -> None:
        _enum_value(self.reason, RefusalReason, "reason")
        if len(self.agreed) not in (0, DIGEST_BYTES):
            raise ValueError("agreed is a digest or empty")


@message("meshfed.market.proof_query")
@dataclass(frozen=True, slots=True)
class ProofQuery(MarketMessage):
    """A spot check: the buyer asks the seller of lease ``award_digest`` for what unit
    ``unit`` produced (the state whose digest is ``evidence``, its note's); the bytes travel
    outside the message, by ``expires_ms``."""

    job: str = _job()
    expires_ms: int = _expires()
    award_digest: bytes = _digest()
    unit: int = _units()
    evidence: bytes = _digest()


@message("meshfed.market.settle")
@dataclass(frozen=True, slots=True)
class Settle(MarketMessage):
    """The buyer closes a lease: it paid ``units`` units, ``amount`` in all, and why it
    ends."""

    job: str = _job()
    expires_ms: int = _expires()
    units: int = _units(least=0)
    amount: int = _amount()
    reason: str = bounded(max_len=16)

    def __post_init__(self) -> None:
        _enum_value(self.reason, SettleReason, "reason")


@message("meshfed.market.receipt")
@dataclass(frozen=True, slots=True)
class Receipt(MarketMessage):
    """The seller's signed receipt for the settlement ``settle_digest``: what it was paid by
    its own acknowledgements."""

    job: str = _job()
    expires_ms: int = _expires()
    settle_digest: bytes = _digest()
    units: int = _units(least=0)
    amount: int = _amount()


@message("meshfed.market.model_query")
@dataclass(frozen=True, slots=True)
class ModelQuery(MarketMessage):
    """The buyer asks a winner for the model it holds for ``job`` (answered by a
    :class:`ModelOffer`); with ``digest`` (32 bytes, not empty) it also asks for that model's
    weights, sent outside the message as the array ``marketmodel.<job hex>``."""

    job: str = _job()
    expires_ms: int = _expires()
    digest: bytes = bounded(max_len=32)


@message("meshfed.market.model_offer")
@dataclass(frozen=True, slots=True)
class ModelOffer(MarketMessage):
    """A winner's model for ``job``: the job round (1-based) it ended, the SHA-256 of its
    float32 little-endian weights and how many there are."""

    job: str = _job()
    expires_ms: int = _expires()
    round: int = _units()
    digest: bytes = _digest()
    parameters: int = bounded(ge=1, le=2**31)


@message("meshfed.market.status_query")
@dataclass(frozen=True, slots=True)
class JobStatusQuery(MarketMessage):
    """How is ``job`` doing? (Any roster peer answers.)"""

    job: str = _job()
    expires_ms: int = _expires()


@message("meshfed.market.status_report")
@dataclass(frozen=True, slots=True)
class JobStatusReport(MarketMessage):
    """A roster peer's view of ``job``: state, round ``round`` of ``rounds``, the
    example-weighted accuracy over ``examples`` held-out examples (None before the first
    report), the roster it trains with, and ``noted``: the units it billed (a seller that
    caught up over rounds did not do them: it bills fewer than its rounds; a buyer: the
    units every winner was paid for)."""

    job: str = _job()
    expires_ms: int = _expires()
    state: str = bounded(max_len=32)
    round: int = bounded(ge=0, le=MAX_UNITS)
    rounds: int = bounded(ge=0, le=MAX_UNITS)
    accuracy: float | None = bounded(ge=0.0, le=1.0)
    examples: int = bounded(ge=0, le=2**48)
    roster: list[PeerId] = bounded(max_len=MAX_ROSTER)
    noted: int = bounded(ge=0, le=MAX_UNITS)


def digest(message: MarketMessage) -> bytes:
    """sha256 of the message's canonical encoding, domain-separated by its wire type:
    ``sha256(b"meshfed-market-digest-v1\\0" || type || b"\\0" || msgpack(fields))``.

    The encoding is the codec's (fields in declaration order, msgpack's shortest forms), so
    one message has one digest on every peer.
    """
    encoded = msgpack.packb(schema_of(type(message)).encode(message), use_bin_type=True)
    return hashlib.sha256(_DIGEST_DOMAIN + message.TYPE.encode() + b"\x00" + encoded).digest()


def check_fresh(message: MarketMessage, now_ms: int) -> None:
    """Refuse ``message`` if it expired before ``now_ms``.

    Raises:
        RemoteProtocolError: ``STALE``.
    """
    if message.expires_ms < now_ms:
        raise RemoteProtocolError(
            f"{message.TYPE} for {message.job!r} expired at {message.expires_ms} ms",
            reason=RejectReason.STALE,
        )
