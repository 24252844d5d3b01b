"""The market's write-ahead journal: every event the lease machines took, so that a node
killed at any moment rebuilds them exactly.

The machines of :mod:`.lease` are deterministic functions of their events (time is passed
in), so the driver journals each event a machine accepted, in the order the machine took it,
before it carries out any of the actions that came out of it (a refused message changed
nothing and is not journaled). Events that come together are written in one transaction. After a
restart the driver feeds the journal back in order: the machines come back as they were, the
ledger actions that come out again are no-ops by their idempotency keys, and the messages that
come out are not sent again (a peer that missed one asks again, and gets the same answer).

A row is ``(seq, machine, event, body, at, mac)``: ``machine`` is ``seller`` or
``buyer:<job>``; ``body`` is msgpack of the event's arguments, messages in their wire
encoding (:func:`encode_message`); the HMAC under the store's key covers all columns, so a
row changed on disk is refused (:class:`~meshfed.errors.CorruptRecord`), never replayed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from ..codec import schema_of
from ..store import Store
from ..wire import Message, message_types

__all__ = ["Journal", "JournalEntry", "decode_message", "encode_message"]

_TABLE = "market_journal"
_COLUMNS = "seq, machine, event, body, at, mac"


def encode_message(message: Message) -> list[Any]:
    """``message`` as a journal keeps it: ``[type, fields]``."""
    return [message.TYPE, schema_of(type(message)).encode(message)]


def decode_message(encoded: list[Any]) -> Message:
    """The message :func:`encode_message` kept (decoded as strictly as from the wire)."""
    name, fields = encoded
    cls = message_types()[name]
    decoded: Message = schema_of(cls).decode(fields, cls.TYPE)
    return decoded


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One event: which machine took it, what it was, its arguments."""

    seq: int
    machine: str
    event: str
    body: dict[str, Any]


class Journal:
    """The journal in the node's store."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def append(self, events: Iterable[tuple[str, str, dict[str, Any]]]) -> None:
        """Keep ``events`` (machine, event, body), in order, durably: one transaction, so one
        fsync for a batch; they survive ``kill -9`` once this returns."""
        at = self._clock()
        with self._store.transaction() as connection:
            next_seq = f"SELECT COALESCE(MAX(seq), 0) + 1 FROM {_TABLE}"
            (seq,) = connection.execute(next_seq).fetchone()
            for machine, event, body in events:
                packed = msgpack.packb(body, use_bin_type=True)
                mac = self._store.seal(_TABLE, seq, machine, event, packed, at)
                connection.execute(
                    f"INSERT INTO {_TABLE} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, machine, event, packed, at, mac),
                )
                seq += 1

    def entries(self) -> list[JournalEntry]:
        """Every event, in the order it was taken.

        Raises:
            CorruptRecord: a row does not match its HMAC.
        """
        with self._store.snapshot() as connection:
            rows = connection.execute(f"SELECT {_COLUMNS} FROM {_TABLE} ORDER BY seq").fetchall()
        entries = []
        for seq, machine, event, packed, at, mac in rows:
            self._store.check_seal(
                mac, _TABLE, seq, machine, event, packed, at, what=f"journal entry {seq}"
            )
            body = msgpack.unpackb(packed, raw=False, strict_map_key=False)
            entries.append(JournalEntry(seq, machine, event, body))
        return entries
