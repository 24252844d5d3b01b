"""What the harnesses share: fixed identities, a fixed clock, and the one rule of a harness.

The rule: a decoder or state machine fed by the network either accepts its input or rejects it
with our own :class:`~meshfed.errors.RemoteProtocolError` (the counted, documented rejection);
anything else that leaves it (another exception, a hang, runaway memory) is a crash. Harnesses
catch exactly the documented rejections and let everything else propagate to libFuzzer.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack

from meshfed.arrays import ArrayHeader, ArrayPart, ArrayParts, InlineArray
from meshfed.codec import schema_of
from meshfed.control import Ack, Ping, Pong, Text
from meshfed.errors import RemoteProtocolError
from meshfed.identity import Identity, PeerId
from meshfed.market.messages import (
    Award,
    Bid,
    BidCapabilities,
    DebitAck,
    DebitNote,
    Decline,
    JobStatusQuery,
    JobStatusReport,
    Lease,
    LeaseDecline,
    MarketMessage,
    ModelOffer,
    ModelQuery,
    PrivacyLevel,
    Receipt,
    Release,
    Rfq,
    RosterUpdate,
    Settle,
)
from meshfed.market.terms import Requirements
from meshfed.membership.cyclon import Shuffle, ShuffleReply
from meshfed.membership.gossip import Delta, Digest, DigestEntry
from meshfed.membership.records import (
    Capabilities,
    DatasetOffer,
    PriceAsk,
    SignedPeerRecord,
    sign_record,
)
from meshfed.membership.service import SwimAck, SwimPing, SwimPingReq
from meshfed.membership.swim import Incarnation, Update
from meshfed.secagg.messages import (
    AdvertiseKeys,
    InputsReceived,
    RollCall,
    SealedShares,
    ShareKeys,
    SharePart,
    Survivors,
    Unmask,
)
from meshfed.stats import RejectReason
from meshfed.training.sync import StateAnswer, StateQuery
from meshfed.wire import Message, message_types

__all__ = [
    "IDENTITIES",
    "NOW_MS",
    "WIRE_TYPES",
    "Reader",
    "Writer",
    "loose_unpack",
    "market_samples",
    "pack",
    "sample_messages",
    "sample_record",
    "through_wire",
]

M = TypeVar("M")

#: every registered message type (imported above: every one a node may receive), sorted
WIRE_TYPES: tuple[tuple[str, type[Message]], ...] = tuple(sorted(message_types().items()))

#: peers whose keys the harness holds, so it can sign what it feeds in (and get past the
#: signature checks to the logic behind them)
IDENTITIES = tuple(
    Identity.from_seeds(bytes([1 + i]) * 32, bytes([101 + i]) * 32) for i in range(4)
)
#: the wall clock every harness runs at (milliseconds)
NOW_MS = 1_750_000_000_000


def pack(value: Any) -> bytes:
    """msgpack as meshfed writes it."""
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def loose_unpack(data: bytes) -> Any:
    """Any msgpack document in ``data`` (the fuzzer's way to write structured values), or
    ``data`` itself if it is none."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError):  # every msgpack error is a ValueError
        return data


class Reader:
    """Reads a fuzzer's input as a sequence of choices; past the end, every read gives zeros
    (so every input is a complete scenario). :class:`Writer` builds seeds in the same layout."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    @property
    def left(self) -> int:
        """Bytes not read yet."""
        return max(0, len(self._data) - self._at)

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end)."""
        chunk = self._data[self._at : self._at + n]
        self._at += n
        return chunk

    def uint(self, size: int) -> int:
        """An unsigned big-endian integer of ``size`` bytes."""
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "big")

    def below(self, n: int) -> int:
        """An integer in ``[0, n)`` (one byte, or two for ``n > 256``)."""
        return self.uint(1 if n <= 256 else 2) % n

    def flag(self) -> bool:
        """A boolean (one byte)."""
        return bool(self.uint(1) & 1)

    def sized(self, max_len: int) -> bytes:
        """A length (two bytes, at most ``max_len``) and that many bytes."""
        return self.take(self.uint(2) % (max_len + 1))

    def rest(self) -> bytes:
        """Everything left."""
        return self.take(self.left)


class Writer:
    """Builds an input that :class:`Reader` reads back as the given choices (for seeds)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def uint(self, size: int, value: int) -> Writer:
        """What :meth:`Reader.uint` (and ``below``/``flag`` with the same size) reads."""
        self._parts.append(value.to_bytes(size, "big"))
        return self

    def below(self, n: int, value: int) -> Writer:
        """What :meth:`Reader.below` ``(n)`` reads as ``value``."""
        return self.uint(1 if n <= 256 else 2, value)

    def sized(self, data: bytes) -> Writer:
        """What :meth:`Reader.sized` reads."""
        return self.uint(2, len(data)).raw(data)

    def raw(self, data: bytes) -> Writer:
        """Bytes read by :meth:`Reader.take` or :meth:`Reader.rest`."""
        self._parts.append(data)
        return self

    def build(self) -> bytes:
        """The input."""
        return b"".join(self._parts)


def sample_record(identity: Identity, *, seq: int = 1, ttl_ms: int = 600_000) -> SignedPeerRecord:
    """A valid signed record of ``identity`` (expiring ``ttl_ms`` after :data:`NOW_MS`)."""
    return sign_record(
        identity,
        seq=seq,
        expires_ms=NOW_MS + ttl_ms,
        addrs=["/ip4/127.0.0.1/tcp/4001"],
        capabilities=Capabilities(
            cpu_cores=4, battery_pct=80, models=["mlp"], roles=["trainer"],
            datasets=[DatasetOffer(name="digits", examples=100)],
            prices=[PriceAsk(kind="training", tier="small", price=1_500_000)],
        ),
    )  # fmt: skip


def market_samples(
    buyer: PeerId, seller: PeerId, *, job: str, expires_ms: int, budget: int
) -> list[MarketMessage]:
    """One valid market message of every type about ``job`` between ``buyer`` and
    ``seller``."""
    roster = [seller, buyer]
    blank = bytes(32)
    rfq = Rfq(
        job=job, expires_ms=expires_ms, kind="training", tier="small",
        requirements=Requirements(dataset="digits", min_examples=100), units=3, min_peers=1,
        max_peers=2, budget=budget, bid_deadline_ms=expires_ms, privacy=PrivacyLevel.SECAGG.value,
        forfeit_after_s=600, spec=b"{}", scoring=[],
    )  # fmt: skip
    return [
        rfq,
        Bid(job, expires_ms, blank, 100_000, 3, BidCapabilities(500, 100.0, "", 4096, None, "")),
        Decline(job, expires_ms, blank, "busy", ""),
        Award(job, expires_ms, blank, seller, 200_000, 3, roster, 1, 600),
        Lease(job, expires_ms, blank),
        LeaseDecline(job, expires_ms, blank, "no"),
        Release(job, expires_ms, blank),
        RosterUpdate(job, expires_ms, 2, roster, 1, []),
        DebitNote(job, expires_ms, blank, 1, 200_000, blank),
        DebitAck(job, expires_ms, seller, 1, 200_000, blank),
        Settle(job, expires_ms, 1, 200_000, "done"),
        Receipt(job, expires_ms, blank, 1, 200_000),
        JobStatusQuery(job, expires_ms),
        ModelQuery(job, expires_ms, blank),
        ModelOffer(job, expires_ms, 3, blank, 1000),
        JobStatusReport(job, expires_ms, "running", 1, 3, 0.5, 100, roster, 1),
    ]


def sample_messages() -> list[Message]:
    """One valid message of every registered type (seeds for the decoders)."""
    a, b, c = (identity.peer_id for identity in IDENTITIES[:3])
    context = bytes(range(32))
    header = ArrayHeader(
        transfer_id=bytes(16), name="w", dtype="<f4", shape=[2, 3], chunk_bytes=8, crc32=7
    )
    update = Update(Incarnation.sign(IDENTITIES[0], 5), 1)
    share = SharePart(b, bytes(66))
    return [
        Ack(), Ping(sent_ms=NOW_MS), Pong(echo_ms=NOW_MS, now_ms=NOW_MS), Text(text="hi"),
        header, InlineArray(header=header, data=bytes(24)),
        ArrayParts(name="s", dtype="<u4",
                   parts=[ArrayPart(a, 2, bytes(32)), ArrayPart(b, 0, bytes(32))]),
        sample_record(IDENTITIES[1]),
        SwimPing(updates=[update]), SwimPingReq(target=b, timeout_ms=100, updates=[update]),
        SwimAck(ok=True, updates=[update, Update(Incarnation.sign(IDENTITIES[2], 2**32), 2)]),
        Shuffle(records=[sample_record(IDENTITIES[2])]), ShuffleReply(records=[]),
        Digest(entries=[DigestEntry(a, 3)]),
        Delta(records=[sample_record(IDENTITIES[3])], wants=[b]),
        AdvertiseKeys(context=context, cipher_key=bytes(32), mask_key=bytes(32)),
        ShareKeys(context=context, cipher_key=bytes(32), mask_key=bytes(32),
                  self_mask_digest=bytes(32), sealed=[SealedShares(b, bytes(148))]),
        RollCall(context=context, members=[a, b]), InputsReceived(context=context, senders=[a]),
        Survivors(context=context, survivors=[a, b, c]),
        Unmask(context=context, self_masks=[share], mask_keys=[]),
        StateQuery(job="j", send=True), StateAnswer(job="j", next_round=3),
        *market_samples(a, b, job="j", expires_ms=NOW_MS + 60_000, budget=10**6),
    ]  # fmt: skip


def through_wire(cls: type[M], fields: Any) -> M:
    """``fields`` packed and decoded as ``cls`` the way a receiver decodes a body (strict
    msgpack, then the schema).

    Raises:
        RemoteProtocolError: what the receiver would reject [malformed or bad_field].
    """
    try:
        value = msgpack.unpackb(pack(fields), raw=False, strict_map_key=True)
    except (ValueError, TypeError) as exc:
        raise RemoteProtocolError(str(exc), reason=RejectReason.MALFORMED) from None
    decoded: M = schema_of(cls).decode(value, cls.__name__)
    return decoded
