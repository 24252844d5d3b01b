"""Eight OS processes over libp2p: six relays, a sender and a destination. A request and its
reply over three relays each way; nothing at the destination names the sender; a relay
SIGKILLed mid-flight makes the sender retry on new paths, and the destination acts once.
A relay SIGKILLed right after it took a packet, and started again, drops that packet's
replay."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from meshfed import PeerId
from meshfed.onion import Hop, build_packet, fragment
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


def _packet(hops: list[tuple[str, dict[str, Any]]]) -> str:
    """A packet along ``(peer id, onion_key answer)`` hops, hex."""
    path = [Hop(PeerId.from_string(peer), bytes.fromhex(key["key"])) for peer, key in hops]
    body = fragment(b"replay me", os.urandom(16))[0]
    built = build_packet(path, body, epoch=hops[0][1]["epoch"], random_bytes=os.urandom)
    return built.packet.hex()


def test_a_relay_killed_right_after_taking_a_packet_drops_its_replay_when_restarted(
    tmp_path: Path,
) -> None:
    relay, started = _start(tmp_path / "relay", "relay", "info", [])
    relay_id, relay_addr = started["peer_id"], started["listen"][0]
    sender, started = _start(tmp_path / "sender", "trainer", "info", [relay_addr])
    sender_id = started["peer_id"]
    try:
        hops = [(relay_id, relay.call(cmd="onion_key")), (sender_id, sender.call(cmd="onion_key"))]
        packet = _packet(hops)
        assert sender.call(cmd="packet", addr=relay_addr, packet=packet) == {"sent": relay_id}
        relay.popen.send_signal(signal.SIGKILL)  # at once: the tag was written before the ack
        assert relay.popen.wait(timeout=10) == -signal.SIGKILL

        relay, started = _start(tmp_path / "relay", "relay", "info", [])
        assert started["peer_id"] == relay_id
        relay_addr = started["listen"][0]
        assert sender.call(cmd="packet", addr=relay_addr, packet=packet) == {"sent": relay_id}
        assert relay.call(cmd="stats")["onion"].get("drop.replayed") == 1
        fresh = _packet(hops)  # the restarted relay still relays what it has not seen
        assert sender.call(cmd="packet", addr=relay_addr, packet=fresh) == {"sent": relay_id}
        begun = time.monotonic()
        while relay.call(cmd="stats")["onion"].get("relayed") != 1:
            assert time.monotonic() - begun < 10, "the fresh packet was not relayed"
            time.sleep(0.1)
        assert relay.call(cmd="stats")["onion"].get("drop.replayed") == 1
    finally:
        sender.stop()
        relay.stop()
