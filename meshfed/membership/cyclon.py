"""Cyclon partial views (Voulgaris, Gavidia, van Steen, J. Network Syst. Manage. 2005), sans-IO.

Theory of operation (SPEC.md, "Partial views"). Past a configured size a node does not hold
every record: it holds a view of ``size`` records, each with an age. Every shuffle period it

1. ages every entry by one, and picks the oldest entry ``q`` (dead links age out first);
2. removes ``q`` from its view and sends it ``length - 1`` random other entries plus its own
   fresh record;
3. ``q`` answers with ``length`` random entries of its own view, and merges what it got;
4. each side merges the other's entries: skip itself and entries it holds (keeping the newer
   record), fill empty slots first, then replace the entries it sent.

Entries move between views rather than being copied, so every node appears in about ``size``
views (in-degree balanced), each view is a near-uniform sample of the live nodes, and the state
and traffic of a node do not grow with the mesh. Records stay signed by their subjects.

**Newcomer share.** Each entry remembers the peer that introduced it (the shuffle's partner).
One partner may hold at most ``max_share`` entries of our view that it introduced; its further
newcomers are dropped (and reported), so a peer minting identities cannot eclipse a view by
shuffling at it, however often it shuffles.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..codec import bounded
from ..errors import RemoteProtocolError
from ..identity import PeerId
from ..stats import RejectReason
from ..wire import Message, message
from .records import PeerRecord, PeerTable, SignedPeerRecord, signed_subject

__all__ = ["Cyclon", "Shuffle", "ShuffleReply"]

MAX_SHUFFLE = 64


@message("meshfed.members.shuffle")
@dataclass(frozen=True, slots=True)
class Shuffle(Message):
    """The initiator's entries (its own record among them)."""

    records: list[SignedPeerRecord] = bounded(max_len=MAX_SHUFFLE)


@message("meshfed.members.shuffle_reply")
@dataclass(frozen=True, slots=True)
class ShuffleReply(Message):
    """The partner's entries in exchange."""

    records: list[SignedPeerRecord] = bounded(max_len=MAX_SHUFFLE)


class Cyclon:
    """A Cyclon view over a :class:`PeerTable` (which holds the records; ours is pinned).

    Args:
        me: our peer id.
        table: the record store, created with ``max_size = size + 1`` (the view plus us).
        length: entries exchanged per shuffle.
        rng: the only randomness.
        max_share: the most entries of our view one partner may have introduced (default:
            ``length``, what one honest shuffle brings).
    """

    def __init__(
        self,
        me: PeerId,
        table: PeerTable,
        *,
        length: int,
        rng: random.Random,
        max_share: int | None = None,
    ) -> None:
        if not 1 <= length <= MAX_SHUFFLE:
            raise ValueError(f"shuffle length must be in 1..{MAX_SHUFFLE}, not {length}")
        self.me = me
        self.table = table
        self.length = length
        self.max_share = length if max_share is None else max_share
        self._rng = rng
        self._age: dict[PeerId, int] = {}
        self._introduced_by: dict[PeerId, PeerId] = {}

    def view(self) -> list[PeerId]:
        """The peers in our view (not us)."""
        return [r.peer for r in self.table.records() if r.peer != self.me]

    def start(self, own: SignedPeerRecord) -> tuple[PeerRecord, Shuffle, list[PeerId]] | None:
        """Begin a shuffle: ``(partner's record, message, sent)``, or ``None`` with an empty
        view. The partner leaves our view now; ``sent`` are the entries it may replace."""
        view = self.view()
        if not view:
            return None
        for peer in view:
            self._age[peer] = self._age.get(peer, 0) + 1
        partner = max(view, key=lambda p: (self._age.get(p, 0), self._rng.random()))
        partner_record = self.table.get(partner)
        assert partner_record is not None
        self.forget(partner)
        others = [p for p in view if p != partner]
        sent = self._rng.sample(others, min(self.length - 1, len(others)))
        records = [own, *(s for s in map(self.table.signed, sent) if s is not None)]
        return partner_record, Shuffle(records=records), sent

    def answer(
        self, shuffle: Shuffle, source: PeerId, now_ms: int
    ) -> tuple[ShuffleReply, list[RemoteProtocolError]]:
        """Answer a partner's shuffle and merge its entries. Returns the reply and the records
        rejected (the caller counts them)."""
        others = [p for p in self.view() if p != source]
        sent = self._rng.sample(others, min(self.length, len(others)))
        reply = ShuffleReply(records=[s for s in map(self.table.signed, sent) if s is not None])
        return reply, self.merge(shuffle.records, sent, now_ms, source)

    def merge(
        self, records: list[SignedPeerRecord], sent: list[PeerId], now_ms: int, source: PeerId
    ) -> list[RemoteProtocolError]:
        """Take ``source``'s entries: fill free slots, then replace what we sent; newcomers
        past ``source``'s share are dropped and reported as [rate_limited]."""
        rejected: list[RemoteProtocolError] = []
        replaceable = [p for p in sent if self.table.get(p) is not None]
        share = self._share(source)
        for signed in records[:MAX_SHUFFLE]:
            subject = signed_subject(signed)
            if subject == self.me:
                continue
            newcomer = subject is None or self.table.get(subject) is None
            try:
                if newcomer and share >= self.max_share:
                    raise RemoteProtocolError(
                        f"{source} introduced {share} entries of our view already",
                        reason=RejectReason.RATE_LIMITED,
                    )
                if newcomer and self.table.full():
                    signed.verify()  # check before anything of ours is given up for it
                    if not replaceable:
                        continue  # nothing of ours left to give up: keep our view
                    self.forget(replaceable.pop())
                if (record := self.table.apply(signed, now_ms=now_ms)) is not None:
                    self._age.setdefault(record.peer, 0)
                    if newcomer:
                        self._introduced_by[record.peer] = source
                        share += 1
            except RemoteProtocolError as exc:
                rejected.append(exc)
        return rejected

    def _share(self, source: PeerId) -> int:
        """How many entries of our view ``source`` introduced."""
        held = [p for p in self._introduced_by if self.table.get(p) is not None]
        self._introduced_by = {p: self._introduced_by[p] for p in held}
        return sum(1 for by in self._introduced_by.values() if by == source)

    def forget(self, peer: PeerId) -> None:
        """Drop ``peer`` from the view (shuffled away, or found dead)."""
        self.table.remove(peer)
        self._age.pop(peer, None)
        self._introduced_by.pop(peer, None)

    def taken(self, record: PeerRecord) -> None:
        """A record entered the table by another path (bootstrap, mDNS): age it from zero."""
        self._age.setdefault(record.peer, 0)
