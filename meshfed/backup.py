"""Back up a node's data directory while the node runs, and restore it into a new one.

Theory of operation. :func:`backup` opens the node's store read-only under the node's key (as
``meshfed-node ledger`` does, so a running node is neither locked out nor slowed beyond one read
transaction) and copies it with SQLite's online backup API in one step: the copy is the last
commit before the step began, whatever the node writes meanwhile (a round in progress is not in
it; the round before is). The copy is then checked as :func:`restore` will check it (SQLite's
integrity check, every sealed row, the ledger's and the audit log's chains): a backup that would
not restore is not written. Beside the store go the identity key, the data sets the node saved
from arrays (``datasets/``), the TOML configuration file if one is named, and the API token only
if asked; never the lock, ``api.json`` (where a running API listens) or the WAL files (the copy
is self-contained). A manifest (``meshfed-backup.json``) lists every file with its size and
SHA-256.

:func:`restore` refuses a target directory that is not empty, a manifest it does not know, a
file missing, extra or unlike its manifest entry, and a store that does not verify under the
backed-up identity's key (one sealed under another key is refused by the store itself). It
restores into a fresh directory beside the target and renames it into place only once every
check passed, so a refused restore leaves nothing behind. Data sets saved under the old data
directory are pointed at their restored copies (their rows are re-sealed under the same key;
their content digests are unchanged).

What is not guaranteed: a backup is as secret as the identity key in it (whoever holds it can
act as the node and forge its store's rows): keep it like the key. Rolling a node back to an
older backup is not detected by anyone (the store does not detect an older file), and its
peers may hold receipts and ledger entries newer than what it restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api.token import TOKEN_FILE
from .audit import AuditLog
from .config import NodeConfig
from .data.registry import DATASETS_DIR
from .errors import ConfigError, StoreError
from .identity import _KEY_FILE, Identity, load_or_create_identity
from .market.ledger import Ledger
from .node import STORE_KEY_PURPOSE
from .store import Store

__all__ = ["MANIFEST", "BackupReport", "backup", "restore", "verify_store"]

#: the manifest's name inside a backup
MANIFEST = "meshfed-backup.json"
_FORMAT = "meshfed-backup"
_VERSION = 1
_STORE = "store.sqlite3"
_CONFIG = "config.toml"


@dataclass(frozen=True, slots=True)
class BackupReport:
    """What a backup holds (also what :func:`restore` restored).

    Attributes:
        path: the backup (a ``.tar`` file or a directory), or the restored data directory.
        peer_id: the node's peer id.
        schema_version: the store's schema version (None: the node has no store).
        files: the files in the backup, by name, with their sizes in bytes.
    """

    path: Path
    peer_id: str
    schema_version: int | None
    files: dict[str, int]


def backup(
    config: NodeConfig,
    out: Path,
    *,
    config_file: Path | None = None,
    include_token: bool = False,
) -> BackupReport:
    """Back up the node whose data directory ``config`` names into ``out``, also while it runs.

    Args:
        config: the node's configuration (its ``data_dir`` and ``store_file``).
        out: a file whose name ends in ``.tar`` (a tar archive), else a directory; it must not
            exist (a directory may exist if empty).
        config_file: the node's TOML configuration file, kept as ``config.toml``.
        include_token: also keep the API token (``api.token``), which lets its holder drive
            the node's API.

    Raises:
        ConfigError: ``out`` exists, or there is no identity in the data directory.
        IdentityError: the identity file is unsafe or corrupt.
        StoreError: the store cannot be read, or its copy does not verify (the problems named).
    """
    _check_empty_target(out)
    identity = _existing_identity(config.data_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".meshfed-backup-", dir=out.parent))
    try:
        identity.save(staging / _KEY_FILE)
        schema = None
        if config.store_path is not None and config.store_path.exists():
            schema = _snapshot(config.store_path, staging / _STORE, identity)
        datasets = config.data_dir / DATASETS_DIR
        if datasets.is_dir():
            (staging / DATASETS_DIR).mkdir(mode=0o700)
            for item in sorted(datasets.iterdir()):
                if item.is_file() and not item.is_symlink():
                    shutil.copy2(item, staging / DATASETS_DIR / item.name)
        if config_file is not None:
            shutil.copy2(config_file, staging / _CONFIG)
        if include_token and (config.data_dir / TOKEN_FILE).is_file():
            shutil.copy2(config.data_dir / TOKEN_FILE, staging / TOKEN_FILE)
        files = {name: path for name, path in _files(staging)}
        manifest: dict[str, Any] = {
            "format": _FORMAT,
            "version": _VERSION,
            "created": time.time(),
            "peer_id": str(identity.peer_id),
            "data_dir": str(config.data_dir.resolve()),
            "schema_version": schema,
            "files": {name: _describe(path) for name, path in files.items()},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for path in staging.rglob("*"):
            path.chmod(0o700 if path.is_dir() else 0o600)
        if out.name.endswith(".tar"):
            partial = out.with_name(out.name + ".partial")
            with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
                for name, path in sorted(_files(staging)):
                    archive.add(path, arcname=name, recursive=False)
            os.replace(partial, out)
        else:
            with contextlib.suppress(FileNotFoundError):
                out.rmdir()  # empty: checked above
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            out.with_name(out.name + ".partial").unlink()
    sizes = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    return BackupReport(out, str(identity.peer_id), schema, sizes)


def restore(source: Path, config: NodeConfig) -> BackupReport:
    """Restore the backup ``source`` (a ``.tar`` file or a directory :func:`backup` wrote) as
    the data directory ``config.data_dir``, which must not exist or be empty.

    Raises:
        ConfigError: the target is not empty, or ``source`` is not a meshfed backup.
        StoreError: a file is missing, extra or unlike its manifest entry, or the store does not
            verify under the backed-up identity's key (the problems named).
        IdentityError: the backed-up identity is not a meshfed identity.
    """
    target = config.data_dir
    _check_empty_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".meshfed-restore-", dir=target.parent))
    try:
        manifest = _unpack(source, staging)
        for path in staging.rglob("*"):
            path.chmod(0o700 if path.is_dir() else 0o600)
        identity = load_or_create_identity(staging)  # present: the manifest check saw it
        if str(identity.peer_id) != manifest["peer_id"]:
            raise StoreError(f"backup {source}: its identity is not the manifest's peer id")
        if _STORE in manifest["files"]:
            if config.store_path is None:
                raise ConfigError("store_file is empty: there is nowhere to restore the store to")
            stored = staging / _STORE
            with Store.open(stored, key=identity.derive_key(STORE_KEY_PURPOSE)) as store:
                problems = verify_store(store)
                if problems:
                    raise StoreError(f"backup {source} does not verify: {'; '.join(problems)}")
                _repoint_datasets(store, Path(manifest["data_dir"]), target)
        with contextlib.suppress(FileNotFoundError):
            target.rmdir()  # empty: checked above
        staging.chmod(0o700)
        staging.rename(target)
        if _STORE in manifest["files"] and config.store_path != target / _STORE:
            assert config.store_path is not None  # checked above
            shutil.move(target / _STORE, config.store_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sizes = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    return BackupReport(target, manifest["peer_id"], manifest["schema_version"], sizes)


def verify_store(store: Store) -> list[str]:
    """Everything wrong with ``store``: SQLite's integrity check and sealed rows
    (:meth:`Store.verify`), the ledger (:meth:`Ledger.verify`) and the audit log's chain
    (:meth:`AuditLog.verify`); empty: all is well."""
    return [*store.verify(), *Ledger(store).verify(), *AuditLog(store).verify()]


def _snapshot(path: Path, copy: Path, identity: Identity) -> int:
    """Copy the store at ``path`` to ``copy`` (one read transaction, by SQLite's backup API),
    check the copy, and return its schema version.

    Raises:
        StoreError: the store cannot be read (or belongs to another identity), or the copy does
            not verify.
    """
    key = identity.derive_key(STORE_KEY_PURPOSE)
    with Store.open(path, key=key, readonly=True) as source:
        target = sqlite3.connect(copy, isolation_level=None)
        try:
            with source.snapshot() as connection:
                connection.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")  # one file; restore turns WAL on
        except sqlite3.Error as exc:
            raise StoreError(f"cannot back up store {path}: {exc}") from None
        finally:
            target.close()
    copy.chmod(0o600)
    with Store.open(copy, key=key, readonly=True) as snapshot:
        problems = verify_store(snapshot)
        if problems:
            raise StoreError(f"store {path} does not verify, not backed up: {'; '.join(problems)}")
        return snapshot.schema_version


def _unpack(source: Path, staging: Path) -> dict[str, Any]:
    """Copy the backup's files into ``staging`` and return its manifest, checked: every file
    listed is there with its size and SHA-256, and nothing else is.

    Raises:
        ConfigError: ``source`` is not a meshfed backup.
        StoreError: a file is missing, extra, or unlike its manifest entry.
    """
    if source.is_dir():
        for name, path in _files(source):
            (staging / name).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copy2(path, staging / name)
    elif tarfile.is_tarfile(source):
        try:
            with tarfile.open(source) as archive:
                for member in archive.getmembers():
                    if not member.isfile():
                        raise StoreError(f"backup {source}: {member.name!r} is not a file")
                archive.extractall(staging, filter="data")  # no absolute paths, no '..'
        except (tarfile.TarError, OSError) as exc:
            raise StoreError(f"backup {source} cannot be unpacked: {exc}") from None
    else:
        raise ConfigError(f"{source} is neither a backup directory nor a tar file")
    try:
        manifest = json.loads((staging / MANIFEST).read_text())
        listed = manifest["files"]
        if manifest["format"] != _FORMAT or manifest["version"] != _VERSION:
            raise ValueError(f"format {manifest['format']!r} version {manifest['version']!r}")
        if not isinstance(listed, dict) or _KEY_FILE not in listed:
            raise ValueError("no identity listed")
        if not isinstance(manifest["peer_id"], str) or not isinstance(manifest["data_dir"], str):
            raise ValueError("no peer id or data directory")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{source} is not a meshfed backup: {exc}") from None
    found = {name: path for name, path in _files(staging) if name != MANIFEST}
    for name in sorted(set(listed) | set(found)):
        if name not in found:
            raise StoreError(f"backup {source}: {name} is missing")
        if name not in listed:
            raise StoreError(f"backup {source}: {name} is not in its manifest")
        if _describe(found[name]) != listed[name]:
            raise StoreError(f"backup {source}: {name} is not the file its manifest lists")
    (staging / MANIFEST).unlink()
    return dict(manifest)


def _repoint_datasets(store: Store, old_dir: Path, new_dir: Path) -> None:
    """Point the data sets saved under ``old_dir``'s ``datasets/`` at their copies in
    ``new_dir`` (the rows re-sealed; file digests unchanged)."""
    old = old_dir / DATASETS_DIR
    for record in store.datasets():
        path = Path(record.path).resolve()
        if path.parent == old:
            moved = str(new_dir.resolve() / DATASETS_DIR / path.name)
            store.put_dataset(dataclasses.replace(record, path=moved))


def _existing_identity(data_dir: Path) -> Identity:
    """The identity in ``data_dir``, never created (a backup of nothing is refused).

    Raises:
        ConfigError: there is none.
        IdentityError: it is unsafe or corrupt.
    """
    if not (data_dir / _KEY_FILE).is_file():
        raise ConfigError(f"data_dir: {data_dir} holds no node identity ({_KEY_FILE})")
    return load_or_create_identity(data_dir)


def _check_empty_target(path: Path) -> None:
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{path} is not empty: give a new or an empty directory")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists already")


def _files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(name relative to root, path)`` of every regular file under ``root``."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path.relative_to(root).as_posix(), path


def _describe(path: Path) -> dict[str, object]:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
