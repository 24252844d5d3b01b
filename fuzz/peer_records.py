"""Harness: signed peer records (:meth:`~meshfed.membership.records.SignedPeerRecord.verify`,
:func:`~meshfed.membership.records.signed_subject`) and the record table they go into
(:class:`~meshfed.membership.records.PeerTable`) through anti-entropy gossip
(:class:`~meshfed.membership.gossip.AntiEntropy`: digests answered, deltas applied).

Records come raw, or signed by keys the harness holds (so the table's logic is reached), with
fuzzed fields. The table must stay within its size, keep the pinned record, hold only
verified, unexpired records, and keep the newest ``seq`` it accepted per peer.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from meshfed.codec import schema_of
from meshfed.errors import RemoteProtocolError
from meshfed.membership.gossip import AntiEntropy, Delta, Digest, DigestEntry
from meshfed.membership.records import (
    RECORD_DOMAIN,
    PeerRecord,
    PeerTable,
    SignedPeerRecord,
    signed_subject,
)

from ._common import IDENTITIES, NOW_MS, Reader, Writer, loose_unpack, pack, sample_record

MAX_SIZE = 3
RAW, SIGNED_RAW, SIGNED_FIELDS, HONEST = range(4)
APPLY, DELTA, DIGEST, EXPIRE = range(4)
_FIELDS: list[list[Any]] = [
    schema_of(PeerRecord).encode(
        schema_of(PeerRecord).decode(loose_unpack(sample_record(i).record), "PeerRecord")
    )
    for i in IDENTITIES
]


def _record_fields(reader: Reader, signer: int) -> list[Any]:
    """A record of ``IDENTITIES[signer]`` with fuzzed fields (its real binding by default)."""
    fields = list(_FIELDS[signer])
    fields[1] = reader.uint(8) if reader.flag() else reader.uint(1)
    fields[2] = NOW_MS + reader.uint(3) - (1 << 20)
    while reader.flag():  # replace a field by any msgpack value
        fields[reader.below(len(fields))] = loose_unpack(reader.sized(256))
    return fields


def signed_record(reader: Reader) -> SignedPeerRecord:
    """A record as a peer may send it: raw, signed raw bytes, fuzzed fields or honest."""
    kind = reader.below(4)
    signer = 1 + reader.below(len(IDENTITIES) - 1)  # only we hold IDENTITIES[0]'s key
    if kind == RAW:
        return SignedPeerRecord(record=reader.sized(1024), signature=reader.take(64).ljust(64))
    if kind == HONEST:
        return sample_record(IDENTITIES[signer], seq=reader.uint(2), ttl_ms=1 + reader.uint(3))
    record = reader.sized(1024) if kind == SIGNED_RAW else pack(_record_fields(reader, signer))
    return SignedPeerRecord(
        record=record, signature=IDENTITIES[signer].sign(RECORD_DOMAIN + record)
    )


def check_table(
    table: PeerTable, newest: dict[bytes, int], checked: set[bytes], now_ms: int
) -> None:
    """The table's invariants; ``checked`` holds the signatures verified already."""
    if len(table) > MAX_SIZE:
        raise AssertionError(f"{len(table)} records in a table of {MAX_SIZE}")
    if table.get(IDENTITIES[0].peer_id) is None:
        raise AssertionError("the pinned record was evicted")
    for record in table.records():
        signed = table.signed(record.peer)
        if signed is None:
            raise AssertionError("the table holds a record without its signed form")
        if signed.signature not in checked:
            if signed.verify() != record:
                raise AssertionError("the table holds a record that does not verify")
            checked.add(signed.signature)
        if record.expires_ms <= now_ms:
            raise AssertionError("the table holds an expired record")
        if record.seq < newest.get(record.peer.raw, 0):
            raise AssertionError("an older record replaced a newer one")
    held = {record.peer.raw for record in table.records()}
    for raw in set(newest) - held:  # evicted or expired: the table may take any record again
        del newest[raw]


def test_one_input(data: bytes) -> None:
    """A table holding our own record, then a sequence of records, deltas and digests."""
    reader = Reader(data)
    table = PeerTable(max_size=MAX_SIZE, rng=random.Random(0), pinned=IDENTITIES[0].peer_id)
    gossip = AntiEntropy(table, random.Random(1), max_records=8)
    now_ms = NOW_MS
    table.apply(sample_record(IDENTITIES[0], seq=1 << 40, ttl_ms=1 << 40), now_ms=now_ms)
    newest: dict[bytes, int] = {}
    checked: set[bytes] = set()
    for _ in range(1 + reader.below(8)):
        step = reader.below(4)
        if step in (APPLY, DELTA):
            records = [
                signed_record(reader) for _ in range(1 if step == APPLY else reader.below(5))
            ]
            held = {record.peer.raw: record.seq for record in table.records()}
            for signed in records:
                subject = signed_subject(signed)  # read before verifying: must not raise
                if step == DELTA and subject is not None:
                    # in a full table one record of a delta may evict a peer that a later
                    # one brings back: its newest seq starts over
                    newest.pop(subject.raw, None)
            try:
                if step == APPLY:
                    changed = [r for r in [table.apply(records[0], now_ms=now_ms)] if r]
                else:
                    changed, _, _ = gossip.apply(Delta(records=records, wants=[]), now_ms)
            except RemoteProtocolError:
                continue
            for record in changed:  # in order: the last one a peer got is the one held
                before = held.get(record.peer.raw)
                if step == APPLY and before is not None and record.seq <= before:
                    raise AssertionError("an older record replaced a newer one")
                newest[record.peer.raw] = record.seq
        elif step == DIGEST:
            entries = [
                DigestEntry(IDENTITIES[reader.below(len(IDENTITIES))].peer_id, reader.uint(8))
                for _ in range(reader.below(5))
            ]
            delta = gossip.answer(Digest(entries=entries))
            for signed in delta.records:
                signed.verify()
        else:
            now_ms += reader.uint(3) << 4
            table.expire(now_ms=now_ms)
        check_table(table, newest, checked, now_ms)


def seeds() -> Iterator[bytes]:
    """Honest records of every peer, gossiped; a forged one; a digest; time passing."""
    w = Writer().below(8, 5)
    for signer in (1, 2, 3):
        w.below(4, APPLY).below(4, HONEST).below(3, signer - 1).uint(2, 5).uint(3, 1 << 20)
    w.below(4, DELTA).below(5, 2).below(4, SIGNED_FIELDS).below(3, 0)
    w.uint(1, 0).uint(1, 9).uint(3, 1 << 21).uint(1, 0)
    w.below(4, RAW).below(3, 1).sized(b"\x91\xc4\x26" + bytes(38)).raw(bytes(64))
    w.below(4, DIGEST).below(5, 2).below(4, 1).uint(8, 1).below(4, 2).uint(8, 99)
    w.below(4, EXPIRE).uint(3, 1 << 20)
    yield w.build()
