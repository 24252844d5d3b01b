"""Harness: Cyclon partial views (:class:`meshfed.membership.cyclon.Cyclon`): shuffles from
peers answered and merged, our own shuffles started and their replies merged, with records
raw, forged, fuzzed or honest.

The view must stay within its size, keep our own record, never list us, and hold only records
that verify, newest per peer.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from meshfed.membership.cyclon import Cyclon, Shuffle
from meshfed.membership.records import PeerTable

from ._common import IDENTITIES, NOW_MS, Reader, Writer, sample_record
from .peer_records import HONEST, MAX_SIZE, check_table, signed_record

_ME = IDENTITIES[0]
ANSWER, SHUFFLE = range(2)


def test_one_input(data: bytes) -> None:
    """A view of ``MAX_SIZE - 1`` peers, then shuffles both ways."""
    reader = Reader(data)
    table = PeerTable(max_size=MAX_SIZE, rng=random.Random(0), pinned=_ME.peer_id)
    cyclon = Cyclon(_ME.peer_id, table, length=2, rng=random.Random(1))
    own = sample_record(_ME, seq=1 << 40, ttl_ms=1 << 40)
    table.apply(own, now_ms=NOW_MS)
    newest: dict[bytes, int] = {}
    checked: set[bytes] = set()
    for _ in range(1 + reader.below(6)):
        records = [signed_record(reader) for _ in range(reader.below(5))]
        if reader.below(2) == ANSWER:
            source = IDENTITIES[1 + reader.below(len(IDENTITIES) - 1)].peer_id
            reply, _ = cyclon.answer(Shuffle(records=records), source, NOW_MS)
            for signed in reply.records:
                peer = signed.verify().peer
                if peer == source:
                    raise AssertionError("a shuffle was answered with the partner's own record")
                newest.pop(peer.raw, None)  # sent away: it may leave the view
        else:
            started = cyclon.start(own)
            if started is None:
                continue
            partner, _, sent = started
            if partner.peer == _ME.peer_id or _ME.peer_id in sent:
                raise AssertionError("we shuffled with ourselves")
            for peer in (partner.peer, *sent):  # they may leave the view: any record may return
                newest.pop(peer.raw, None)
            cyclon.merge(records, sent, NOW_MS)
        if _ME.peer_id in cyclon.view():
            raise AssertionError("we are in our own view")
        check_table(table, newest, checked, NOW_MS)
        for record in table.records():
            newest[record.peer.raw] = max(newest.get(record.peer.raw, 0), record.seq)


def seeds() -> Iterator[bytes]:
    """Honest shuffles both ways."""
    w = Writer().below(6, 3)
    w.below(5, 2)
    for signer in (1, 2):
        w.below(4, HONEST).below(3, signer - 1).uint(2, 3).uint(3, 1 << 20)
    w.below(2, ANSWER).below(3, 2)
    w.below(5, 1).below(4, HONEST).below(3, 2).uint(2, 4).uint(3, 1 << 20).below(2, SHUFFLE)
    w.below(5, 0).below(2, ANSWER).below(3, 0)
    yield w.build()
