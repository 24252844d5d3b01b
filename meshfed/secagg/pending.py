"""What arrives for a group run that has not started here yet, kept until it does.

A peer that finished training first sends its keys (or slices) before this node has begun the
run; the driver keeps them for a while and hands them over when the run starts. Anyone can
send anything under a context nobody knows, so the store is bounded three ways: in age
(``ttl_s``), in all (``max_items``, ``max_bytes``) and per sender (``per_sender`` items). When
it is full, the sender holding the most (items, or bytes for an array) gives up its oldest
entry to a sender holding less: a stranger flooding it, from one identity or many, only ever
pushes out its own entries and those of others holding as much, never those of a peer that
keeps within a fair share (SPEC 7b.6).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from ..errors import RemoteProtocolError
from ..identity import PeerId
from ..stats import RejectReason
from ..wire import Message
from .protocol import SliceKind

__all__ = ["Item", "PendingStore"]

Item = Message | tuple[SliceKind, npt.NDArray[Any]]
"""What arrives for a run: a message, or an array with its kind."""


@dataclass(frozen=True, slots=True)
class _Entry:
    at: float
    context: bytes
    sender: PeerId
    item: Item

    @property
    def nbytes(self) -> int:
        return self.item[1].nbytes if isinstance(self.item, tuple) else 0


class PendingStore:
    """Items for runs not started here, bounded in age, in all and per sender.

    Args:
        ttl_s: how long an item is kept.
        max_items, max_bytes: the whole store's bounds (items; array bytes).
        per_sender: the most items one sender may have kept.
    """

    def __init__(self, *, ttl_s: float, max_items: int, max_bytes: int, per_sender: int) -> None:
        self._ttl_s = ttl_s
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._per_sender = per_sender
        self._entries: list[_Entry] = []  # in arrival order
        self._items: Counter[PeerId] = Counter()
        self._bytes: Counter[PeerId] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, now: float, context: bytes, sender: PeerId, item: Item) -> None:
        """Keep ``item`` from ``sender`` for the run of ``context``, making room if the store
        is full and ``sender`` holds less than whoever holds the most.

        Raises:
            RemoteProtocolError: ``rate_limited`` if ``sender`` is at its own bound, or holds
                as much as anyone else in a full store; nothing changed.
        """
        self.forget_old(now)
        entry = _Entry(now, context, sender, item)
        if self._items[sender] >= self._per_sender:
            raise RemoteProtocolError(
                f"{self._per_sender} items kept already from this sender for runs not started here",
                reason=RejectReason.RATE_LIMITED,
            )
        if entry.nbytes > self._max_bytes:
            raise RemoteProtocolError(
                "an array larger than the whole store", reason=RejectReason.RATE_LIMITED
            )
        while len(self._entries) >= self._max_items:
            self._evict(sender, self._items, 1)
        while sum(self._bytes.values()) + entry.nbytes > self._max_bytes:
            self._evict(sender, self._bytes, entry.nbytes)
        self._entries.append(entry)
        self._items[sender] += 1
        self._bytes[sender] += entry.nbytes

    def _evict(self, sender: PeerId, held: Counter[PeerId], adding: int) -> None:
        """Drop the oldest entry of whoever holds the most by ``held`` (items or bytes), if it
        holds more than ``sender`` would after ``adding``."""
        heaviest, most = max(held.items(), key=lambda pair: pair[1], default=(sender, 0))
        if heaviest == sender or most <= held[sender] + adding:
            raise RemoteProtocolError(
                "too much kept for runs not started here", reason=RejectReason.RATE_LIMITED
            )
        index = next(i for i, entry in enumerate(self._entries) if entry.sender == heaviest)
        self._drop(self._entries.pop(index))

    def _drop(self, entry: _Entry) -> None:
        self._items[entry.sender] -= 1
        self._bytes[entry.sender] -= entry.nbytes
        if not self._items[entry.sender]:
            del self._items[entry.sender], self._bytes[entry.sender]

    def take(self, context: bytes) -> list[tuple[PeerId, Item]]:
        """Remove and return the items kept for ``context``, in arrival order."""
        taken = [entry for entry in self._entries if entry.context == context]
        if taken:
            self._entries = [entry for entry in self._entries if entry.context != context]
            for entry in taken:
                self._drop(entry)
        return [(entry.sender, entry.item) for entry in taken]

    def forget_old(self, now: float) -> None:
        """Drop what is older than ``ttl_s``."""
        horizon = now - self._ttl_s
        if self._entries and self._entries[0].at < horizon:
            stale = [entry for entry in self._entries if entry.at < horizon]
            self._entries = self._entries[len(stale) :]
            for entry in stale:
                self._drop(entry)
