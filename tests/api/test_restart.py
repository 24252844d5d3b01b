"""kill -9 of a buyer in the middle of a job over libp2p, and its restart: the API reports
the job, its leases, the ledger and the audit log as acknowledged before the kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from meshfed.node import open_node

from .nodes import ROOT, bearer, config

JOB = {
    "job_id": "restarted",
    "rounds": 12,
    "dataset": "digits",
    "partition": "iid",
    "secure": False,
}


async def _start_buyer(data_dir: Path, bootstrap: str) -> tuple[trio.Process, str]:
    command = [
        sys.executable,
        "-m",
        "meshfed.cli",
        "run",
        "--json",
        "--no-mdns",
        "--data-dir",
        str(data_dir),
        "--bootstrap",
        bootstrap,
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MESHFED_GOSSIP_INTERVAL_S": "0.2"}
    process = await trio.lowlevel.open_process(command, env=env, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        line += await process.stdout.receive_some(1)
    started = json.loads(line)
    return process, started["api"]


async def _poll(client: httpx.AsyncClient, path: str, done: Any, within: float = 120) -> Any:
    with trio.fail_after(within):
        while True:  # the job moves with no event a client could wait on: poll it
            answer = await client.get(path)
            if answer.status_code == 200 and done(answer.json()):
                return answer.json()
            await trio.sleep(0.2)


async def test_kill_9_mid_job_and_restart(tmp_path: Path) -> None:
    quiet = {"api": "off", "gossip_interval_s": 0.2}
    async with (
        open_node(config(tmp_path / "s1", **quiet)) as s1,
        open_node(config(tmp_path / "s2", **quiet)) as s2,
        open_node(config(tmp_path / "s3", **quiet)) as s3,
    ):
        for seller in (s2, s3):
            await seller.connect(s1.listen_addrs[0])
        buyer_dir = tmp_path / "buyer"
        process, url = await _start_buyer(buyer_dir, s1.listen_addrs[0])
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                await _poll(
                    client, "/peers", lambda peers: sum(1 for p in peers if p["prices"]) == 3
                )
                order = {"job": JOB, "budget": 5, "min_peers": 2, "max_peers": 3}
                posted = await client.post("/jobs", json=order, headers=bearer(buyer_dir))
                assert posted.status_code == 202, posted.text
                path = "/jobs/restarted"
                paid = lambda job: any(e["event"] == "round" for e in job["events"])  # noqa: E731
                await _poll(client, path, paid)
                before = {
                    p: (await client.get(p, headers=bearer(buyer_dir))).json()
                    for p in (path, "/ledger", "/audit", "/jobs")
                }
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()
        process, url = await _start_buyer(buyer_dir, s1.listen_addrs[0])
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                after = {p: (await client.get(p)).json() for p in before}
                # the job goes on after the restart: let it end, then the books must agree
                ended = lambda job: any(e["event"] == "ended" for e in job["events"])  # noqa: E731
                final = await _poll(client, path, ended, within=180)
        finally:
            process.send_signal(signal.SIGTERM)
            await process.wait()
    job_before, job_after = before[path], after[path]
    assert {(lease["peer"], lease["price_micro"]) for lease in job_before["leases"]} == {
        (lease["peer"], lease["price_micro"]) for lease in job_after["leases"]
    }
    statement_before, statement_after = job_before["statement"], job_after["statement"]
    assert statement_after["escrowed_micro"] == statement_before["escrowed_micro"] > 0
    for peer, amount in statement_before["paid_micro"].items():
        assert statement_after["paid_micro"][peer] >= amount  # nothing paid is forgotten
    assert after["/audit"][: len(before["/audit"])] == before["/audit"]
    assert {"award"} <= {entry["kind"] for entry in before["/audit"]}
    assert [j["job_id"] for j in after["/jobs"]] == [j["job_id"] for j in before["/jobs"]]
    accounts_before, accounts_after = before["/ledger"]["accounts"], after["/ledger"]["accounts"]
    assert accounts_after["available"] == accounts_before["available"]
    assert (
        final["statement"]["released_micro"] + sum(final["statement"]["paid_micro"].values())
        == (final["statement"]["escrowed_micro"])
    )
