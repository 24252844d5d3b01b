"""Push-pull anti-entropy of signed peer records (sans-IO).

Theory of operation (SPEC.md, "Membership gossip"). Every ``interval`` a node sends a
:class:`Digest` (peer id and sequence of every record it holds, bounded) to ``fanout`` random
live members. The receiver answers a :class:`Delta` with the records it holds newer than the
digest says (or that the digest lacks) and the ids it wants because its own copy is older or
missing; the initiator applies the delta and pushes the wanted records in a second
:class:`Delta`. One exchange makes both tables agree, so a change reaches everyone in
O(log N) rounds (epidemic spreading).

Records stay signed by their subject on every hop, so a relaying peer cannot alter them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..codec import bounded
from ..errors import RemoteProtocolError
from ..identity import PeerId
from ..wire import Message, message
from .records import PeerRecord, PeerTable, SignedPeerRecord

__all__ = ["AntiEntropy", "Delta", "Digest", "DigestEntry"]

MAX_DIGEST = 4096
MAX_DELTA = 256


@dataclass(frozen=True, slots=True)
class DigestEntry:
    """A record's subject and the sequence number held."""

    peer: PeerId
    seq: int = bounded(ge=0)


@message("meshfed.members.digest")
@dataclass(frozen=True, slots=True)
class Digest(Message):
    """What the sender holds (the request of an exchange)."""

    entries: list[DigestEntry] = bounded(max_len=MAX_DIGEST)


@message("meshfed.members.delta")
@dataclass(frozen=True, slots=True)
class Delta(Message):
    """Records the other side lacks, and the ids this side wants."""

    records: list[SignedPeerRecord] = bounded(max_len=MAX_DELTA)
    wants: list[PeerId] = bounded(max_len=MAX_DIGEST)


@dataclass(slots=True)
class AntiEntropy:
    """The exchange logic over one :class:`PeerTable`. Pass ``now_ms`` in; no I/O.

    ``max_records`` caps the records one delta carries (a random choice among those due), so
    that under a partial view an exchange costs O(max_records), whatever the mesh size.
    """

    table: PeerTable
    rng: random.Random
    max_records: int = MAX_DELTA

    def digest(self) -> Digest:
        """Our digest (a random subset when we hold more than a digest can carry)."""
        records = list(self.table.records())
        if len(records) > MAX_DIGEST:
            records = self.rng.sample(records, MAX_DIGEST)
        return Digest(entries=[DigestEntry(peer=r.peer, seq=r.seq) for r in records])

    def answer(self, digest: Digest) -> Delta:
        """The reply to a peer's digest: what it lacks, what we lack."""
        theirs = {entry.peer: entry.seq for entry in digest.entries}
        newer = [r for r in self.table.records() if theirs.get(r.peer, -1) < r.seq]
        if len(newer) > self.max_records:
            newer = self.rng.sample(newer, self.max_records)
        signed = [s for s in (self.table.signed(r.peer) for r in newer) if s is not None]
        wants = []
        for peer, seq in theirs.items():
            held = self.table.get(peer)
            if held is None or held.seq < seq:
                wants.append(peer)
        return Delta(records=signed, wants=wants[:MAX_DIGEST])

    def apply(
        self, delta: Delta, now_ms: int
    ) -> tuple[list[PeerRecord], list[RemoteProtocolError], list[PeerId]]:
        """Take the delta's records. Returns the records that changed the table, the
        rejections (the caller counts each; one bad record never spoils the rest), and the
        peers evicted from a full table to make room."""
        changed, rejected, evicted = [], [], []
        for signed in delta.records:
            try:
                record = self.table.apply(signed, now_ms=now_ms)
            except RemoteProtocolError as exc:
                rejected.append(exc)
                continue
            evicted += self.table.evicted
            if record is not None:
                changed.append(record)
        return changed, rejected, [p for p in evicted if self.table.get(p) is None]

    def push(self, wants: list[PeerId]) -> Delta:
        """The records a peer asked for in its answer."""
        signed = [
            s for s in (self.table.signed(p) for p in wants[: self.max_records]) if s is not None
        ]
        return Delta(records=signed, wants=[])
