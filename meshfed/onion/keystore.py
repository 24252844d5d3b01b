"""The onion layer's rows in the node's store: epoch secrets and replay tags (schema v7).

An epoch's secret is 32 random bytes, written once when the key is made and deleted when the
epoch retires (forward secrecy: a store copied later holds no key of a retired epoch; SQLite
may keep deleted bytes in free pages and the WAL until they are reused, see SPEC). Each row is
sealed under the store's key (:meth:`~meshfed.store.Store.seal`): a row changed on disk is
refused, not used.

A replay tag is written before its packet is acted on (forwarded, delivered, answered), so a
relay killed at any moment and restarted still drops a replay of every packet it acted on.
Tags go through a :class:`~meshfed.store.ProcessDurableWriter` (``synchronous = NORMAL``, no
fsync per packet): a tag survives the process's death (``kill -9``), not a power cut; SPEC 12
says what an attacker gains from the tags a power cut may lose. Tags carry no MAC: someone who
can write the file can delete rows anyway (SPEC 9, "what the store does not detect").

Every method does blocking I/O (call it in a worker thread) except ``add_tags(block=False)``,
which never waits and may run on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from ..errors import CorruptRecord, StoreError
from ..store import ProcessDurableWriter, Store
from .primitives import KEY_SIZE, REPLAY_TAG_SIZE

__all__ = ["OnionKeyStore"]

_KEYS = "onion_keys"
_ADD_TAG = "INSERT OR IGNORE INTO onion_replay (epoch, tag) VALUES (?, ?)"


class OnionKeyStore:
    """Onion key secrets and replay tags of one node, in its store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._tag_writer: ProcessDurableWriter | None = None

    def open(self) -> None:
        """Open the connection replay tags are written through (before :meth:`add_tags`)."""
        if self._tag_writer is None:
            self._tag_writer = self.store.process_durable_writer()

    def close(self) -> None:
        """Close the tag connection (the store itself stays open)."""
        if self._tag_writer is not None:
            self._tag_writer.close()
            self._tag_writer = None

    def secrets(self) -> dict[int, bytes]:
        """Every stored epoch secret by epoch.

        Raises:
            CorruptRecord: a row does not match its seal or has the wrong size.
        """
        with self.store.snapshot() as connection:
            rows = connection.execute(
                f"SELECT epoch, secret, created, mac FROM {_KEYS} ORDER BY epoch"
            ).fetchall()
        found = {}
        for epoch, secret, created, mac in rows:
            what = f"onion key of epoch {epoch}"
            self.store.check_seal(mac, _KEYS, epoch, secret, created, what=what)
            if len(secret) != KEY_SIZE:
                raise CorruptRecord(f"{what} has {len(secret)} bytes")
            found[epoch] = bytes(secret)
        return found

    def add_secret(self, epoch: int, secret: bytes) -> None:
        """Keep ``secret`` as the key of ``epoch`` (once per epoch)."""
        created = time.time()
        mac = self.store.seal(_KEYS, epoch, secret, created)
        with self.store.transaction() as connection:
            connection.execute(
                f"INSERT INTO {_KEYS} (epoch, secret, created, mac) VALUES (?, ?, ?, ?)",
                (epoch, secret, created, mac),
            )

    def add_tags(self, tags: Iterable[tuple[int, bytes]], *, block: bool = True) -> bool:
        """Record ``(epoch, replay tag)`` pairs in one transaction (a tag held already is
        fine: the write is idempotent); True once they would survive ``kill -9``. With
        ``block=False``, False at once (nothing written) if the file is busy with another
        write: then call again with ``block=True`` from a worker thread.

        Raises:
            StoreError: not opened (:meth:`open`), or SQLite failed.
        """
        if self._tag_writer is None:
            raise StoreError("the onion key store's tag writer is not open")
        return self._tag_writer.write(_ADD_TAG, list(tags), block=block)

    def checkpoint(self) -> None:
        """Move written tags from the WAL into the file (the tag connection never does):
        call every so many tags, from a worker thread."""
        if self._tag_writer is not None:
            self._tag_writer.checkpoint()

    def tags(self) -> dict[int, list[bytes]]:
        """Every stored replay tag, by epoch (tags of the wrong size are skipped)."""
        with self.store.snapshot() as connection:
            rows = connection.execute("SELECT epoch, tag FROM onion_replay").fetchall()
        found: dict[int, list[bytes]] = {}
        for epoch, tag in rows:
            if len(tag) == REPLAY_TAG_SIZE:
                found.setdefault(epoch, []).append(bytes(tag))
        return found

    def retire(self, epochs: Iterable[int]) -> None:
        """Erase the secrets and forget the tags of ``epochs``."""
        gone = [(epoch,) for epoch in epochs]
        if not gone:
            return
        with self.store.transaction() as connection:
            connection.executemany(f"DELETE FROM {_KEYS} WHERE epoch = ?", gone)
            connection.executemany("DELETE FROM onion_replay WHERE epoch = ?", gone)
