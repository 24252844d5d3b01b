"""The node's store: a real SQLite file that keeps what it acknowledged and refuses bad rows."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshfed.store as store_module
from meshfed.errors import CorruptRecord, StoreError
from meshfed.identity import PeerId
from meshfed.market.ledger import Ledger
from meshfed.privacy.accountant import GaussianEvent, PrivacyAccountant
from meshfed.store import MIGRATIONS, Checkpoint, JobState, Store
from meshfed.training.strategies import named


def checkpoint(round: int, score: float = 0.5, *, job: str = "job", size: int = 100) -> Checkpoint:
    return Checkpoint(
        job_id=job,
        round=round,
        model=np.full(size, round, np.float32),
        score=score,
        metrics={"accuracy": score, "round": round},
    )


def test_a_new_file_is_created_in_wal_mode_at_the_latest_schema(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "node.sqlite3"
    with Store.open(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.jobs() == []
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
    assert {"jobs", "rounds", "checkpoints", "privacy"} <= tables
    connection.close()
    with Store.open(path) as store:  # reopening migrates nothing and loses nothing
        assert store.schema_version == len(MIGRATIONS)


def test_migrations_run_in_order_from_an_empty_file_and_from_an_older_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.sqlite3"
    path.touch()  # an empty file is an empty database
    with Store.open(path) as store:
        store.put_job("j", "{}")
    later = (*MIGRATIONS, ("CREATE TABLE later (x INTEGER) STRICT",))
    monkeypatch.setattr(store_module, "MIGRATIONS", later)
    with Store.open(path) as store:
        assert store.schema_version == len(later)
        assert [job.job_id for job in store.jobs()] == ["j"]  # the old rows are still there
    monkeypatch.undo()
    with pytest.raises(StoreError, match="newer than this meshfed"):
        Store.open(path)


def test_what_is_not_a_store_is_refused_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database file, not at all" * 100)
    with pytest.raises(StoreError, match="unusable"):
        Store.open(junk)
    with pytest.raises(StoreError, match="cannot open"):
        Store.open(tmp_path / "missing.sqlite3", readonly=True)


def test_a_round_trips_with_model_strategy_and_privacy_state(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    strategy = named("fedadam")
    base = rng.normal(size=1000).astype(np.float32)
    strategy.apply(base, base + 0.1)  # the moments are now arrays
    accountant = PrivacyAccountant(budget_epsilon=8.0, delta=1e-5)
    accountant.compose(GaussianEvent(1.5), 3)
    with Store.open(tmp_path / "s.sqlite3") as store:
        store.put_job("job", '{"rounds": 3}')
        saved = Checkpoint(
            job_id="job",
            round=0,
            model=base,
            score=0.75,
            metrics={"accuracy": 0.75, "train_loss": float("nan"), "groups": [4]},
            strategy=strategy.state_dict(),
            privacy=accountant.state_dict(),
        )
        store.save_round(saved, privacy=accountant.state_dict())
        loaded = store.load_checkpoint("job")
        assert store.rounds("job")[0].metrics["groups"] == [4]
        assert store.privacy("job") == accountant.state_dict()
    assert loaded is not None
    np.testing.assert_array_equal(loaded.model, base)
    assert loaded.score == 0.75 and np.isnan(loaded.metrics["train_loss"])
    restored = named("fedadam")
    restored.load_state_dict(loaded.strategy)
    np.testing.assert_array_equal(restored.apply(base, base), strategy.apply(base, base))
    again = PrivacyAccountant(budget_epsilon=1.0, delta=0.1)
    assert loaded.privacy is not None
    again.load_state_dict(loaded.privacy)
    assert again.epsilon() == accountant.epsilon()


@settings(max_examples=40, deadline=None)
@given(
    scores=st.lists(st.floats(0, 1), min_size=1, max_size=12),
    keep=st.integers(1, 4),
)
def test_retention_keeps_the_last_k_and_the_best(
    tmp_path_factory: pytest.TempPathFactory, scores: list[float], keep: int
) -> None:
    with Store.open(tmp_path_factory.mktemp("s") / "s.sqlite3") as store:
        store.put_job("job", "{}")
        for number, score in enumerate(scores):
            store.save_round(checkpoint(number, score), keep=keep)
            seen = scores[: number + 1]
            best = seen.index(max(seen))
            expected = sorted({*range(max(0, number + 1 - keep), number + 1), best})
            assert store.checkpoint_rounds("job") == expected
        best_checkpoint = store.best_checkpoint("job")
        assert best_checkpoint is not None and best_checkpoint.round == scores.index(max(scores))
        assert [r.round for r in store.rounds("job")] == list(range(len(scores)))


def test_a_corrupt_row_is_reported_and_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with Store.open(path) as store:
        store.put_job("job", "{}")
        store.save_round(checkpoint(0, 0.9), keep=5)
        store.save_round(checkpoint(1, 0.8), keep=5)
    connection = sqlite3.connect(path)
    model = connection.execute("SELECT model FROM checkpoints WHERE round = 1").fetchone()[0]
    flipped = bytes([model[0] ^ 1]) + model[1:]  # one bit of the model
    connection.execute("UPDATE checkpoints SET model = ? WHERE round = 1", (flipped,))
    connection.execute("UPDATE checkpoints SET metrics = '{}' WHERE round = 0")
    connection.commit()
    connection.close()
    with Store.open(path) as store:
        with pytest.raises(CorruptRecord, match="round 1 does not match its HMAC"):
            store.load_checkpoint("job")
        with pytest.raises(CorruptRecord, match="round 0"):
            store.best_checkpoint("job")
        problems = store.verify()
    assert len(problems) == 2 and all("corrupt" in p for p in problems)


def test_misuse_raises_store_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store.open(path)
    with pytest.raises(StoreError, match="no job"):
        store.set_job_state("nope", JobState.FAILED)
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.save_round(checkpoint(0, job="nope"))
    assert store.put_job("job", "{}").state is JobState.RUNNING
    assert store.put_job("job", "other").spec == "{}"  # the first spec stays
    store.save_round(checkpoint(0))
    with pytest.raises(StoreError, match="UNIQUE"):
        store.save_round(checkpoint(0))
    assert store.checkpoint_rounds("job") == [0]  # the failed transaction left nothing
    store.set_job_state("job", JobState.CONVERGED, "target accuracy 0.9 reached at round 0")
    job = store.job("job")
    assert job is not None and job.state is JobState.CONVERGED and "round 0" in job.note
    with Store.open(path, readonly=True) as reader, pytest.raises(StoreError, match="read-only"):
        reader.put_job("other", "{}")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.jobs()


def test_a_reader_sees_whole_checkpoints_while_the_node_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    writer = Store.open(path)
    writer.put_job("job", "{}")
    writer.save_round(checkpoint(0, size=1 << 20))
    rounds = 25

    def write() -> None:
        for number in range(1, rounds):
            writer.save_round(checkpoint(number, size=1 << 20), keep=2)

    thread = threading.Thread(target=write)
    seen = []
    with Store.open(path, readonly=True) as reader:
        thread.start()
        while thread.is_alive() or not seen or seen[-1] < rounds - 1:
            latest = reader.load_checkpoint("job")
            assert latest is not None
            assert np.all(latest.model == latest.round)  # never half a model
            seen.append(latest.round)
    thread.join()
    writer.close()
    assert seen == sorted(seen) and seen[-1] == rounds - 1


_WRITER = """
import sys
import numpy as np
from meshfed.store import Checkpoint, Store
store = Store.open(sys.argv[1])
store.put_job("job", "{}")
number = 0
while True:
    model = np.full(200_000, number, np.float32)
    store.save_round(Checkpoint(job_id="job", round=number, model=model, score=0.5), keep=2)
    print(number, flush=True)
    number += 1
"""


def kill_9_after(script: str, path: Path, acknowledgements: int) -> int:
    """Run ``script`` (it prints a number per write it made durable) on ``path``; SIGKILL it
    once it printed ``acknowledgements``, most likely in the middle of the next write. The
    last number it printed."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    acknowledged = -1
    for line in process.stdout:
        acknowledged = int(line)
        if acknowledged >= acknowledgements:
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return acknowledged


def test_kill_9_loses_no_acknowledged_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    acknowledged = kill_9_after(_WRITER, path, 30)
    with Store.open(path) as store:
        assert store.verify() == []
        latest = store.load_checkpoint("job")
        assert latest is not None and latest.round >= acknowledged
        np.testing.assert_array_equal(latest.model, np.full(200_000, latest.round, np.float32))
        assert [r.round for r in store.rounds("job")] == list(range(latest.round + 1))


def test_the_store_file_is_private_even_outside_a_private_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # a directory every user may read
    old_umask = os.umask(0)
    try:
        with Store.open(shared / "fresh.sqlite3") as store:
            store.put_job("job", "{}")
            store.save_round(checkpoint(0))
            for suffix in ("", "-wal", "-shm"):
                file = shared / f"fresh.sqlite3{suffix}"
                assert file.stat().st_mode & 0o777 == 0o600, suffix
    finally:
        os.umask(old_umask)
    loose = shared / "loose.sqlite3"
    Store.open(loose).close()
    os.chmod(loose, 0o644)  # an older meshfed left it readable by everyone
    Store.open(loose).close()
    assert loose.stat().st_mode & 0o777 == 0o600
    (shared / "planted.sqlite3").symlink_to(loose)
    with pytest.raises(StoreError, match="regular file"):
        Store.open(shared / "planted.sqlite3")


KEY = bytes(range(32))


def test_a_local_writer_without_the_key_cannot_reset_a_privacy_budget(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    spent = {"events": [["gaussian", 1.0, 0.01, 10]], "delta": 1e-5}
    with Store.open(path, key=KEY) as store:
        store.put_job("job", "{}")
        store.save_round(checkpoint(0), privacy=spent)
        assert store.privacy("job") == spent
    # the attacker writes the file with sqlite itself: a fresh budget, sealed as best it can
    connection = sqlite3.connect(path)
    fresh = json.dumps({"events": [], "delta": 1e-5})
    for mac in (hashlib.sha256(fresh.encode()).digest(), b""):
        connection.execute("UPDATE privacy SET state = ?, mac = ?", (fresh, mac))
        connection.commit()
        with Store.open(path, key=KEY) as store:
            with pytest.raises(CorruptRecord, match="privacy of job 'job'"):
                store.privacy("job")
            assert any("privacy" in problem for problem in store.verify())
    connection.close()
    # ... or swaps in a whole store of its own making: refused at open
    path.unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"s.sqlite3{suffix}").unlink(missing_ok=True)
    with Store.open(path) as forged:
        forged.put_job("job", "{}")
        forged.save_round(checkpoint(0), privacy={"events": [], "delta": 1e-5})
    with pytest.raises(StoreError, match="another key"):
        Store.open(path, key=KEY)
    with pytest.raises(StoreError, match="another key"):
        Store.open(path, key=KEY, readonly=True)


def test_a_version_1_store_is_sealed_under_the_key_when_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    connection = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        connection.execute(statement)
    connection.execute("PRAGMA user_version = 1")
    connection.execute("INSERT INTO jobs VALUES ('job', '{}', 'running', '', 0, 0)")
    for number, intact in ((0, True), (1, False)):
        row = store_module._checkpoint_row(checkpoint(number))
        digest = hashlib.sha256(store_module._checkpoint_message(row)).digest()
        row["sha256"] = digest if intact else bytes(32)  # round 1 was corrupt under v1
        connection.execute(
            "INSERT INTO checkpoints VALUES (:job, :round, :score, :dtype, :length, :model, "
            ":strategy, :privacy, :metrics, :sha256, 0)",
            row,
        )
    connection.execute("INSERT INTO privacy VALUES ('job', '{\"events\": []}', 0)")
    connection.close()
    with Store.open(path, key=KEY) as store:
        assert store.schema_version == len(MIGRATIONS)
        loaded = store.load_checkpoint("job", 0)
        assert loaded is not None and np.all(loaded.model == 0)
        with pytest.raises(CorruptRecord):
            store.load_checkpoint("job", 1)  # still corrupt: never sealed as good
        assert store.privacy("job") == {"events": []}
    with pytest.raises(StoreError, match="another key"):
        Store.open(path)  # sealed under KEY from now on


def test_a_version_2_store_migrates_to_the_latest_schema_with_the_market_books(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "v2.sqlite3"
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:2])  # the schema before the market
    with Store.open(path, key=KEY) as store:
        assert store.schema_version == 2
        store.put_job("job", "{}")
        store.save_round(checkpoint(0), privacy={"events": [], "delta": 1e-5})
    monkeypatch.undo()
    with Store.open(path, key=KEY) as store:
        assert store.schema_version == len(MIGRATIONS)
        loaded = store.load_checkpoint("job")
        assert loaded is not None and np.all(loaded.model == 0)
        assert store.privacy("job") == {"events": [], "delta": 1e-5}
        assert store.verify() == []
        ledger = Ledger(store)
        ledger.grant(10, key="g")
        ledger.escrow("job", 10, key="e")
        assert ledger.pay("job", PeerId.from_public_key(bytes(32)), 0, 4, evidence=b"note")
        assert ledger.verify() == []
    tables = {name for (name,) in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    assert {"ledger_entries", "ledger_balances", "market_leases", "market_outbox"} <= tables
    assert {"market_clearings", "market_reputation", "market_reputation_peers"} <= tables


def test_other_modules_seal_their_rows_under_the_store_key(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.sqlite3", key=KEY) as store:
        mac = store.seal("table", "row", 1, b"x")
        expected = hmac.digest(KEY, msgpack.packb(["table", "row", 1, b"x"]), "sha256")
        assert mac == expected
        # the privacy rows of earlier versions keep their MACs
        old = hmac.digest(KEY, msgpack.packb(["privacy", "job", "{}"]), "sha256")
        assert store.seal("privacy", "job", "{}") == old
        store.check_seal(mac, "table", "row", 1, b"x", what="row")
        for forged in (("other", "row", 1, b"x"), ("table", "row", 2, b"x")):
            with pytest.raises(CorruptRecord, match="the row does not match its HMAC"):
                store.check_seal(mac, *forged, what="the row")
    with Store.open(tmp_path / "other.sqlite3") as unkeyed:
        assert unkeyed.seal("table", "row", 1, b"x") != mac


def test_a_transaction_commits_whole_or_not_at_all_and_a_snapshot_sees_one_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sqlite3"
    with Store.open(path) as store:
        with store.transaction() as connection:
            connection.execute("INSERT INTO market_clearings VALUES (1, 'k', 't', 1, 0, x'')")
        with pytest.raises(RuntimeError), store.transaction() as connection:
            connection.execute("INSERT INTO market_clearings VALUES (2, 'k', 't', 1, 0, x'')")
            raise RuntimeError("a check failed half-way")
        with Store.open(path, readonly=True) as reader, reader.snapshot() as connection:
            (count,) = connection.execute("SELECT COUNT(*) FROM market_clearings").fetchone()
            with store.transaction() as writing:  # another writer commits meanwhile ...
                writing.execute("INSERT INTO market_clearings VALUES (3, 'k', 't', 1, 0, x'')")
            (again,) = connection.execute("SELECT COUNT(*) FROM market_clearings").fetchone()
            assert count == again == 1  # ... unseen until the snapshot ends
        reader = Store.open(path, readonly=True)
        with pytest.raises(StoreError, match="read-only"), reader.transaction():
            pass
        reader.close()


_TAG_WRITER = """
import sys
from meshfed.store import Store
store = Store.open(sys.argv[1])
writer = store.process_durable_writer()
statement = "INSERT INTO onion_replay (epoch, tag) VALUES (?, ?)"
for i in range(1_000_000):
    writer.write(statement, [(1, i.to_bytes(16, "big"))], block=True)
    print(i, flush=True)
"""


def test_a_process_durable_write_survives_kill_9_without_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    Store.open(path).close()
    # the rows are in the WAL only (no checkpoint ran)
    acknowledged = kill_9_after(_TAG_WRITER, path, 200)
    with Store.open(path) as store, store.snapshot() as connection:
        rows = connection.execute("SELECT tag FROM onion_replay WHERE epoch = 1").fetchall()
    assert {int.from_bytes(tag, "big") for (tag,) in rows} >= set(range(acknowledged + 1))


def test_a_process_durable_writer_that_must_not_wait_gives_way_to_a_write_in_progress(
    tmp_path: Path,
) -> None:
    statement = "INSERT INTO onion_replay (epoch, tag) VALUES (?, ?)"
    with Store.open(tmp_path / "s.sqlite3") as store:
        writer = store.process_durable_writer()
        with store.transaction():
            assert writer.write(statement, [(1, bytes(16))], block=False) is False
        assert writer.write(statement, [(1, bytes(16))], block=False) is True
        writer.checkpoint()
        writer.close()
        with pytest.raises(StoreError):
            writer.write(statement, [(1, bytes(16))], block=True)
        with store.snapshot() as connection:
            assert connection.execute("SELECT count(*) FROM onion_replay").fetchone() == (1,)
    Store.open(tmp_path / "r.sqlite3").close()
    with pytest.raises(StoreError):
        Store.open(tmp_path / "r.sqlite3", readonly=True).process_durable_writer()
