"""Nodes as separate OS processes over libp2p on 127.0.0.1: the foundation's acceptance."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.procs.harness import ROOT, Process, start_peer

ARRAY_FLOATS = 25_000_000  # 100 MB of float32


def test_three_processes_exchange_signed_messages_and_100mb_arrays(tmp_path: Path) -> None:
    peers = [start_peer(tmp_path / f"p{i}") for i in range(3)]
    try:
        (a, a_info), (b, b_info), (c, c_info) = peers
        ids = [info["peer_id"] for _, info in peers]
        a.call(cmd="connect", addr=b_info["listen"][0])
        b.call(cmd="connect", addr=c_info["listen"][0])
        c.call(cmd="connect", addr=a_info["listen"][0])
        for (process, _), target in zip(peers, ids[1:] + ids[:1], strict=True):
            answer = process.call(cmd="request", peer=target, text="hello")
            assert answer == {"answer": "echo:hello"}
        sent = {}
        for seed, ((process, info), target) in enumerate(
            zip(peers, ids[1:] + ids[:1], strict=True)
        ):
            result = process.call(cmd="send_array", peer=target, n=ARRAY_FLOATS, seed=seed)
            sent[f"seed-{seed}"] = (info["peer_id"], result["sha256"])
        for process, _ in peers:
            [array] = process.call(cmd="received")["arrays"]
            sender, sha = sent[array["name"]]
            assert (array["sender"], array["sha256"]) == (sender, sha)
            assert array["nbytes"] == ARRAY_FLOATS * 4
        for process, _ in peers:
            status = process.call(cmd="status")
            assert status["stats"]["rejected"] == {}
    finally:
        for process, _ in peers:
            process.stop()


def test_identity_survives_sigkill(tmp_path: Path) -> None:
    def start() -> tuple[Process, str]:
        process = Process(
            "-m",
            "meshfed.cli",
            "run",
            "--json",
            "--data-dir",
            str(tmp_path / "node"),
            cwd=ROOT,
            env={"MESHFED_MDNS": "0"},
        )
        return process, process.read()["peer_id"]

    first, peer_id = start()
    os.kill(first.popen.pid, signal.SIGKILL)
    assert first.popen.wait(10) == -signal.SIGKILL
    second, again = start()
    try:
        assert again == peer_id
    finally:
        second.popen.send_signal(signal.SIGTERM)
        assert second.popen.wait(20) == 0
        assert second.read()["event"] == "stopped"


EXPECTED_REJECTS = {
    "malformed": 2,
    "bad_field": 1,
    "bad_signature": 1,
    "sender_mismatch": 1,
    "future": 1,
    "stale": 1,
    "unknown_type": 1,
    "replayed": 1,
    "oversized": 2,  # a 5 MiB request, a sealed frame announcing 1 GiB
    "bad_array": 1,
    "truncated": 2,  # an array stream ended early, a sealed frame cut off
    "handshake_failed": 1,  # garbage on the sealed port
}


def test_hostile_process_is_rejected_and_counted_while_honest_peers_are_served(
    tmp_path: Path,
) -> None:
    peers = [start_peer(tmp_path / f"p{i}") for i in range(3)]
    try:
        (a, a_info), (b, b_info), (_, c_info) = peers
        a.call(cmd="connect", addr=b_info["listen"][0])
        a.call(cmd="connect", addr=c_info["listen"][0])
        b.call(cmd="connect", addr=c_info["listen"][0])
        hostile = Process(
            str(ROOT / "tests" / "procs" / "hostile.py"),
            *(info["listen"][0] for _, info in peers),
        )
        served = 0
        while hostile.popen.poll() is None:  # the honest peer keeps being served throughout
            for target in (b_info, c_info):
                assert a.call(cmd="request", peer=target["peer_id"], text=str(served)) == {
                    "answer": f"echo:{served}"
                }
                served += 1
        report = hostile.read()
        for addr, answers in report["answers"].items():
            assert answers["accepted"] == "accepted", addr
            for reason in ("malformed", "bad_field", "bad_signature", "sender_mismatch"):
                assert answers[reason] == reason, (addr, answers)
            for reason in ("future", "stale", "unknown_type", "replayed", "oversized"):
                assert answers[reason] == reason, (addr, answers)
            assert answers["parts_malformed"] == "malformed", (addr, answers)
            assert answers["parts_bad_array"] == "bad_array", (addr, answers)
        for process, _ in peers:
            rejected = process.call(cmd="status")["stats"]["rejected"]
            for reason, count in EXPECTED_REJECTS.items():
                assert rejected.get(reason, 0) >= count, (reason, rejected)
        assert served >= 2
        for (process, _), target in zip(peers, [b_info, c_info, a_info], strict=True):
            assert process.call(cmd="request", peer=target["peer_id"], text="after")["answer"]
    finally:
        for process, _ in peers:
            process.stop()


def test_a_second_node_on_a_data_directory_in_use_exits_naming_the_holder(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "node"
    command = ("-m", "meshfed.cli", "run", "--json", "--data-dir", str(data_dir))
    first = Process(*command, env={"MESHFED_MDNS": "0"})
    try:
        started = first.read()
        second = Process(*command, env={"MESHFED_MDNS": "0"})
        try:
            assert second.popen.wait(60) == 1
        finally:
            if second.popen.poll() is None:  # it runs beside the first: the bug
                second.popen.kill()
        deadline = time.monotonic() + 10
        while "lock file" not in second.stderr and time.monotonic() < deadline:
            time.sleep(0.05)  # the reader thread drains stderr
        assert f"process {first.popen.pid}" in second.stderr
        assert str(data_dir / "lock") in second.stderr
        assert "Traceback" not in second.stderr
        assert first.popen.poll() is None  # the first node serves on
    finally:
        first.popen.send_signal(signal.SIGTERM)
        assert first.popen.wait(20) == 0
    # the lock goes with its holder: the directory serves the next node, same identity
    again = Process(*command, env={"MESHFED_MDNS": "0"})
    try:
        assert again.read()["peer_id"] == started["peer_id"]
    finally:
        again.popen.send_signal(signal.SIGTERM)
        assert again.popen.wait(20) == 0


async def test_a_data_directory_serves_one_node_in_a_process_too(tmp_path: Path) -> None:
    import pytest

    from meshfed import NodeConfig, open_node
    from meshfed.errors import ConfigError

    config = NodeConfig(data_dir=tmp_path, ping_interval_s=0, mdns=False, membership=False)
    async with open_node(config):
        assert (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(ExceptionGroup) as refused:
            async with open_node(config):
                pass
        assert refused.group_contains(ConfigError, match=f"process {os.getpid()}")
    async with open_node(config):  # released at the first node's stop
        pass
