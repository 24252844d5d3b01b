"""The data sets a node registered: checked once, recorded in the node's store, loaded where
they are.

:class:`DataRegistry` is bound to a node's :class:`~meshfed.store.Store` (the ``datasets``
table) and a directory for data sets given as arrays. :meth:`~DataRegistry.register` reads the
source whole, checks it (:func:`.validation.checked`) and only then records its path, format,
file digest and what it holds; nothing is recorded for a source that fails a check.
:meth:`~DataRegistry.load` reads the file again, refuses it if its SHA-256 is no longer the one
registered (a changed file is re-registered on purpose, never taken silently), and splits it
into the training part and the validation part the node holds out. :meth:`~DataRegistry.offers`
is what the node's signed record says: names, counts, shapes and label digests, never content.

The registry keeps no state of its own besides its listeners: every call reads the store, so
two registries on one store (the CLI while no node runs, then the node) agree. Its methods do
file I/O: call them from a worker thread in async code (``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, DataError
from ..membership.records import DatasetOffer
from ..store import DatasetRecord, Store
from ..training.data import BUNDLED, Dataset
from .loaders import format_of, read_file, read_items
from .validation import checked, label_digest, validation_split

__all__ = ["DATASETS_DIR", "DataRegistry", "MAX_DATASETS", "NAME_PATTERN", "open_registry"]

#: where, under a node's data directory, data sets registered as arrays are saved
DATASETS_DIR = "datasets"

#: how many data sets a node registers at most (each one's offer rides in its signed record)
MAX_DATASETS = 32
#: what a data set may be called (it also names the file arrays are saved to)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

if TYPE_CHECKING:
    from ..config import NodeConfig

Listener = Callable[[list[DatasetOffer]], None]


@contextmanager
def open_registry(config: NodeConfig) -> Iterator[DataRegistry]:
    """The registry of the node whose data directory ``config`` names, for a tool (the CLI's
    ``meshfed-node data``, the testnet) while no node runs there: the directory is locked and
    the store opened under the node's key for as long as the block runs.

    Raises:
        ConfigError: the node has no store (``store_file`` empty), or a node runs on the data
            directory (stop it first: a running node would not advertise the change).
        StoreError, IdentityError: the store or the identity cannot be opened.
    """
    from ..datadir import DataDirLock
    from ..identity import load_or_create_identity
    from ..node import STORE_KEY_PURPOSE

    if config.store_path is None:
        raise ConfigError("store_file is empty: registered data sets are kept in the node's store")
    lock = DataDirLock(config.data_dir)
    try:
        key = load_or_create_identity(config.data_dir).derive_key(STORE_KEY_PURPOSE)
        with Store.open(config.store_path, key=key) as store:
            yield DataRegistry(store, config.data_dir / DATASETS_DIR)
    finally:
        lock.release()


class DataRegistry:
    """A node's registered data sets.

    Args:
        store: the node's store (where registrations persist).
        directory: where data sets registered as arrays are saved (``<data_dir>/datasets``).
    """

    def __init__(self, store: Store, directory: Path) -> None:
        self.store = store
        self.directory = directory
        self._listeners: builtins.list[Listener] = []

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(offers)`` after every registration and removal (the node uses it
        to re-sign its record); it runs in the thread that made the change."""
        self._listeners.append(listener)

    def register(
        self,
        name: str,
        source: Any,
        *,
        label_column: str | int | None = None,
        classes: int | None = None,
        replace: bool = False,
    ) -> DatasetRecord:
        """Check ``source`` and register it as ``name``.

        Args:
            name: what jobs call it (letters, digits, ``.``, ``_``, ``-``; not a bundled name).
            source: a path to a ``.npz`` (arrays ``x``, ``y``) or ``.csv`` file, a pair of
                arrays ``(x, y)``, or a map-style dataset (a torch ``Dataset``) of
                ``(features, label)`` items. Arrays and datasets are saved as a ``.npz`` in
                :attr:`directory`, so that they survive restarts.
            label_column: for CSV, the label column's header name or index (default: the
                column named ``label``, else the last).
            classes: how many label values there are (default: the largest label + 1); a
                label at or above it is refused.
            replace: register again under a name already taken (a changed file is accepted
                this way).

        Raises:
            DataError: a bad name, a name taken (without ``replace``), too many data sets, or
                a source that fails a check (the message names the file and the problem).
        """
        if not NAME_PATTERN.fullmatch(name) or name in BUNDLED:
            raise DataError(
                f"data set name {name!r}: 1 to 64 letters, digits, '.', '_' or '-' (starting "
                f"with a letter or digit), and not a bundled name ({', '.join(BUNDLED)})"
            )
        old = self.store.dataset(name)
        if old is not None and not replace:
            raise DataError(
                f"data set {name!r} is registered already ({old.path}): register it with "
                "replace=True (--replace) to change it"
            )
        if old is None and len(self.store.datasets()) >= MAX_DATASETS:
            raise DataError(f"{MAX_DATASETS} data sets are registered: remove one first")
        if isinstance(source, str | os.PathLike):
            record = self._check_file(name, Path(source), label_column, classes)
        else:
            if label_column is not None:
                raise DataError(f"data set {name!r}: label_column is for CSV files")
            record = self._save_arrays(name, source, classes)
        self.store.put_dataset(record)
        if old is not None and old.path != record.path:
            self._drop_saved(old)
        self._changed()
        return record

    def get(self, name: str) -> DatasetRecord:
        """The registration of ``name``.

        Raises:
            DataError: no data set is registered as ``name``.
        """
        record = self.store.dataset(name)
        if record is None:
            known = ", ".join(r.name for r in self.store.datasets()) or "none"
            raise DataError(f"no data set {name!r} on this node (registered: {known})")
        return record

    def list(self) -> builtins.list[DatasetRecord]:
        """Every registered data set, by name."""
        return self.store.datasets()

    def remove(self, name: str) -> None:
        """Forget ``name`` (a file it saved from arrays is deleted; a user's file never is).

        Raises:
            DataError: no data set is registered as ``name``.
        """
        record = self.get(name)
        self.store.remove_dataset(name)
        self._drop_saved(record)
        self._changed()

    def load(self, name: str, *, validation: float = 0.2) -> tuple[Dataset, Dataset]:
        """``(train, validation)`` of ``name``: features flattened to rows, a share
        ``validation`` held out (:func:`.validation.validation_split`, the same every time).

        Raises:
            DataError: not registered, the file is gone, unreadable, or changed since it was
                registered (re-register it to accept the new content).
        """
        record = self.get(name)
        path = Path(record.path)
        content = _read(path)
        if hashlib.sha256(content).digest() != record.digest:
            raise DataError(
                f"{path}: changed since it was registered as {name!r} (its SHA-256 differs); "
                f"register it again to accept it (meshfed-node data add {name} {path} --replace)"
            )
        x, y = read_file(path, content, record.format, record.options)
        x, y, _ = checked(x, y, source=str(path), classes=record.classes)
        whole = Dataset(np.ascontiguousarray(x.reshape(len(x), -1)), y)
        train, held = validation_split(name, record.digest, len(whole), validation)
        return whole.take(train), whole.take(held)

    def offers(self) -> builtins.list[DatasetOffer]:
        """What the node's record says about its data sets (never their content)."""
        return [
            DatasetOffer(
                name=r.name,
                examples=r.examples,
                feature_shape=builtins.list(r.feature_shape),
                classes=r.classes,
                label_digest=r.label_digest,
            )
            for r in self.store.datasets()
        ]

    def _check_file(
        self, name: str, path: Path, label_column: str | int | None, classes: int | None
    ) -> DatasetRecord:
        path = path.expanduser().resolve()
        format = format_of(path)
        if label_column is not None and format != "csv":
            raise DataError(f"{path}: label_column is for CSV files")
        options: dict[str, Any] = {} if label_column is None else {"label_column": label_column}
        content = _read(path)
        x, y = read_file(path, content, format, options)
        features, labels, declared = checked(x, y, source=str(path), classes=classes)
        return _record(name, path, format, options, content, features, labels, declared)

    def _save_arrays(self, name: str, source: Any, classes: int | None) -> DatasetRecord:
        label = f"data set {name!r}"
        if isinstance(source, tuple) and len(source) == 2:
            x, y = source
        elif hasattr(source, "__len__") and hasattr(source, "__getitem__"):
            x, y = read_items(source, source=label)
        else:
            raise DataError(
                f"{label}: expected a file path, (x, y) arrays or a map-style dataset, not "
                f"{type(source).__name__}"
            )
        features, labels, declared = checked(x, y, source=label, classes=classes)
        buffer = io.BytesIO()
        np.savez(buffer, x=features, y=labels)
        content = buffer.getvalue()
        path = self.directory / f"{name}.npz"
        _write_atomically(path, content)
        return _record(name, path, "npz", {}, content, features, labels, declared)

    def _drop_saved(self, record: DatasetRecord) -> None:
        """Delete ``record``'s file if the registry saved it (arrays), never a user's file."""
        path = Path(record.path)
        if path.parent == self.directory.resolve() and path.name == f"{record.name}.npz":
            path.unlink(missing_ok=True)

    def _changed(self) -> None:
        offers = self.offers()
        for listener in self._listeners:
            listener(offers)


def _record(
    name: str,
    path: Path,
    format: str,
    options: dict[str, Any],
    content: bytes,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    classes: int,
) -> DatasetRecord:
    """The registration of checked examples read from ``content``."""
    return DatasetRecord(
        name=name,
        path=str(path.resolve()),
        format=format,
        options=options,
        digest=hashlib.sha256(content).digest(),
        examples=len(y),
        feature_shape=tuple(int(n) for n in x.shape[1:]),
        classes=classes,
        label_digest=label_digest(y, classes),
        registered=time.time(),
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def _write_atomically(path: Path, content: bytes) -> None:
    """``content`` into ``path`` (mode 0600, directory 0700), whole or not at all."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise DataError(f"{path}: cannot save the data set: {exc.strerror or exc}") from None
