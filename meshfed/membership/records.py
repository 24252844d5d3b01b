"""Signed peer records: a peer's addresses, agreement key, capabilities and prices.

A record is signed by the peer it describes, so it can travel through any number of gossiping
peers and still be checked by everyone (SPEC.md, "Peer records"). The signed bytes are::

    b"meshfed-peer-record-v1" || msgpack(PeerRecord fields)

A newer ``seq`` replaces an older record of the same peer; a record past ``expires_ms`` is
dropped. :class:`PeerTable` is the sans-IO store: it takes records and a ``now``, and answers
capability queries from memory, never over the network.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

import msgpack

from ..codec import bounded, schema_of
from ..errors import RemoteProtocolError
from ..identity import Identity, PeerId, verify_x25519_binding
from ..stats import RejectReason
from ..wire import Message, message

__all__ = [
    "Capabilities",
    "DatasetOffer",
    "OnionKey",
    "PeerQuery",
    "PeerRecord",
    "PeerTable",
    "PriceAsk",
    "Role",
    "SignedPeerRecord",
    "sign_record",
    "signed_subject",
]

RECORD_DOMAIN = b"meshfed-peer-record-v1"
MAX_RECORD_BYTES = 16 * 1024


class Role(enum.StrEnum):
    """What a peer offers to do."""

    #: relays onion packets and, for client-mode peers, their traffic
    RELAY = "relay"
    #: trains on its own data for jobs
    TRAINER = "trainer"
    #: serves inference on hosted models
    INFERENCE = "inference"
    #: cannot accept inbound connections (behind NAT); never picked for inbound roles
    CLIENT_ONLY = "client-only"


#: the most feature axes a data set offer describes (an image's channels x height x width: 3)
MAX_FEATURE_AXES = 4
#: the longest a feature axis may be in an offer
MAX_FEATURE_LEN = 2**31 - 1


@dataclass(frozen=True, slots=True)
class DatasetOffer:
    """A data set a peer trains on: its name, example count, the shape of one example's
    features, how many label values it declares, and a digest of the set of labels it holds
    (:func:`meshfed.data.validation.label_digest`). Never the content. A zero ``classes`` and
    an all-zero ``label_digest`` mean "not said"."""

    name: str = bounded(max_len=128)
    examples: int = bounded(ge=0)
    feature_shape: list[int] = bounded(max_len=MAX_FEATURE_AXES, default_factory=list)
    classes: int = bounded(ge=0, le=2**31 - 1, default=0)
    label_digest: bytes = bounded(min_len=32, max_len=32, default=bytes(32))

    def __post_init__(self) -> None:
        if not all(type(n) is int and 1 <= n <= MAX_FEATURE_LEN for n in self.feature_shape):
            raise ValueError(f"feature axes are 1..{MAX_FEATURE_LEN} long: {self.feature_shape}")


@dataclass(frozen=True, slots=True)
class PriceAsk:
    """The lowest price a peer accepts for a unit of one kind of work in one tier, in integer
    micro-credits (``meshfed.market.pricing`` makes them; a unit is one peer-round of training
    or one inference request)."""

    kind: str = bounded(max_len=32)
    tier: str = bounded(max_len=32)
    price: int = bounded(ge=0, le=2**53)  # market.terms.MAX_AMOUNT (not importable here)

    def __post_init__(self) -> None:
        # imported here: the market's vocabulary imports this module (Role)
        from ..market.terms import Tier, WorkKind

        if self.kind not in {kind.value for kind in WorkKind}:
            raise ValueError(
                f"unknown kind of work {self.kind!r}; known: {[k.value for k in WorkKind]}"
            )
        if self.tier not in {tier.value for tier in Tier}:
            raise ValueError(f"unknown tier {self.tier!r}; known: {[t.value for t in Tier]}")


#: onion keys a record carries: the current epoch's and the next one's (one more in a handover)
MAX_ONION_KEYS = 3


@dataclass(frozen=True, slots=True)
class OnionKey:
    """A peer's X25519 onion key for one key epoch, signed by the peer over
    :func:`meshfed.onion.onion_key_statement` (check it with
    :func:`meshfed.onion.verify_onion_key` before building a packet with it)."""

    epoch: int = bounded(ge=0, le=2**32 - 1)
    public_key: bytes = bounded(min_len=32, max_len=32)
    signature: bytes = bounded(min_len=64, max_len=64)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a peer can do now. Optional readings are ``None`` when the device has no sensor."""

    cpu_cores: int = bounded(ge=0, le=4096, default=0)
    cpu_ghz: float = bounded(ge=0.0, le=100.0, default=0.0)
    memory_mb: int = bounded(ge=0, default=0)
    accelerator: str = bounded(max_len=64, default="")
    battery_pct: int | None = bounded(ge=0, le=100, default=None)
    charging: bool | None = bounded(default=None)
    temperature_c: float | None = bounded(ge=-60.0, le=150.0, default=None)
    metered: bool = bounded(default=False)
    wifi: bool = bounded(default=False)
    bandwidth_mbps: float = bounded(ge=0.0, default=0.0)
    models: list[str] = bounded(max_len=64, default_factory=list)
    datasets: list[DatasetOffer] = bounded(max_len=64, default_factory=list)
    roles: list[str] = bounded(max_len=8, default_factory=list)
    #: the peer's onion keys (SPEC 12): packets for it and through it are built with these
    onion_keys: list[OnionKey] = bounded(max_len=MAX_ONION_KEYS, default_factory=list)
    prices: list[PriceAsk] = bounded(max_len=8, default_factory=list)

    def __post_init__(self) -> None:
        known = {role.value for role in Role}
        unknown = [role for role in self.roles if role not in known]
        if unknown:
            raise ValueError(f"unknown roles {unknown}; known: {sorted(known)}")
        if Role.CLIENT_ONLY.value in self.roles and {Role.RELAY.value, Role.INFERENCE.value} & set(
            self.roles
        ):
            raise ValueError("a client-only peer cannot relay or serve inference (no inbound)")


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """Everything a peer says about itself, at version ``seq``, valid until ``expires_ms``."""

    peer: PeerId
    seq: int = bounded(ge=0)
    expires_ms: int = bounded(ge=0)
    addrs: list[str] = bounded(max_len=16)
    x25519: bytes = bounded(min_len=32, max_len=32)
    x25519_binding: bytes = bounded(min_len=64, max_len=64)
    capabilities: Capabilities = field(default_factory=Capabilities)

    def has_role(self, role: Role) -> bool:
        """True if the peer offers ``role``."""
        return role.value in self.capabilities.roles


@message("meshfed.peer_record")
@dataclass(frozen=True, slots=True)
class SignedPeerRecord(Message):
    """A record as it travels: the encoded record and its subject's signature."""

    record: bytes = bounded(max_len=MAX_RECORD_BYTES)
    signature: bytes = bounded(min_len=64, max_len=64)

    def verify(self) -> PeerRecord:
        """Decode and check the record.

        Raises:
            RemoteProtocolError: ``OVERSIZED``, ``MALFORMED``, ``BAD_FIELD`` or
                ``BAD_SIGNATURE`` (a record signed by anyone but its subject, or whose agreement
                key is not bound to the subject).
        """
        try:
            fields = msgpack.unpackb(self.record, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise RemoteProtocolError(
                f"peer record is not msgpack: {exc}", reason=RejectReason.MALFORMED
            ) from None
        record: PeerRecord = schema_of(PeerRecord).decode(fields, "PeerRecord")
        if not record.peer.verify(self.signature, RECORD_DOMAIN + self.record):
            raise RemoteProtocolError(
                f"peer record for {record.peer} is not signed by it",
                reason=RejectReason.BAD_SIGNATURE,
            )
        if not verify_x25519_binding(record.peer, record.x25519, record.x25519_binding):
            raise RemoteProtocolError(
                "agreement key not bound to the peer", reason=RejectReason.BAD_SIGNATURE
            )
        return record


def signed_subject(signed: SignedPeerRecord) -> PeerId | None:
    """The peer a signed record claims to describe, read without verifying (a cache key)."""
    try:
        fields = msgpack.unpackb(signed.record, raw=False)
        return PeerId(fields[0])
    except (ValueError, TypeError, IndexError, KeyError, msgpack.ExtraData, msgpack.FormatError):
        return None


def sign_record(
    identity: Identity,
    *,
    seq: int,
    expires_ms: int,
    addrs: list[str],
    capabilities: Capabilities,
) -> SignedPeerRecord:
    """Our own record, signed."""
    record = PeerRecord(
        peer=identity.peer_id,
        seq=seq,
        expires_ms=expires_ms,
        addrs=addrs,
        x25519=identity.x25519_public,
        x25519_binding=identity.x25519_binding,
        capabilities=capabilities,
    )
    encoded = msgpack.packb(schema_of(PeerRecord).encode(record), use_bin_type=True)
    if len(encoded) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(encoded)} bytes exceeds {MAX_RECORD_BYTES}")
    return SignedPeerRecord(record=encoded, signature=identity.sign(RECORD_DOMAIN + encoded))


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerQuery:
    """Conditions on peer records; every given one must hold."""

    role: Role | None = None
    model: str | None = None
    dataset: str | None = None
    #: charging peers pass whatever their battery level
    min_battery_pct: int | None = None

    def matches(self, record: PeerRecord) -> bool:
        """True if ``record`` meets every condition."""
        caps = record.capabilities
        return (
            (self.role is None or record.has_role(self.role))
            and (self.model is None or self.model in caps.models)
            and (self.dataset is None or any(d.name == self.dataset for d in caps.datasets))
            and (
                self.min_battery_pct is None
                or bool(caps.charging)
                or (caps.battery_pct or 0) >= self.min_battery_pct
            )
        )


class PeerTable:
    """The records this node holds, newest per peer. Sans-IO: pass ``now_ms`` in.

    Args:
        max_size: the most records held. When a record of a new peer arrives at a full table,
            a random held record (never ``pinned``'s) makes room, so the table stays a random
            sample of the peers heard of (a partial view) and memory stays bounded.
        rng: the randomness of that choice.
        pinned: a peer never evicted (the node itself).
    """

    def __init__(
        self,
        *,
        max_size: int | None = None,
        rng: random.Random | None = None,
        pinned: PeerId | None = None,
    ) -> None:
        self._records: dict[PeerId, tuple[PeerRecord, SignedPeerRecord]] = {}
        self._max_size = max_size
        self._rng = rng or random.Random(0)
        self._pinned = pinned
        #: peers evicted by the last :meth:`apply` (for the caller to stop probing them)
        self.evicted: list[PeerId] = []

    def apply(self, signed: SignedPeerRecord, *, now_ms: int) -> PeerRecord | None:
        """Take a record if it is valid and newer than the one held.

        Returns:
            The record if the table changed (new peer or newer record); ``None`` for a
            duplicate or an older version, which are normal in gossip and not errors.

        Raises:
            RemoteProtocolError: the record is forged or malformed (see
                :meth:`SignedPeerRecord.verify`), or already expired (``STALE``).
        """
        self.evicted = []
        subject = signed_subject(signed)
        held = None if subject is None else self._records.get(subject)
        if held is not None and held[1].signature == signed.signature:
            return None  # the very record we hold: no need to verify it again
        record = signed.verify()
        if record.expires_ms <= now_ms:
            raise RemoteProtocolError(f"record of {record.peer} expired", reason=RejectReason.STALE)
        held = self._records.get(record.peer)
        if held is not None and held[0].seq >= record.seq:
            return None
        if held is None and self._max_size is not None and len(self._records) >= self._max_size:
            candidates = [p for p in self._records if p != self._pinned]
            if not candidates:
                return None
            victim = self._rng.choice(candidates)
            del self._records[victim]
            self.evicted = [victim]
        self._records[record.peer] = (record, signed)
        return record

    def full(self) -> bool:
        """True when a record of a new peer would need room."""
        return self._max_size is not None and len(self._records) >= self._max_size

    def remove(self, peer: PeerId) -> None:
        """Forget ``peer``'s record (never the pinned one)."""
        if peer != self._pinned:
            self._records.pop(peer, None)

    def expire(self, *, now_ms: int) -> list[PeerId]:
        """Drop records past their expiry; returns whose."""
        gone = [peer for peer, (r, _) in self._records.items() if r.expires_ms <= now_ms]
        for peer in gone:
            del self._records[peer]
        return gone

    def get(self, peer: PeerId) -> PeerRecord | None:
        """The newest record held for ``peer``."""
        held = self._records.get(peer)
        return None if held is None else held[0]

    def signed(self, peer: PeerId) -> SignedPeerRecord | None:
        """The signed form of that record, for passing on."""
        held = self._records.get(peer)
        return None if held is None else held[1]

    def peers(self, query: PeerQuery | None = None) -> list[PeerRecord]:
        """Records matching ``query`` (all by default), from memory, no network."""
        return [r for r, _ in self._records.values() if query is None or query.matches(r)]

    def records(self) -> list[PeerRecord]:
        """Every record held."""
        return [record for record, _ in self._records.values()]

    def __len__(self) -> int:
        return len(self._records)
