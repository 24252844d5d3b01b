"""Eight OS processes over libp2p: six relays, a sender and a destination. A request and its
reply over three relays each way; nothing at the destination names the sender; a relay
SIGKILLed mid-flight makes the sender retry on new paths, and the destination acts once."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

from meshfed import PeerId
from tests.procs.harness import ROOT, Process

PEER = str(ROOT / "tests" / "onion" / "onion_peer.py")
RELAYS = 6


def _start(data_dir: Path, role: str, log_level: str, bootstrap: list[str]) -> tuple[Process, dict]:
    process = Process(PEER, str(data_dir), role, log_level, *bootstrap)
    return process, process.read(timeout=90)


def _wait_for_keys(processes: list[Process], *, within: float) -> None:
    begun = time.monotonic()
    for process in processes:
        while process.call(cmd="keys")["peers"] < len(processes) - 1:
            assert time.monotonic() - begun < within, "onion keys did not spread"
            time.sleep(0.3)


def _answer(process: Process, events: list[dict], timeout: float = 60) -> dict:
    """Read until a line that is not an event; keep the events."""
    while True:
        line = process.read(timeout)
        if "event" not in line:
            return line
        events.append(line)


def test_eight_processes_route_privately_and_survive_a_killed_relay(tmp_path: Path) -> None:
    processes: list[Process] = []
    try:
        first, started = _start(tmp_path / "r0", "relay", "info", [])
        processes.append(first)
        ids = {"r0": started["peer_id"]}
        bootstrap = started["listen"][:1]
        for name in [f"r{i}" for i in range(1, RELAYS)] + ["dest", "alice"]:
            role = "trainer" if name in ("dest", "alice") else "relay"
            process, started = _start(tmp_path / name, role, "info", bootstrap)
            processes.append(process)
            ids[name] = started["peer_id"]
        alice, dest = processes[-1], processes[-2]
        alice_addr = started["listen"][0]
        _wait_for_keys(processes, within=90)

        events: list[dict] = []
        alice.call_nowait(cmd="request", peer=ids["dest"], text="hi", privacy="high", within=5)
        assert _answer(alice, events) == {"answer": "echo:hi"}
        assert dest.read(30) == {"event": "serving", "text": "hi"}
        events.clear()

        # SIGKILL the first relay of the reply path while the destination works on the request
        alice.call_nowait(
            cmd="request", peer=ids["dest"], text="slow", privacy="high", within=4, attempts=4
        )
        path = alice.read(30)
        assert path["event"] == "path" and len(path["forward"]) == len(path["reply"]) == 3
        serving = dest.read(30)
        assert serving == {"event": "serving", "text": "slow"}
        victim = processes[list(ids.values()).index(path["reply"][0])]
        victim.popen.kill()
        answer = _answer(alice, events, timeout=60)
        assert answer == {"answer": "echo:slow"}
        assert len(events) >= 1  # at least one more attempt, on new paths
        stats = dest.call(cmd="stats")
        assert stats["onion"]["requests_served"] == 2  # "hi" and "slow", each once
        assert stats["onion"]["requests_repeated"] >= 1
        dest.stop()

        # nothing the destination keeps names the sender (logging at info: at debug the
        # transport logs every connection, and gossip connects every pair of peers)
        sender = ids["alice"]
        address = alice_addr.split("/p2p/")[0]
        store_bytes = b"".join(p.read_bytes() for p in (tmp_path / "dest").glob("store.sqlite3*"))
        with closing(sqlite3.connect(tmp_path / "dest" / "store.sqlite3")) as db:
            assert db.execute("SELECT count(*) FROM onion_replay").fetchone()[0] >= 2
        port = address.rsplit("/", 1)[1]
        logs = "".join(dest._stderr)
        for trace in (sender, f"/tcp/{port}", f":{port}"):
            assert trace not in logs
            assert trace not in str(stats)
            assert trace.encode() not in store_bytes
        assert PeerId.from_string(sender).raw not in store_bytes
    finally:
        for process in processes:
            process.stop()
