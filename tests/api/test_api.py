"""The REST API of a node on the real libp2p transport: access, errors, metrics, audit."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from meshfed.api.limits import MAX_BODY_BYTES
from meshfed.config import NodeConfig
from meshfed.control import Ping
from meshfed.errors import ConfigError, RequestFailed
from meshfed.identity import Identity
from meshfed.node import RPC_PROTOCOL, open_node
from meshfed.wire import seal

from .nodes import ROOT, api_node, bearer, config, node_process


def wall_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


def mutating(openapi: dict[str, object]) -> list[tuple[str, str]]:
    paths = openapi["paths"]
    assert isinstance(paths, dict)
    return [
        (method, path.replace("{job_id}", "some-job"))
        for path, operations in paths.items()
        for method in operations
        if method in ("post", "put", "patch", "delete")
    ]


async def test_every_mutating_endpoint_needs_the_token(tmp_path: Path) -> None:
    async with api_node(tmp_path) as (_, client):
        writes = mutating((await client.get("/openapi.json")).json())
        assert ("post", "/jobs") in writes and ("post", "/jobs/some-job/cancel") in writes
        for method, path in writes:
            missing = await client.request(method, path, json={})
            assert missing.status_code == 401, (path, missing.text)
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = await client.request(
                method, path, json={}, headers={"Authorization": "Bearer " + "A" * 43}
            )
            assert wrong.status_code == 403, (path, wrong.text)
        right = await client.post("/jobs/some-job/cancel", headers=bearer(tmp_path))
        assert right.status_code == 404  # past the door: the job is unknown
        assert (await client.get("/status")).status_code == 200  # loopback: reads are open


async def test_the_token_file_is_private_and_kept(tmp_path: Path) -> None:
    async with api_node(tmp_path):
        token = (tmp_path / "api.token").read_text()
        assert (tmp_path / "api.token").stat().st_mode & 0o777 == 0o600
    async with api_node(tmp_path):
        assert (tmp_path / "api.token").read_text() == token


async def test_beyond_loopback_every_request_needs_the_token(tmp_path: Path) -> None:
    async with api_node(tmp_path, api="0.0.0.0:0") as (node, client):
        assert (await client.get("/status")).status_code == 401
        assert (await client.get("/metrics")).status_code == 401
        ok = await client.get("/status", headers=bearer(tmp_path))
        assert ok.status_code == 200 and ok.json()["peer_id"] == str(node.peer_id)


async def test_no_listening_beyond_loopback_without_a_usable_token(tmp_path: Path) -> None:
    (tmp_path / "api.token").write_text("A" * 43 + "\n")
    (tmp_path / "api.token").chmod(0o644)  # others could read it: not a secret any more
    refused = pytest.RaisesExc(ConfigError, match=r"api\.token has mode 644")
    with pytest.RaisesGroup(refused, flatten_subgroups=True):
        async with open_node(config(tmp_path, api="0.0.0.0:0")):
            pass


def test_the_api_address_is_an_ip_and_a_port() -> None:
    for bad in ("example.com:80", "127.0.0.1", "127.0.0.1:99999", ":80"):
        with pytest.raises(ConfigError, match="api"):
            NodeConfig(api=bad)
    assert NodeConfig(api="[::1]:8080").api == "[::1]:8080"
    assert NodeConfig(api="off").api == "off"


async def test_bad_input_is_a_clear_4xx(tmp_path: Path) -> None:
    async with api_node(tmp_path) as (_, client):
        auth = bearer(tmp_path)
        answer = await client.get("/pricing/estimate", params={"participants": 0})
        assert answer.status_code == 422 and "participants" in answer.json()["detail"]
        answer = await client.post("/jobs", json={"job": {}, "budget": -1}, headers=auth)
        assert answer.status_code == 422 and "budget" in answer.json()["detail"]
        answer = await client.post(
            "/jobs", json={"job": {"rounds": "x"}, "budget": 5}, headers=auth
        )
        assert answer.status_code == 422, answer.text
        answer = await client.get("/jobs/nothing-here")
        assert answer.status_code == 404 and "nothing-here" in answer.json()["detail"]


async def test_a_large_body_is_refused_before_the_token_is_checked(tmp_path: Path) -> None:
    async with api_node(tmp_path) as (_, client):
        huge = await client.post("/jobs", content=b"x" * (MAX_BODY_BYTES + 1))
        assert huge.status_code == 413 and "at most" in huge.json()["detail"]

        async def chunks() -> AsyncIterator[bytes]:
            yield b"{}"

        unsized = await client.post("/jobs", content=chunks())  # chunked: no length
        assert unsized.status_code == 411


async def test_docs_are_served_offline(tmp_path: Path) -> None:
    async with api_node(tmp_path) as (_, client):
        page = (await client.get("/docs")).text
        assert "/jobs/{job_id}/cancel" in page and "SubmitTraining" in page
        assert "<script" not in page and "http" not in page.replace("/openapi.json", "")


async def test_metrics_parse_and_agree_with_node_stats(tmp_path: Path) -> None:
    quiet = {"membership": False}  # nothing but what the test sends: the counters hold still
    async with (
        api_node(tmp_path / "a", **quiet) as (a, client),
        open_node(config(tmp_path / "b", **quiet)) as b,
    ):
        await b.connect(a.listen_addrs[0])
        for _ in range(3):
            await b.ping(a.peer_id)
        replayed, _ = seal(b.identity, Ping(sent_ms=wall_ms()), now_ms=wall_ms())
        await b.transport.request(a.peer_id, RPC_PROTOCOL, replayed)
        with pytest.raises(RequestFailed):
            await b.transport.request(a.peer_id, RPC_PROTOCOL, replayed)
        text = (await client.get("/metrics")).text
        stats = a.stats.snapshot()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    accepted = {
        sample.labels["type"]: sample.value
        for sample in families["meshfed_messages_accepted"].samples
        if sample.name.endswith("_total")
    }
    rejected = {
        sample.labels["reason"]: sample.value
        for sample in families["meshfed_messages_rejected"].samples
        if sample.name.endswith("_total")
    }
    assert accepted == stats["accepted"] and accepted["meshfed.ping"] >= 4
    assert rejected == stats["rejected"] == {"replayed": 1}
    assert families["meshfed_bytes_in"].samples[0].value == stats["bytes_in"] > 0
    assert "meshfed_round_seconds" in families and "meshfed_round_phase_seconds" in families


async def test_a_forged_message_is_in_the_audit_log(tmp_path: Path) -> None:
    async with api_node(tmp_path / "a") as (a, client), open_node(config(tmp_path / "b")) as b:
        await b.connect(a.listen_addrs[0])
        mallory = Identity.generate()
        for _ in range(5):  # signed by someone else, sent over b's authenticated connection
            forged, _ = seal(mallory, Ping(sent_ms=wall_ms()), now_ms=wall_ms())
            with pytest.raises(RequestFailed):
                await b.transport.request(a.peer_id, RPC_PROTOCOL, forged)
        entries = (await client.get("/audit", params={"kind": "rejected"})).json()
    assert len(entries) == 1  # a flood is one entry with its count
    (entry,) = entries
    assert entry["fields"]["peer"] == str(b.peer_id)
    assert entry["fields"]["reason"] == "sender_mismatch"
    assert entry["fields"]["count"] == 5


async def test_the_audit_log_is_append_only(tmp_path: Path) -> None:
    import sqlite3

    async with api_node(tmp_path) as (node, client):
        kinds = [entry["kind"] for entry in (await client.get("/audit")).json()]
        assert kinds[:2] == ["identity_created", "api_token_created"]
        assert node.store is not None
        with node.store.transaction() as connection, pytest.raises(sqlite3.DatabaseError):
            connection.execute("DELETE FROM audit_log WHERE seq = 1")


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    with node_process(tmp_path) as (_, url):
        token = (tmp_path / "api.token").read_text().strip()
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "st"),
                "run",
                f"{url}/openapi.json",
                "--max-examples",
                "15",
                "--checks",
                "not_a_server_error,response_schema_conformance",
                "-H",
                f"Authorization: Bearer {token}",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=tmp_path,  # its cache of failures goes there, not into the repository
        )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_after_kill_9_the_api_reports_what_it_acknowledged(tmp_path: Path) -> None:
    with node_process(tmp_path) as (process, url):
        httpx.post(f"{url}/jobs/x/cancel")  # refused: an audit entry
        auth = bearer(tmp_path)
        before = {
            path: httpx.get(url + path, headers=auth).json()
            for path in ("/audit", "/ledger", "/jobs", "/budget")
        }
        process.kill()  # kill -9
        process.wait()
    assert "api_refused" in [entry["kind"] for entry in before["/audit"]]
    with node_process(tmp_path) as (_, url):
        after = {path: httpx.get(url + path, headers=auth).json() for path in before}
    assert after["/ledger"] == before["/ledger"]
    assert after["/jobs"] == before["/jobs"]
    assert after["/budget"] == before["/budget"]
    assert after["/audit"][: len(before["/audit"])] == before["/audit"]


async def test_a_jobs_model_is_described_and_its_weights_load_into_its_architecture(
    tmp_path: Path,
) -> None:
    import hashlib

    import numpy as np
    import torch

    from meshfed.store import Checkpoint
    from meshfed.training import models
    from meshfed.training.spec import JobSpec, TrainingSpec

    async with api_node(tmp_path) as (node, client):
        assert node.store is not None
        spec = JobSpec(
            job_id="digits-1", rounds=3,
            roster=(str(node.peer_id), *(str(Identity.generate().peer_id) for _ in range(3))),
            training=TrainingSpec(model="mlp", model_options={"hidden": [16]}),
        )  # fmt: skip
        module = models.build("mlp", hidden=[16])
        weights = torch.nn.utils.parameters_to_vector(module.parameters()).detach().numpy()
        node.store.put_job(spec.job_id, spec.to_json())
        for number in range(3):  # what a node that trained the job keeps
            model = (weights + number).astype(np.float32)
            node.store.save_round(
                Checkpoint(job_id="digits-1", round=number, model=model, score=0.5 + number / 10)
            )
        assert (await client.get("/jobs/elsewhere/model")).status_code == 404
        described = (await client.get("/jobs/digits-1/model")).json()
        assert described["round"] == 2 and described["score"] == pytest.approx(0.7)
        assert described["model"] == "mlp" and described["model_options"] == {"hidden": [16]}
        assert described["parameters"] == len(weights)
        raw = await client.get("/jobs/digits-1/model/weights")
        assert raw.status_code == 200 and raw.headers["content-type"] == "application/octet-stream"
        assert hashlib.sha256(raw.content).hexdigest() == described["sha256"]
        vector = np.frombuffer(raw.content, "<f4")
        np.testing.assert_array_equal(vector, weights + 2)
        rebuilt = models.build(described["model"], **described["model_options"])
        torch.nn.utils.vector_to_parameters(torch.from_numpy(vector.copy()), rebuilt.parameters())


async def test_status_counts_what_the_node_holds(tmp_path: Path) -> None:
    async with (
        api_node(tmp_path / "a") as (node, client),
        open_node(config(tmp_path / "b", api="off")) as other,
    ):
        await other.connect(node.listen_addrs[0])
        with trio.fail_after(30):
            while not node.status()["members"]:  # noqa: ASYNC110  # records come by gossip
                await trio.sleep(0.05)
        answer = (await client.get("/status")).json()
        snapshot = node.status()
        assert answer["peer_id"] == str(node.peer_id) and answer["listen"] == node.listen_addrs
        assert answer["members"] == len(snapshot["members"]) == 1
        assert answer["connected"] == 1 and answer["market"] and answer["store"]
        assert 0 < answer["uptime_s"] <= snapshot["uptime_s"]
