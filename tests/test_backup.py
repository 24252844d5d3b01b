"""Backing up a running node's data directory and restoring it into a new one."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.lowlevel

from meshfed.backup import MANIFEST, backup, restore
from meshfed.config import NodeConfig
from meshfed.errors import ConfigError, StoreError
from meshfed.identity import Identity
from meshfed.market.ledger import Ledger
from meshfed.market.terms import MICRO
from meshfed.node import open_node
from meshfed.store import Checkpoint, Store
from meshfed.testing import quiet_config
from meshfed.transports.memory import MemoryNetwork

JOB = "job-1"
ROOT = Path(__file__).resolve().parents[1]


def _round(store: Store, number: int) -> None:
    model = np.full(16, number, dtype=np.float32)
    store.save_round(
        Checkpoint(job_id=JOB, round=number, model=model, score=number / 100,
                   metrics={"accuracy": number / 100}),
        privacy={"events": [[1.0, 0.1]] * (number + 1), "budget_epsilon": 8.0},
    )  # fmt: skip


def _books(store: Store) -> None:
    store.put_job(JOB, json.dumps({"rounds": 100}))
    for number in range(3):
        _round(store, number)
    ledger = Ledger(store)
    ledger.grant(1000 * MICRO, key="start")
    ledger.escrow(JOB, 50 * MICRO, key=JOB)
    seller = Identity.generate().peer_id
    ledger.pay(JOB, seller, 0, 2 * MICRO, evidence=b"signed debit note")


def _state(config: NodeConfig) -> tuple[dict[str, int], list[int], int | None]:
    """The ledger's balances, the job's rounds and its latest checkpoint's round."""
    from meshfed.identity import load_or_create_identity
    from meshfed.node import STORE_KEY_PURPOSE

    key = load_or_create_identity(config.data_dir).derive_key(STORE_KEY_PURPOSE)
    assert config.store_path is not None
    with Store.open(config.store_path, key=key, readonly=True) as store:
        latest = store.load_checkpoint(JOB)
        rounds = [record.round for record in store.rounds(JOB)]
        return Ledger(store).accounts(), rounds, None if latest is None else latest.round


async def test_a_running_node_is_backed_up_mid_round_and_restores_to_a_committed_round(
    tmp_path: Path,
) -> None:
    config = quiet_config(tmp_path / "node")
    async with open_node(config, network=MemoryNetwork()) as node:
        store = node.store
        assert store is not None
        await trio.to_thread.run_sync(_books, store)
        written: list[int] = []

        def train() -> None:  # rounds keep landing while the backup copies the store
            for number in range(3, 60):
                _round(store, number)
                written.append(number)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, train)
            await trio.lowlevel.checkpoint()
            report = await trio.to_thread.run_sync(backup, config, tmp_path / "node.tar")
        peer_id = node.peer_id
    assert report.peer_id == str(peer_id) and "identity.key" in report.files
    assert {"lock", "api.token", "api.json"}.isdisjoint(report.files)
    assert not [name for name in report.files if name.endswith(("-wal", "-shm"))]
    with tarfile.open(tmp_path / "node.tar") as archive:
        assert all(member.mode == 0o600 for member in archive.getmembers())

    new = quiet_config(tmp_path / "new")
    restore(tmp_path / "node.tar", new)
    assert os.stat(new.data_dir).st_mode & 0o777 == 0o700
    balances, rounds, latest = _state(new)
    assert balances == _state(config)[0]  # the ledger did not move during the backup
    assert balances["available"] == 950 * MICRO and balances[f"escrow:{JOB}"] == 48 * MICRO
    assert rounds == list(range(len(rounds))) and len(rounds) >= 3  # a prefix: whole rounds
    assert latest == rounds[-1]  # each round's checkpoint came with it
    async with open_node(new, network=MemoryNetwork()) as restored:
        assert restored.peer_id == peer_id
        assert restored.store is not None
        checkpoint = await trio.to_thread.run_sync(restored.store.load_checkpoint, JOB)
        assert checkpoint is not None
        assert np.array_equal(checkpoint.model, np.full(16, latest, dtype=np.float32))


def _stopped_node(tmp_path: Path) -> NodeConfig:
    config = quiet_config(tmp_path / "node")

    async def start() -> None:
        async with open_node(config, network=MemoryNetwork()) as node:
            assert node.store is not None
            await trio.to_thread.run_sync(_books, node.store)

    trio.run(start)
    return config


def _rewrite_manifest(directory: Path) -> None:
    """What an attacker who edits a backup does next: list the edited files as they are now."""
    import hashlib

    manifest = json.loads((directory / MANIFEST).read_text())
    for name in manifest["files"]:
        data = (directory / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_a_backup_whose_ledger_was_edited_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    config = _stopped_node(tmp_path)
    copy = tmp_path / "copy"
    backup(config, copy)
    with sqlite3.connect(copy / "store.sqlite3") as db:  # give ourselves a million credits
        db.execute("UPDATE ledger_balances SET balance = balance + 1000000000000 "
                   "WHERE account = 'available'")  # fmt: skip
    db.close()
    _rewrite_manifest(copy)
    target = quiet_config(tmp_path / "new")
    with pytest.raises(StoreError, match=r"does not verify.*available"):
        restore(copy, target)
    assert not target.data_dir.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_backup_file_unlike_its_manifest_is_refused(tmp_path: Path) -> None:
    config = _stopped_node(tmp_path)
    copy = tmp_path / "copy"
    backup(config, copy)
    store = copy / "store.sqlite3"
    data = bytearray(store.read_bytes())
    data[-100] ^= 1
    store.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"store\.sqlite3 is not the file its manifest lists"):
        restore(copy, quiet_config(tmp_path / "new"))
    (copy / "planted").write_bytes(b"x")
    with pytest.raises(StoreError, match="planted is not in its manifest"):
        restore(copy, quiet_config(tmp_path / "new"))


def test_a_tar_that_escapes_its_directory_is_refused(tmp_path: Path) -> None:
    config = _stopped_node(tmp_path)
    backup(config, tmp_path / "b.tar")
    (tmp_path / "payload").write_text("planted")
    with tarfile.open(tmp_path / "b.tar", "a") as archive:
        archive.add(tmp_path / "payload", arcname="../../escaped")
    with pytest.raises(StoreError, match="cannot be unpacked"):
        restore(tmp_path / "b.tar", quiet_config(tmp_path / "new"))
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "new").exists()
    link = tarfile.TarInfo("identity.key")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with tarfile.open(tmp_path / "linked.tar", "w") as archive:
        archive.addfile(link)
    with pytest.raises(StoreError, match=r"'identity\.key' is not a file"):
        restore(tmp_path / "linked.tar", quiet_config(tmp_path / "new"))


def test_a_backup_with_another_identity_is_refused(tmp_path: Path) -> None:
    config = _stopped_node(tmp_path)
    copy = tmp_path / "copy"
    backup(config, copy)
    other = Identity.generate()
    (copy / "identity.key").unlink()
    other.save(copy / "identity.key")
    _rewrite_manifest(copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["peer_id"] = str(other.peer_id)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="sealed under another key"):
        restore(copy, quiet_config(tmp_path / "new"))


def test_restore_refuses_a_non_empty_target_and_backup_an_existing_one(tmp_path: Path) -> None:
    config = _stopped_node(tmp_path)
    backup(config, tmp_path / "b.tar")
    with pytest.raises(ConfigError, match="exists already"):
        backup(config, tmp_path / "b.tar")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "identity.key").write_bytes(b"someone else's")
    with pytest.raises(ConfigError, match="is not empty"):
        restore(tmp_path / "b.tar", quiet_config(taken))
    assert (taken / "identity.key").read_bytes() == b"someone else's"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert restore(tmp_path / "b.tar", quiet_config(empty)).path == empty
    with pytest.raises(ConfigError, match="holds no node identity"):
        backup(quiet_config(tmp_path / "nobody"), tmp_path / "nobody.tar")


def test_data_sets_saved_in_the_data_dir_follow_the_restore(tmp_path: Path) -> None:
    from meshfed.data.registry import open_registry

    config = _stopped_node(tmp_path)
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    with open_registry(config) as registry:
        registry.register("local", (x, np.arange(40) % 2))
    backup(config, tmp_path / "b")
    new = quiet_config(tmp_path / "new")
    restore(tmp_path / "b", new)
    (config.data_dir / "datasets" / "local.npz").unlink()  # the old directory is gone
    with open_registry(new) as registry:
        (record,) = registry.list()
        assert Path(record.path) == (new.data_dir / "datasets" / "local.npz").resolve()
        assert registry.load("local") is not None


def test_the_commands_back_up_and_restore(tmp_path: Path) -> None:
    config = _stopped_node(tmp_path)
    (config.data_dir / "api.token").write_text("x" * 43 + "\n")
    (config.data_dir / "api.token").chmod(0o600)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def node(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "meshfed.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, check=False)

    done = node("backup", "--data-dir", str(config.data_dir), str(tmp_path / "b.tar"))
    assert done.returncode == 0, done.stderr
    assert "identity.key" in done.stdout and "api.token" not in done.stdout
    done = node("restore", str(tmp_path / "b.tar"), "--data-dir", str(tmp_path / "new"))
    assert done.returncode == 0, done.stderr
    assert _state(quiet_config(tmp_path / "new")) == _state(config)
    again = node("restore", str(tmp_path / "b.tar"), "--data-dir", str(tmp_path / "new"))
    assert again.returncode == 1 and "is not empty" in again.stderr
