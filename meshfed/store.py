"""The node's persistent state: one SQLite file (jobs, their rounds, checkpoints, privacy,
the market's books, the audit log).

Theory of operation. One :class:`Store` is one connection to one file, shared by the node's
tasks through worker threads (``await trio.to_thread.run_sync(store.save_round, ...)``): every
method takes the store's lock, so calls from different threads run one at a time, and none of
them should run on the trio loop once it moves a model. Writes are single transactions
(``BEGIN IMMEDIATE`` ... ``COMMIT``), so a round's metrics, its checkpoint, the pruning of old
checkpoints and the spent privacy budget land together or not at all.

Durability. The file is in WAL mode with ``synchronous=FULL``: ``COMMIT`` returns only after
the WAL is fsynced, so a method that returned survives ``kill -9`` and power loss alike
(``NORMAL`` would survive ``kill -9`` but may lose the last commits on power loss; one fsync a
round costs nothing next to a round). A process killed mid-transaction leaves a WAL tail that
SQLite discards on the next open. Other processes (a dashboard, a test) may read the file with
``Store.open(path, readonly=True)`` while the node writes: WAL readers see the last commit.

Integrity. Every checkpoint row and every privacy row carries an HMAC-SHA256 of all its
columns under the store's key (``_mac`` below); a row that does not match raises
:class:`~meshfed.errors.CorruptRecord` and is never loaded. The key is the node's (derived from
its identity, :meth:`~meshfed.identity.Identity.derive_key`), so someone who can write the file
but not read the identity cannot forge a row; a store opened under another key is refused.
Other modules keep sealed tables here the same way (the market's ledger, leases and
reputation): :meth:`Store.seal` / :meth:`Store.check_seal` and one write transaction at a time
(:meth:`Store.transaction`).
Without a key (tools, tests) the all-zero key is used: that detects corruption, not forgery.
Deleting rows or putting back an older copy of the file is not detected: the file is created
mode 0600 (a looser mode is fixed at open) in a 0700 directory for that.
Model vectors are raw little-endian float32 bytes; strategy state is msgpack with numpy arrays
as an extension type (dtype, shape, raw bytes); nothing is ever pickled.

Schema. ``PRAGMA user_version`` is the number of migrations applied; :data:`MIGRATIONS` are
applied in order at open, each in its own transaction. A file from a newer meshfed (a higher
version than this code knows) is refused, not guessed at.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from .audit import AuditKind, append_rows
from .codec import ContainerBudget
from .errors import CorruptRecord, StoreError

__all__ = [
    "MIGRATIONS",
    "Checkpoint",
    "DatasetRecord",
    "JobRecord",
    "JobState",
    "ProcessDurableWriter",
    "RoundRecord",
    "Store",
    "pack_state",
    "unpack_state",
]

log = logging.getLogger(__name__)

#: Schema migrations, in order: ``MIGRATIONS[i]`` takes a file from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            updated REAL NOT NULL
        ) STRICT""",
        """CREATE TABLE rounds (
            job TEXT NOT NULL REFERENCES jobs(id),
            round INTEGER NOT NULL,
            metrics TEXT NOT NULL,
            recorded REAL NOT NULL,
            PRIMARY KEY (job, round)
        ) STRICT""",
        """CREATE TABLE checkpoints (
            job TEXT NOT NULL REFERENCES jobs(id),
            round INTEGER NOT NULL,
            score REAL NOT NULL,
            dtype TEXT NOT NULL,
            length INTEGER NOT NULL,
            model BLOB NOT NULL,
            strategy BLOB NOT NULL,
            privacy TEXT,
            metrics TEXT NOT NULL,
            sha256 BLOB NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (job, round)
        ) STRICT""",
        """CREATE TABLE privacy (
            job TEXT PRIMARY KEY REFERENCES jobs(id),
            state TEXT NOT NULL,
            updated REAL NOT NULL
        ) STRICT""",
    ),
    (
        # v2: rows are sealed with an HMAC under the store's key (``Store._seal_rows`` re-seals
        # what v1 holds, checking each checkpoint's plain SHA-256 first)
        "ALTER TABLE checkpoints RENAME COLUMN sha256 TO mac",
        "ALTER TABLE privacy ADD COLUMN mac BLOB NOT NULL DEFAULT x''",
        """CREATE TABLE integrity (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            key_check BLOB NOT NULL
        ) STRICT""",
    ),
    (
        # the market's books (meshfed/market/ledger.py, leasebook.py, reputation.py); every
        # row sealed under the store's key (Store.seal), ledger entries chained by their MACs
        """CREATE TABLE ledger_entries (
            seq INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            job TEXT NOT NULL,
            counterpart BLOB,
            unit INTEGER,
            amount INTEGER NOT NULL,
            postings BLOB NOT NULL,
            memo TEXT NOT NULL,
            evidence BLOB NOT NULL,
            at REAL NOT NULL,
            prev BLOB NOT NULL,
            mac BLOB NOT NULL
        ) STRICT""",
        "CREATE INDEX ledger_entries_by_job ON ledger_entries (job, seq)",
        """CREATE TABLE ledger_balances (
            account TEXT PRIMARY KEY,
            balance INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            mac BLOB NOT NULL
        ) STRICT""",
        """CREATE TABLE market_leases (
            job TEXT NOT NULL,
            role TEXT NOT NULL,
            counterpart BLOB NOT NULL,
            price INTEGER NOT NULL,
            units INTEGER NOT NULL,
            state TEXT NOT NULL,
            award BLOB NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            mac BLOB NOT NULL,
            PRIMARY KEY (job, role, counterpart)
        ) STRICT""",
        """CREATE TABLE market_outbox (
            seq INTEGER PRIMARY KEY,
            job TEXT NOT NULL,
            counterpart BLOB NOT NULL,
            unit INTEGER NOT NULL,
            message BLOB NOT NULL,
            created REAL NOT NULL,
            mac BLOB NOT NULL,
            UNIQUE (job, counterpart, unit)
        ) STRICT""",
        "CREATE INDEX market_outbox_by_counterpart ON market_outbox (counterpart, seq)",
        """CREATE TABLE market_clearings (
            seq INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            tier TEXT NOT NULL,
            price INTEGER NOT NULL,
            at REAL NOT NULL,
            mac BLOB NOT NULL
        ) STRICT""",
        "CREATE INDEX market_clearings_by_kind ON market_clearings (kind, tier, at)",
        """CREATE TABLE market_reputation (
            peer BLOB NOT NULL,
            job TEXT NOT NULL,
            event TEXT NOT NULL,
            at REAL NOT NULL,
            mac BLOB NOT NULL,
            PRIMARY KEY (peer, job, event)
        ) STRICT""",
        """CREATE TABLE market_reputation_peers (
            peer BLOB PRIMARY KEY,
            half_life REAL NOT NULL,
            delivered INTEGER NOT NULL,
            failed INTEGER NOT NULL,
            late INTEGER NOT NULL,
            wrong INTEGER NOT NULL,
            good REAL NOT NULL,
            bad REAL NOT NULL,
            at REAL NOT NULL,
            mac BLOB NOT NULL
        ) STRICT""",
    ),
    (
        # v4: the node's registered data sets (meshfed/data/registry.py), each row sealed
        """CREATE TABLE datasets (
            name TEXT PRIMARY KEY,
            path TEXT NOT NULL,
            format TEXT NOT NULL,
            options TEXT NOT NULL,
            digest BLOB NOT NULL,
            examples INTEGER NOT NULL,
            feature_shape TEXT NOT NULL,
            classes INTEGER NOT NULL,
            label_digest BLOB NOT NULL,
            registered REAL NOT NULL,
            mac BLOB NOT NULL
        ) STRICT""",
    ),
    (
        # v5: the market's write-ahead journal of lease-machine events (market/journal.py)
        """CREATE TABLE market_journal (
            seq INTEGER PRIMARY KEY,
            machine TEXT NOT NULL,
            event TEXT NOT NULL,
            body BLOB NOT NULL,
            at REAL NOT NULL,
            mac BLOB NOT NULL
        ) STRICT""",
    ),
    (
        # v6: the audit log (meshfed/audit.py): append-only, each row sealed and chained to the
        # one before by its MAC; SQLite itself refuses to change or delete a row
        """CREATE TABLE audit_log (
            seq INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            fields TEXT NOT NULL,
            prev BLOB NOT NULL,
            mac BLOB NOT NULL
        ) STRICT""",
        "CREATE INDEX audit_log_by_kind ON audit_log (kind, seq)",
        """CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
        """CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    ),
    (
        # v7: onion routing (meshfed/onion/keystore.py): each key epoch's random secret, sealed,
        # deleted at the epoch's retirement; the replay tags of the packets processed per epoch,
        # written before the packet is acted on
        """CREATE TABLE onion_keys (
            epoch INTEGER PRIMARY KEY,
            secret BLOB NOT NULL,
            created REAL NOT NULL,
            mac BLOB NOT NULL
        ) STRICT""",
        """CREATE TABLE onion_replay (
            epoch INTEGER NOT NULL,
            tag BLOB NOT NULL,
            PRIMARY KEY (epoch, tag)
        ) STRICT, WITHOUT ROWID""",
    ),
)

_MODEL_DTYPE = "<f4"
_WAL_LIMIT_BYTES = 64 * 1024 * 1024
_ARRAY_DTYPES = frozenset({"<f4", "<f8", "<i4", "<i8", "|b1"})
_NDARRAY_EXT = 1
#: arrays and maps a strategy state may hold (a state from a peer is parsed under it)
MAX_STATE_CONTAINERS = 4096
_NO_KEY = bytes(32)
_KEY_CHECK = b"meshfed-store-key-check-v1"


class JobState(enum.Enum):
    """Where a job stands on this node."""

    #: rounds are running (or the node stopped mid-job: it resumes from the last checkpoint)
    RUNNING = "running"
    #: stopped early: the target accuracy was reached, or accuracy stopped improving
    CONVERGED = "converged"
    #: every round ran
    FINISHED = "finished"
    #: stopped by an error (the note says which)
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as the store holds it: its spec (JSON), state, and a note on the last event."""

    job_id: str
    spec: str
    state: JobState
    note: str
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round of a job: its metrics (accuracy, loss, epsilon, bytes, seconds ...)."""

    job_id: str
    round: int
    metrics: dict[str, Any]


@dataclass(frozen=True, kw_only=True, eq=False)
class Checkpoint:
    """The state a job resumes from after round :attr:`round`.

    Attributes:
        job_id, round: whose state, after which round.
        model: the flat float32 model vector.
        score: the validation accuracy of ``model`` (the best checkpoint has the highest).
        metrics: the round's metrics (as in the ``rounds`` table).
        strategy: the strategy's ``state_dict()`` (numbers, strings, numpy arrays, None).
        privacy: the privacy accountant's ``state_dict()`` after the round, if any.
    """

    job_id: str
    round: int
    model: npt.NDArray[np.float32]
    score: float
    metrics: dict[str, Any] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetRecord:
    """A data set this node registered: where it is, how to read it, and what it holds.

    Attributes:
        name: what jobs call it.
        path: the file (absolute); arrays registered from memory are saved under the node's
            data directory first.
        format: ``npz`` or ``csv``.
        options: how to read it (``{"label_column": ...}`` for CSV).
        digest: SHA-256 of the file when it was registered (a changed file is refused).
        examples, feature_shape, classes, label_digest: what it holds (its offer).
        registered: Unix time of registration.
    """

    name: str
    path: str
    format: str
    options: dict[str, Any]
    digest: bytes
    examples: int
    feature_shape: tuple[int, ...]
    classes: int
    label_digest: bytes
    registered: float


class Store:
    """The node's store. Open with :meth:`open`; close with :meth:`close` (or ``with``)."""

    def __init__(
        self, path: Path, connection: sqlite3.Connection, *, readonly: bool, key: bytes
    ) -> None:
        self.path = path
        self.readonly = readonly
        self._key = key
        self._connection: sqlite3.Connection | None = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | str, *, key: bytes | None = None, readonly: bool = False) -> Store:
        """Open (creating and migrating if needed) the store at ``path``.

        Args:
            path: the SQLite file; its directory is created (mode 0700) if missing, the file
                itself mode 0600 (an existing file readable by others is set to 0600).
            key: the 32-byte key rows are sealed with (a node passes its identity's); ``None``:
                the all-zero key, which detects corruption but not forgery.
            readonly: read another process's store without writing (no migrations).

        Raises:
            StoreError: not a SQLite file, a symlink, a schema newer than this code, a store
                sealed under another key, or a read-only open of a missing or out-of-date file.
        """
        path = Path(path)
        key = _NO_KEY if key is None else key
        if len(key) != 32:
            raise StoreError(f"a store key has 32 bytes, not {len(key)}")
        try:
            if readonly:
                connection = sqlite3.connect(
                    f"{path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                _make_private(path, create=True)
                for suffix in ("-wal", "-shm"):
                    _make_private(path.with_name(path.name + suffix), create=False)
                connection = sqlite3.connect(
                    path, isolation_level=None, check_same_thread=False, timeout=10.0
                )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None
        store = cls(path, connection, readonly=readonly, key=key)
        try:
            store._prepare(connection)
        except BaseException:
            connection.close()
            raise
        return store

    def _prepare(self, connection: sqlite3.Connection) -> None:
        try:
            connection.execute("PRAGMA foreign_keys = ON")
            if self.readonly:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version != len(MIGRATIONS):
                    raise StoreError(
                        f"store {self.path} has schema v{version}, this meshfed reads "
                        f"v{len(MIGRATIONS)}: open it read-write once to migrate it"
                    )
                self._check_key(connection)
                return
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"store {self.path}: cannot use WAL mode (got {mode!r})")
            connection.execute("PRAGMA synchronous = FULL")
            # a checkpoint may be large: after it is copied into the file, shrink the WAL back
            connection.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT_BYTES}")
            self._migrate(connection)
            self._check_key(connection)
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path} is unusable: {exc}") from None

    def _migrate(self, connection: sqlite3.Connection) -> None:
        while True:
            connection.execute("BEGIN IMMEDIATE")
            try:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version > len(MIGRATIONS):
                    raise StoreError(
                        f"store {self.path} has schema v{version}, newer than this meshfed "
                        f"(v{len(MIGRATIONS)}): upgrade meshfed or use another data_dir"
                    )
                if version == len(MIGRATIONS):
                    connection.execute("ROLLBACK")
                    return
                for statement in MIGRATIONS[version]:
                    connection.execute(statement)
                after = _AFTER_MIGRATION.get(version + 1)
                if after is not None:
                    after(self, connection)
                connection.execute(f"PRAGMA user_version = {version + 1}")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _check_key(self, connection: sqlite3.Connection) -> None:
        (key_check,) = connection.execute("SELECT key_check FROM integrity").fetchone()
        if not hmac.compare_digest(key_check, self._seal(_KEY_CHECK)):
            raise StoreError(
                f"store {self.path} was sealed under another key: it belongs to another "
                "identity (or was replaced); use that node's data_dir, or another store_file"
            )

    def _seal(self, message: bytes) -> bytes:
        return hmac.digest(self._key, message, "sha256")

    def _seal_rows(self, connection: sqlite3.Connection) -> None:
        """Migration to v2: seal every row under this store's key. A checkpoint whose plain
        SHA-256 (v1) does not match is left unsealed, so it stays corrupt."""
        rows = connection.execute("SELECT * FROM checkpoints")
        names = [column[0] for column in rows.description]
        for values in rows.fetchall():
            row = dict(zip(names, values, strict=True))
            if hashlib.sha256(_checkpoint_message(row)).digest() == row["mac"]:
                connection.execute(
                    "UPDATE checkpoints SET mac = ? WHERE job = ? AND round = ?",
                    (self._checkpoint_mac(row), row["job"], row["round"]),
                )
        for job, state in connection.execute("SELECT job, state FROM privacy").fetchall():
            mac = self._privacy_mac(job, state)
            connection.execute("UPDATE privacy SET mac = ? WHERE job = ?", (mac, job))
        connection.execute(
            "INSERT INTO integrity (id, key_check) VALUES (1, ?)", (self._seal(_KEY_CHECK),)
        )

    def _checkpoint_mac(self, row: dict[str, Any]) -> bytes:
        return self._seal(_checkpoint_message(row))

    def _privacy_mac(self, job: str, state: str) -> bytes:
        return self.seal("privacy", job, state)

    # -- sealed tables of other modules (the market's books) ----------------------------------

    def seal(self, table: str, *fields: Any) -> bytes:
        """The HMAC of a row of ``table``: HMAC-SHA256 under the store's key of
        ``msgpack([table, *fields])`` (fields: ints, floats, strings, bytes, None, lists)."""
        return self._seal(msgpack.packb([table, *fields], use_bin_type=True))

    def check_seal(self, mac: bytes, table: str, *fields: Any, what: str) -> None:
        """Check a row's ``mac`` against :meth:`seal` of its fields.

        Raises:
            CorruptRecord: it does not match (``what`` names the row in the message).
        """
        if not hmac.compare_digest(mac, self.seal(table, *fields)):
            raise CorruptRecord(f"{what} does not match its HMAC: the row is corrupt or forged")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the store's connection (``BEGIN IMMEDIATE`` ... ``COMMIT``,
        rolled back if the block raises), under the store's lock, for a module that keeps its
        own tables here: when the block returns, what it wrote survives ``kill -9``.

        Raises:
            StoreError: the store is closed or read-only, or SQLite failed.
        """
        with self._write() as connection:
            yield connection

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query in the block sees the same commit (also in a
        read-only store while another process writes).

        Raises:
            StoreError: the store is closed, or SQLite failed.
        """
        with self._read() as connection:
            connection.execute("BEGIN")
            try:
                yield connection
            finally:
                if connection.in_transaction:
                    connection.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        """The file's ``PRAGMA user_version``."""
        with self._read() as connection:
            version: int = connection.execute("PRAGMA user_version").fetchone()[0]
            return version

    def close(self) -> None:
        """Close the connection (waiting for a call in progress). Later calls raise."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def process_durable_writer(self) -> ProcessDurableWriter:
        """A second connection to this store's file for small, frequent writes that must
        survive the process's death but may be lost to a power cut (see
        :class:`ProcessDurableWriter`). Close it before the store.

        Raises:
            StoreError: the store is read-only, or the file cannot be opened.
        """
        if self.readonly:
            raise StoreError(f"store {self.path} was opened read-only")
        return ProcessDurableWriter(self.path)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._connection is None:
                raise StoreError(f"store {self.path} is closed")
            try:
                yield self._connection
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction: everything in the block commits together, or nothing does."""
        if self.readonly:
            raise StoreError(f"store {self.path} was opened read-only")
        with self._read() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    # -- jobs ----------------------------------------------------------------------------------

    def put_job(self, job_id: str, spec: str) -> JobRecord:
        """Record job ``job_id`` with its spec (JSON) as running, unless it is already known;
        returns the stored record (whose spec may differ from ``spec``: the caller checks)."""
        now = time.time()
        with self._write() as connection:
            connection.execute(
                "INSERT INTO jobs (id, spec, state, created, updated) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                (job_id, spec, JobState.RUNNING.value, now, now),
            )
        record = self.job(job_id)
        assert record is not None  # just written, and jobs are never deleted
        return record

    def set_job_state(self, job_id: str, state: JobState, note: str = "") -> None:
        """Set a job's state and note.

        Raises:
            StoreError: no such job.
        """
        with self._write() as connection:
            changed = connection.execute(
                "UPDATE jobs SET state = ?, note = ?, updated = ? WHERE id = ?",
                (state.value, note, time.time(), job_id),
            ).rowcount
            if not changed:
                raise StoreError(f"store {self.path} has no job {job_id!r}")

    def job(self, job_id: str) -> JobRecord | None:
        """The job ``job_id``, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT id, spec, state, note, created, updated FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        return None if row is None else _job_record(row)

    def jobs(self) -> list[JobRecord]:
        """Every job, oldest first."""
        with self._read() as connection:
            rows = connection.execute(
                "SELECT id, spec, state, note, created, updated FROM jobs ORDER BY created, id"
            ).fetchall()
        return [_job_record(row) for row in rows]

    # -- rounds and checkpoints ----------------------------------------------------------------

    def save_round(
        self, checkpoint: Checkpoint, *, privacy: dict[str, Any] | None = None, keep: int = 3
    ) -> None:
        """Record round ``checkpoint.round`` in one transaction: its metrics, its checkpoint,
        the pruning of the job's checkpoints to the last ``keep`` plus the best (highest score,
        earliest on ties), and, if given, the job's spent privacy (``privacy``, which unlike
        the checkpoint is never rolled back).

        Raises:
            StoreError: an unknown job, a round already recorded, or ``keep < 1``.
        """
        if keep < 1:
            raise StoreError("keep must be at least 1 (the checkpoint to resume from)")
        row = _checkpoint_row(checkpoint)
        row["mac"] = self._checkpoint_mac(row)
        job, number = checkpoint.job_id, checkpoint.round
        now = time.time()
        with self._write() as connection:
            connection.execute(
                "INSERT INTO rounds (job, round, metrics, recorded) VALUES (?, ?, ?, ?)",
                (job, number, row["metrics"], now),
            )
            connection.execute(
                "INSERT INTO checkpoints (job, round, score, dtype, length, model, strategy, "
                "privacy, metrics, mac, created) VALUES (:job, :round, :score, :dtype, "
                ":length, :model, :strategy, :privacy, :metrics, :mac, :created)",
                {**row, "created": now},
            )
            connection.execute(
                "DELETE FROM checkpoints WHERE job = :job "
                "AND round NOT IN (SELECT round FROM checkpoints WHERE job = :job "
                "ORDER BY round DESC LIMIT :keep) "
                "AND round != (SELECT round FROM checkpoints WHERE job = :job "
                "ORDER BY score DESC, round ASC LIMIT 1)",
                {"job": job, "keep": keep},
            )
            if privacy is not None:
                self._put_privacy(connection, job, privacy, now)
            connection.execute("UPDATE jobs SET updated = ? WHERE id = ?", (now, job))

    def rounds(self, job_id: str) -> list[RoundRecord]:
        """Every recorded round of ``job_id``, in order."""
        with self._read() as connection:
            rows = connection.execute(
                "SELECT round, metrics FROM rounds WHERE job = ? ORDER BY round", (job_id,)
            ).fetchall()
        return [RoundRecord(job_id, number, json.loads(metrics)) for number, metrics in rows]

    def checkpoint_rounds(self, job_id: str) -> list[int]:
        """The rounds of ``job_id`` that have a checkpoint, in order."""
        with self._read() as connection:
            rows = connection.execute(
                "SELECT round FROM checkpoints WHERE job = ? ORDER BY round", (job_id,)
            ).fetchall()
        return [number for (number,) in rows]

    def load_checkpoint(self, job_id: str, round: int | None = None) -> Checkpoint | None:
        """The checkpoint of ``job_id`` after ``round`` (None: the latest), or None if there is
        none.

        Raises:
            CorruptRecord: the row does not match its HMAC (or cannot be decoded).
        """
        query = "SELECT * FROM checkpoints WHERE job = ? "
        if round is None:
            rows = self._select(query + "ORDER BY round DESC LIMIT 1", (job_id,))
        else:
            rows = self._select(query + "AND round = ?", (job_id, round))
        return self._checkpoint(rows[0]) if rows else None

    def best_checkpoint(self, job_id: str) -> Checkpoint | None:
        """The checkpoint of ``job_id`` with the highest score (the earliest on ties).

        Raises:
            CorruptRecord: the row does not match its HMAC.
        """
        rows = self._select(
            "SELECT * FROM checkpoints WHERE job = ? ORDER BY score DESC, round ASC LIMIT 1",
            (job_id,),
        )
        return self._checkpoint(rows[0]) if rows else None

    def _checkpoint(self, row: dict[str, Any]) -> Checkpoint:
        return _checkpoint(row, self._checkpoint_mac(row))

    def _select(self, query: str, parameters: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._read() as connection:
            cursor = connection.execute(query, parameters)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _put_privacy(
        self, connection: sqlite3.Connection, job: str, state: dict[str, Any], now: float
    ) -> None:
        """Write ``job``'s privacy row, sealed (inside the caller's transaction)."""
        text = json.dumps(state)
        connection.execute(
            "INSERT INTO privacy (job, state, updated, mac) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (job) DO UPDATE SET state = excluded.state, "
            "updated = excluded.updated, mac = excluded.mac",
            (job, text, now, self._privacy_mac(job, text)),
        )

    def privacy(self, job_id: str) -> dict[str, Any] | None:
        """The privacy accountant state last saved for ``job_id``, or None.

        Raises:
            CorruptRecord: the row does not match its HMAC (someone changed the budget).
        """
        with self._read() as connection:
            row = connection.execute("SELECT state, mac FROM privacy WHERE job = ?", (job_id,))
            found = row.fetchone()
        if found is None:
            return None
        state, mac = found
        if not hmac.compare_digest(mac, self._privacy_mac(job_id, state)):
            raise CorruptRecord(f"privacy of job {job_id!r} does not match its HMAC")
        return dict(json.loads(state))

    def commit_privacy(self, job_id: str, state: dict[str, Any]) -> None:
        """Commit ``job_id``'s spent privacy now, before the data it charges for is used
        (write-ahead: a crash after the release finds the charge already durable).

        Raises:
            StoreError: ``state`` records fewer events than the stored one (spent privacy is
                never rolled back), or the job is unknown.
        """
        with self._write() as connection:
            row = connection.execute("SELECT state FROM privacy WHERE job = ?", (job_id,))
            found = row.fetchone()
            if found is not None and len(json.loads(found[0])["events"]) > len(state["events"]):
                raise StoreError(f"job {job_id!r}: spent privacy is never rolled back")
            now = time.time()
            self._put_privacy(connection, job_id, state, now)
            rounds = state.get("rounds") or [None]
            spent = {"job": job_id, "round": rounds[-1], "events": len(state["events"])}
            append_rows(self, connection, [(now, AuditKind.PRIVACY_SPENT, spent)])

    # -- data sets ---------------------------------------------------------------------------

    def put_dataset(self, record: DatasetRecord) -> None:
        """Record (or replace) the data set ``record.name``, sealed."""
        row = _dataset_row(record)
        with self._write() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO datasets (name, path, format, options, digest, "
                "examples, feature_shape, classes, label_digest, registered, mac) VALUES "
                "(:name, :path, :format, :options, :digest, :examples, :feature_shape, "
                ":classes, :label_digest, :registered, :mac)",
                {**row, "mac": self._seal(_dataset_message(row))},
            )

    def dataset(self, name: str) -> DatasetRecord | None:
        """The data set registered as ``name``, or None.

        Raises:
            CorruptRecord: the row does not match its HMAC.
        """
        rows = self._select("SELECT * FROM datasets WHERE name = ?", (name,))
        return self._dataset(rows[0]) if rows else None

    def datasets(self) -> list[DatasetRecord]:
        """Every registered data set, by name.

        Raises:
            CorruptRecord: a row does not match its HMAC.
        """
        rows = self._select("SELECT * FROM datasets ORDER BY name", ())
        return [self._dataset(row) for row in rows]

    def remove_dataset(self, name: str) -> bool:
        """Forget the data set ``name``; returns whether it was registered."""
        with self._write() as connection:
            removed: int = connection.execute(
                "DELETE FROM datasets WHERE name = ?", (name,)
            ).rowcount
        return removed > 0

    def _dataset(self, row: dict[str, Any]) -> DatasetRecord:
        if not hmac.compare_digest(row["mac"], self._seal(_dataset_message(row))):
            raise CorruptRecord(f"data set {row['name']!r} does not match its HMAC")
        fields = {name: row[name] for name in _DATASET_COLUMNS}
        fields["options"] = json.loads(row["options"])
        fields["feature_shape"] = tuple(json.loads(row["feature_shape"]))
        return DatasetRecord(**fields)

    def verify(self) -> list[str]:
        """Check the whole file (SQLite's integrity check, then every checkpoint's, privacy
        row's and data set's HMAC); returns the problems found (empty: all is well)."""
        with self._read() as connection:
            problems = [
                f"sqlite: {message}"
                for (message,) in connection.execute("PRAGMA integrity_check").fetchall()
                if message != "ok"
            ]
            keys = connection.execute("SELECT job, round FROM checkpoints").fetchall()
            jobs = connection.execute("SELECT job FROM privacy").fetchall()
            names = [name for (name,) in connection.execute("SELECT name FROM datasets")]
        for job, number in keys:
            try:
                self.load_checkpoint(job, number)
            except CorruptRecord as exc:
                problems.append(str(exc))
        for (job,) in jobs:
            try:
                self.privacy(job)
            except CorruptRecord as exc:
                problems.append(str(exc))
        for name in names:
            try:
                self.dataset(name)
            except CorruptRecord as exc:
                problems.append(str(exc))
        return problems


_AFTER_MIGRATION: dict[int, Callable[[Store, sqlite3.Connection], None]] = {
    2: Store._seal_rows,
}


class ProcessDurableWriter:
    """Writes that survive ``kill -9`` but not a power cut: its own connection to the store's
    file with ``PRAGMA synchronous = NORMAL``.

    In WAL mode a ``NORMAL`` commit appends its pages to the WAL and returns without an fsync:
    once :meth:`write` returned, the rows are in the operating system's page cache, which any
    later reader (a restarted process) sees, and which the kernel writes out on its own; only
    losing the machine (power, kernel crash) before that may drop the last moments' commits.
    This connection never checkpoints on its own (``wal_autocheckpoint = 0``, a checkpoint
    fsyncs): call :meth:`checkpoint` from a worker thread every so many writes.

    Thread safety: one lock per writer; ``write(block=False)`` never waits, neither for the
    lock nor for another connection's write transaction, so it may run on an event loop.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._blocking = False  # the connection's busy timeout: 0 (False) or 10 s (True)
        try:
            self._connection: sqlite3.Connection | None = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=0.0
            )
            self._connection.execute("PRAGMA synchronous = NORMAL")
            self._connection.execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None

    def write(self, statement: str, rows: list[tuple[Any, ...]], *, block: bool) -> bool:
        """Run ``statement`` for each of ``rows`` in one transaction, committed when this
        returns True. With ``block=False``, returns False at once (nothing written) when this
        writer or another connection is in the middle of a write; with ``block=True`` it
        waits for them (up to 10 s, then :class:`StoreError`): call that from a worker thread.

        Raises:
            StoreError: the writer is closed, or SQLite failed.
        """
        if not self._lock.acquire(blocking=block):
            return False
        try:
            connection = self._connection
            if connection is None:
                raise StoreError(f"store {self.path}: writer is closed")
            try:
                if self._blocking != block:
                    connection.execute(f"PRAGMA busy_timeout = {10_000 if block else 0}")
                    self._blocking = block
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if not block and exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                    return False
                raise StoreError(f"store {self.path}: {exc}") from None
            try:
                connection.executemany(statement, rows)
                connection.execute("COMMIT")
            except sqlite3.Error as exc:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise StoreError(f"store {self.path}: {exc}") from None
            return True
        finally:
            self._lock.release()

    def checkpoint(self) -> None:
        """Copy the WAL's committed pages into the file (``PASSIVE``: writers go on), on a
        connection of its own so that :meth:`write` is not held up. Blocking I/O (fsyncs)."""
        try:
            with closing(sqlite3.connect(self.path, timeout=10.0)) as connection:
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: checkpoint failed: {exc}") from None

    def close(self) -> None:
        """Close the connection (waiting for a write in progress). Later writes raise."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


def _job_record(row: tuple[Any, ...]) -> JobRecord:
    job_id, spec, state, note, created, updated = row
    return JobRecord(job_id, spec, JobState(state), note, created, updated)


def _checkpoint_message(row: dict[str, Any]) -> bytes:
    """What a checkpoint row's MAC covers: ``msgpack([job, round, score, dtype, length,
    metrics, strategy, privacy])`` followed by the model bytes (v1 kept its plain SHA-256)."""
    fields = [row[k] for k in ("job", "round", "score", "dtype", "length", "metrics")]
    header = msgpack.packb([*fields, row["strategy"], row["privacy"]], use_bin_type=True)
    return bytes(header + row["model"])


def _dataset_row(record: DatasetRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "path": record.path,
        "format": record.format,
        "options": json.dumps(record.options, sort_keys=True),
        "digest": record.digest,
        "examples": record.examples,
        "feature_shape": json.dumps(list(record.feature_shape)),
        "classes": record.classes,
        "label_digest": record.label_digest,
        "registered": record.registered,
    }


def _dataset_message(row: dict[str, Any]) -> bytes:
    """What a data set row's MAC covers: ``msgpack(["dataset", every column but the MAC])``."""
    columns = [row[k] for k in _DATASET_COLUMNS]
    return bytes(msgpack.packb(["dataset", *columns], use_bin_type=True))


_DATASET_COLUMNS = (
    "name", "path", "format", "options", "digest", "examples", "feature_shape", "classes",
    "label_digest", "registered",
)  # fmt: skip


def _make_private(path: Path, *, create: bool) -> None:
    """Make ``path`` a regular file only its owner can read and write (mode 0600), creating it
    if ``create``; a looser mode is fixed (and logged).

    Raises:
        StoreError: ``path`` is a symlink or cannot be opened.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return
    except OSError as exc:  # ELOOP: a symlink
        raise StoreError(f"cannot open store file {path} as a regular file: {exc}") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("store file mode fixed", extra={"path": str(path), "was": f"{mode:o}"})
    finally:
        os.close(fd)


def _checkpoint_row(checkpoint: Checkpoint) -> dict[str, Any]:
    model = np.ascontiguousarray(checkpoint.model, dtype=_MODEL_DTYPE)
    if model.ndim != 1:
        raise StoreError(f"a checkpoint's model is a flat vector, not shape {model.shape}")
    row: dict[str, Any] = {
        "job": checkpoint.job_id,
        "round": checkpoint.round,
        "score": float(checkpoint.score),
        "dtype": _MODEL_DTYPE,
        "length": len(model),
        "model": model.tobytes(),
        "strategy": pack_state(checkpoint.strategy),
        "privacy": None if checkpoint.privacy is None else json.dumps(checkpoint.privacy),
        "metrics": json.dumps(checkpoint.metrics),
    }
    return row


def _checkpoint(row: dict[str, Any], mac: bytes) -> Checkpoint:
    where = f"checkpoint of job {row['job']!r} round {row['round']}"
    if not hmac.compare_digest(mac, row["mac"]):
        raise CorruptRecord(f"{where} does not match its HMAC: the row is corrupt or forged")
    if row["dtype"] != _MODEL_DTYPE or len(row["model"]) != 4 * row["length"]:
        raise CorruptRecord(f"{where}: a model of {row['dtype']} x {row['length']} is not ours")
    try:
        strategy = unpack_state(row["strategy"])
        privacy = None if row["privacy"] is None else json.loads(row["privacy"])
        metrics = json.loads(row["metrics"])
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptRecord(f"{where} cannot be decoded: {exc}") from None
    return Checkpoint(
        job_id=row["job"],
        round=row["round"],
        model=np.frombuffer(row["model"], dtype=_MODEL_DTYPE).astype(np.float32),
        score=row["score"],
        metrics=metrics,
        strategy=strategy,
        privacy=privacy,
    )


def pack_state(state: dict[str, Any]) -> bytes:
    """A strategy's ``state_dict`` as msgpack (numpy arrays as extension type 1)."""

    def default(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
            if dtype.str not in _ARRAY_DTYPES:
                raise StoreError(f"cannot store an array of dtype {array.dtype}")
            body = [dtype.str, list(array.shape), array.astype(dtype).tobytes()]
            return msgpack.ExtType(_NDARRAY_EXT, msgpack.packb(body, use_bin_type=True))
        if isinstance(value, np.generic):
            return value.item()
        raise StoreError(f"cannot store a {type(value).__name__} in a strategy state")

    packed: bytes = msgpack.packb(state, default=default, use_bin_type=True)
    return packed


def unpack_state(blob: bytes) -> dict[str, Any]:
    """The state :func:`pack_state` packed.

    Raises:
        ValueError: not such a state (msgpack's errors are ValueErrors too).
    """

    def ext_hook(code: int, data: bytes) -> Any:
        if code != _NDARRAY_EXT:
            raise ValueError(f"unknown extension type {code}")
        dtype, shape, raw = msgpack.unpackb(data, raw=False)
        if dtype not in _ARRAY_DTYPES:
            raise ValueError(f"unknown array dtype {dtype!r}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    budget = ContainerBudget(MAX_STATE_CONTAINERS)  # a peer's catch-up state comes from afar
    state = msgpack.unpackb(
        blob,
        ext_hook=ext_hook,
        raw=False,
        strict_map_key=True,
        list_hook=budget,
        object_hook=budget,
    )
    if not isinstance(state, dict):
        raise ValueError("a strategy state is a map")
    return state
