"""Eight OS processes over libp2p on 127.0.0.1, started from one bootstrap address."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.procs.harness import ROOT, Process, wait_for_full_views

NODES = 8
# mDNS off: these meshes form from one bootstrap address, and must not merge with other meshfed
# processes on this host (mDNS reaches every process on the loopback).
ENV = {"MESHFED_GOSSIP_INTERVAL_S": "0.5", "MESHFED_PING_INTERVAL_S": "0", "MESHFED_MDNS": "0"}


def start(data_dir: Path, *bootstrap: str) -> tuple[Process, dict[str, Any]]:
    args = ["-m", "meshfed.cli", "run", "--json", "--status-interval", "0.5"]
    args += ["--data-dir", str(data_dir)]
    for addr in bootstrap:
        args += ["--bootstrap", addr]
    process = Process(*args, cwd=ROOT, env=ENV)
    return process, process.read()


def test_eight_processes_from_one_bootstrap_converge_to_full_views(tmp_path: Path) -> None:
    processes: list[Process] = []
    try:
        first, started = start(tmp_path / "n0")
        processes.append(first)
        seed = started["listen"][0]
        ids = [started["peer_id"]]
        for index in range(1, NODES):
            process, started = start(tmp_path / f"n{index}", seed)
            processes.append(process)
            ids.append(started["peer_id"])
        wait_for_full_views(processes, ids, within=60)
    finally:
        for process in processes:
            process.popen.terminate()
        for process in processes:
            assert process.popen.wait(20) == 0, process.stderr


def test_a_client_only_process_joins_without_listening(tmp_path: Path) -> None:
    processes: list[Process] = []
    try:
        first, started = start(tmp_path / "r0")
        processes.append(first)
        seed = started["listen"][0]
        ids = [started["peer_id"]]
        second, started = start(tmp_path / "r1", seed)
        processes.append(second)
        ids.append(started["peer_id"])
        client = Process(
            "-m",
            "meshfed.cli",
            "run",
            "--json",
            "--status-interval",
            "0.5",
            "--data-dir",
            str(tmp_path / "c"),
            "--bootstrap",
            seed,
            cwd=ROOT,
            env={**ENV, "MESHFED_ROLES": "client-only,trainer"},
        )
        processes.append(client)
        started = client.read()
        assert started["listen"] == []  # nothing to dial: it only dials out
        ids.append(started["peer_id"])
        wait_for_full_views(processes, ids, within=30)
    finally:
        for process in processes:
            process.popen.terminate()
        for process in processes:
            assert process.popen.wait(20) == 0, process.stderr
