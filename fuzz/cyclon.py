"""Harness: Cyclon partial views (:class:`meshfed.membership.cyclon.Cyclon`): shuffles from
peers answered and merged, our own shuffles started and their replies merged (from the partner
we shuffled with), with records raw, forged, fuzzed or honest.

The view must stay within its size, keep our own record, never list us, and hold only records
that verify, newest per peer; we never shuffle with ourselves nor answer a partner with its own
record or ours. Newcomer share (SPEC.md 7a): one merge takes at most ``max_share`` peers that
were not in the view, and no partner holds more than ``max_share`` entries of the view that it
introduced (the harness's count is a lower bound of the true one: an entry that was sent away
and may have come back through the same merge is no longer counted as anyone's).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

from meshfed.identity import PeerId
from meshfed.membership.cyclon import Cyclon, Shuffle
from meshfed.membership.records import PeerTable

from ._common import IDENTITIES, NOW_MS, Reader, Writer, sample_record
from .peer_records import HONEST, MAX_SIZE, check_table, signed_record

_ME = IDENTITIES[0]
ANSWER, SHUFFLE = range(2)
#: below the view's size (``MAX_SIZE - 1``), so that the share bounds something
MAX_SHARE = 1


def check_share(
    cyclon: Cyclon,
    introduced: dict[PeerId, PeerId],
    before: set[PeerId],
    sent: list[PeerId],
    source: PeerId,
) -> None:
    """After a merge of ``source``'s records: it brought at most ``max_share`` newcomers, and
    holds at most ``max_share`` entries it introduced. ``introduced`` (peer: who brought it) is
    kept here, never read from the code under test."""
    after = set(cyclon.view())
    new = after - before
    if len(new) > cyclon.max_share:
        raise AssertionError(f"one shuffle of {source} brought {len(new)} newcomers")
    for peer in sent:  # replaceable: it may have left and come back in this very merge
        introduced.pop(peer, None)
    for peer in [p for p in introduced if p not in after]:
        del introduced[peer]
    introduced.update(dict.fromkeys(new, source))
    for by, count in Counter(introduced.values()).items():
        if count > cyclon.max_share:
            raise AssertionError(f"{by} introduced {count} entries of our view")


def test_one_input(data: bytes) -> None:
    """A view of ``MAX_SIZE - 1`` peers, then shuffles both ways."""
    reader = Reader(data)
    table = PeerTable(max_size=MAX_SIZE, rng=random.Random(0), pinned=_ME.peer_id)
    cyclon = Cyclon(_ME.peer_id, table, length=2, rng=random.Random(1), max_share=MAX_SHARE)
    own = sample_record(_ME, seq=1 << 40, ttl_ms=1 << 40)
    table.apply(own, now_ms=NOW_MS)
    newest: dict[bytes, int] = {}
    checked: set[bytes] = set()
    introduced: dict[PeerId, PeerId] = {}
    for _ in range(1 + reader.below(6)):
        records = [signed_record(reader) for _ in range(reader.below(5))]
        if reader.below(2) == ANSWER:
            source = IDENTITIES[1 + reader.below(len(IDENTITIES) - 1)].peer_id
            before = set(cyclon.view())
            reply, _ = cyclon.answer(Shuffle(records=records), source, NOW_MS)
            sent = [signed.verify().peer for signed in reply.records]
            for peer in sent:
                if peer in (source, _ME.peer_id) or peer not in before:
                    raise AssertionError(f"a shuffle of {source} was answered with {peer}")
                newest.pop(peer.raw, None)  # sent away: it may leave the view
            check_share(cyclon, introduced, before, sent, source)
        else:
            started = cyclon.start(own)
            if started is None:
                continue
            partner, _, sent = started
            if partner.peer == _ME.peer_id or _ME.peer_id in sent:
                raise AssertionError("we shuffled with ourselves")
            for peer in (partner.peer, *sent):  # they may leave the view: any record may return
                newest.pop(peer.raw, None)
            before = set(cyclon.view())
            if partner.peer in before or not set(sent) <= before:
                raise AssertionError("the partner stayed in the view, or we sent a stranger")
            cyclon.merge(records, sent, NOW_MS, partner.peer)
            check_share(cyclon, introduced, before, sent, partner.peer)
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
