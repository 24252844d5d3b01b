"""The audit log: what a market job leaves in it, the chain that shows tampering, the bounds
on what waits to be written."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import meshfed.store as store_module
from meshfed.api.metrics import NodeMetrics
from meshfed.audit import AuditKind, AuditLog, AuditTrail
from meshfed.errors import CorruptRecord
from meshfed.identity import Identity
from meshfed.node import Node
from meshfed.stats import RejectReason
from meshfed.store import MIGRATIONS, Store
from meshfed.testing import open_memory_mesh

JOB = {
    "job_id": "audited",
    "rounds": 2,
    "dataset": "digits",
    "partition": "iid",
    "secure": False,
    "dp_clip": 1.0,
}


async def _meshed(nodes: list[Node], within: float = 20.0) -> None:
    for node in nodes[1:]:
        await node.connect(nodes[0].listen_addrs[0])
    with trio.fail_after(within):
        # records come by gossip, with no event to wait on: poll them
        while not all(  # noqa: ASYNC110
            sum(1 for r in node.peers() if r.capabilities.prices) == len(nodes) - 1
            for node in nodes
        ):
            await trio.sleep(0.1)


async def _entries(node: Node) -> list[tuple[str, dict[str, object]]]:
    await node.audit_trail.flush()
    assert node.store is not None
    found = await trio.to_thread.run_sync(lambda: AuditLog(node.store).entries(limit=1000))  # type: ignore[arg-type]
    return [(entry.kind, entry.fields) for entry in found]


async def test_a_market_job_leaves_its_awards_settlements_privacy_spends_and_round_metrics(
    tmp_path: Path,
) -> None:
    async with open_memory_mesh(4, tmp_path, membership=True, gossip_interval_s=0.1) as nodes:
        await _meshed(nodes)
        buyer, sellers = nodes[0], nodes[1:]
        metrics = {seller.peer_id: NodeMetrics(seller) for seller in sellers}
        handle = await buyer.submit_training(JOB, budget=5, min_peers=3, max_peers=3)
        with trio.fail_after(120):
            final = await handle.wait()
        assert final["error"] is None, final
        mine = await _entries(buyer)
        awards = [f for kind, f in mine if kind == AuditKind.AWARD]
        assert sorted(str(f["peer"]) for f in awards) == sorted(str(s.peer_id) for s in sellers)
        assert all(f["role"] == "buyer" and f["job"] == "audited" for f in awards)
        (settled,) = [f for kind, f in mine if kind == AuditKind.SETTLEMENT]
        assert settled["reason"] == "done" and settled["paid"] == final["paid"]
        with trio.fail_after(10):  # a seller takes its settlement just after the buyer ends
            while True:
                theirs = {s.peer_id: await _entries(s) for s in sellers}
                if all(any(k == AuditKind.SETTLEMENT for k, _ in e) for e in theirs.values()):
                    break
                await trio.sleep(0.1)
        for entries in theirs.values():
            kinds = [kind for kind, _ in entries]
            assert kinds.count(AuditKind.AWARD) == 1
            spent = [f["round"] for kind, f in entries if kind == AuditKind.PRIVACY_SPENT]
            assert spent == [0, 1]  # each round's charge, written with the charge
        for seller in sellers:
            text = (await metrics[seller.peer_id].scrape()).decode()
            samples = {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }
            assert samples["meshfed_rounds_total", (("job", "audited"),)] == 2
            assert samples["meshfed_round_seconds_count", ()] == 2
            averaging = samples["meshfed_round_phase_seconds_count", (("phase", "averaging"),)]
            assert averaging == 2
            assert samples["meshfed_privacy_epsilon_spent", (("job", "audited"),)] > 0
            budget = samples["meshfed_privacy_epsilon_budget", (("job", "audited"),)]
            assert budget == 8.0  # the job's default


def _filled(tmp_path: Path, rows: int = 5) -> Store:
    store = Store.open(tmp_path / "s.sqlite3", key=bytes(range(32)))
    AuditLog(store).append([(float(i), "rejected", {"n": i}) for i in range(rows)])
    return store


def test_the_audit_table_refuses_updates_and_deletes(tmp_path: Path) -> None:
    with _filled(tmp_path) as store:
        for statement in ("UPDATE audit_log SET kind = 'x'", "DELETE FROM audit_log"):
            with store.transaction() as connection, pytest.raises(sqlite3.DatabaseError):
                connection.execute(statement)
        assert len(AuditLog(store).entries()) == 5 and AuditLog(store).verify() == []


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE audit_log SET fields = '{\"n\":9}' WHERE seq = 3",  # a changed entry
        "DELETE FROM audit_log WHERE seq = 3",  # a removed one
    ],
)
def test_someone_who_gets_past_the_triggers_is_found_out(tmp_path: Path, tamper: str) -> None:
    with _filled(tmp_path) as store:
        with store.transaction() as connection:  # the attacker writes the file itself
            connection.execute("DROP TRIGGER audit_log_no_update")
            connection.execute("DROP TRIGGER audit_log_no_delete")
            connection.execute(tamper)
        assert AuditLog(store).verify() != []
        if tamper.startswith("UPDATE"):
            with pytest.raises(CorruptRecord):
                AuditLog(store).entries()


def test_a_store_of_v5_gets_the_audit_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.sqlite3"
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:5])
        Store.open(path).close()
    with Store.open(path) as store:
        assert store.schema_version == len(MIGRATIONS) >= 6
        AuditLog(store).append([(1.0, "identity_created", {"peer": "p"})])
        assert [e.kind for e in AuditLog(store).entries()] == ["identity_created"]


async def test_a_flood_is_coalesced_and_what_does_not_fit_is_counted(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.sqlite3") as store:
        trail = AuditTrail(keeps=True, max_pending=3)
        trail.attach(store)
        mallory = Identity.generate().peer_id
        for _ in range(1000):
            trail.rejected(mallory, RejectReason.BAD_SIGNATURE, "forged")
        for n in range(5):
            trail.note(AuditKind.API_NEW_CLIENT, address=f"10.0.0.{n}")
        await trail.flush()
        entries = AuditLog(store).entries()
    counts = {entry.kind: entry.fields.get("count") for entry in entries}
    assert counts[AuditKind.REJECTED] == 1000
    assert sum(1 for e in entries if e.kind == AuditKind.API_NEW_CLIENT) == 2
    assert counts[AuditKind.DROPPED] == 3
