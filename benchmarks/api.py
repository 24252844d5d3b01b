"""What serving the REST API and the dashboard costs.

1. ``GET /status`` and ``GET /metrics`` against a running node (a ``meshfed-node run`` process
   on 127.0.0.1, idle: no testnet trains meanwhile): ``status_rps`` (requests per second,
   ``--clients`` keep-alive clients at once), ``status_p99_ms`` and ``metrics_p99_ms`` (one
   client, requests one after another); goal ``status_p99_ms`` < 20.
2. A training round with and without the dashboard watching, in one run: a 4-node testnet on
   libp2p (127.0.0.1; four nodes train one small job, a fifth buys it, in this process) trains
   a warm-up phase, then ``--phases`` phases of ``--phase-s`` seconds, unwatched and watched
   in the order idle, watched, watched, idle (so that a slow drift cancels); while
   watched, another process holds a dashboard stream (``GET /events``) open to each training
   node. ``round_s_idle`` and ``round_s_watched``: the median round time the training nodes
   reported in each kind of phase (rounds that ended in a phase's first 0.3 s, while streams
   open or close, are left out); goal: watched within 5 % of idle.

Prints one JSON line. The idle core node's memory and start-up belong to the edge work.

Usage: python benchmarks/api.py [--requests N] [--clients C] [--phases P] [--phase-s S]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parents[1]
JOB = {"dataset": "digits", "partition": "iid", "local_steps": 2, "rounds": 5000}
SETTLE_S = 0.3  # the start of a phase left out: streams open or close meanwhile

#: a dashboard client in its own process (as a browser is): on "on" it opens a stream to each
#: URL and reads it to nowhere; on anything else every stream closes within 50 ms
WATCHER = """
import socket, sys, threading, urllib.parse
stop = threading.Event()
def watch(url, stop):
    where = urllib.parse.urlsplit(url)
    with socket.create_connection((where.hostname, where.port)) as s:
        s.sendall(b"GET /events HTTP/1.1\\r\\nHost: node\\r\\n\\r\\n")
        s.settimeout(0.05)
        while not stop.is_set():
            try:
                if not s.recv(65536):
                    return
            except TimeoutError:
                pass
for line in sys.stdin:
    stop.set()
    if line.strip() == "on":
        stop = threading.Event()
        for url in sys.argv[1:]:
            threading.Thread(target=watch, args=(url, stop), daemon=True).start()
"""


def _p99_ms(client: httpx.Client, path: str, requests: int) -> float:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        client.get(path).raise_for_status()
        times.append(time.perf_counter() - started)
    times.sort()
    return round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 3)


def _rps(url: str, requests: int, clients: int) -> float:
    def work() -> None:
        with httpx.Client(base_url=url) as client:
            for _ in range(requests // clients):
                client.get("/status").raise_for_status()

    threads = [threading.Thread(target=work) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return round(requests // clients * clients / (time.perf_counter() - started), 1)


async def _round_times(phases: int, phase_s: float, root: Path) -> dict[str, list[float]]:
    """Round seconds the training nodes reported, by phase kind (``idle``, ``watched``)."""
    from meshfed.testing import open_memory_mesh

    times: dict[str, list[float]] = {"idle": [], "watched": [], "warm-up": []}
    phase: dict[str, Any] = {"kind": "idle", "since": 0.0}
    trained = trio.Event()

    def observe(event: str, document: dict[str, Any]) -> None:
        if event != "round":
            return
        trained.set()
        if trio.current_time() - phase["since"] > SETTLE_S:
            times[phase["kind"]].append(float(document["seconds"]))

    async with open_memory_mesh(
        5, root, transport="libp2p", listen=["/ip4/127.0.0.1/tcp/0"], membership=True,
        gossip_interval_s=0.2, market_capacity=1,
    ) as nodes:  # fmt: skip
        buyer, trainers = nodes[0], nodes[1:]
        for node in trainers:
            await node.connect(buyer.listen_addrs[0])
        with trio.fail_after(60):
            while any(len([r for r in n.peers() if r.capabilities.prices]) < 4 for n in nodes):  # noqa: ASYNC110  # records come by gossip: no event
                await trio.sleep(0.1)
        for node in trainers:
            assert node.market is not None
            node.market.observers.append(observe)
        urls = [str(node.api_url) for node in trainers]
        watcher = await trio.lowlevel.open_process(
            [sys.executable, "-c", WATCHER, *urls], stdin=subprocess.PIPE
        )
        assert watcher.stdin is not None
        handle = await buyer.submit_training(
            {**JOB, "job_id": "round-time"}, budget=500, min_peers=4, max_peers=4
        )
        try:
            with trio.fail_after(120):
                await trained.wait()  # the job started
            phase.update(kind="warm-up")
            await trio.sleep(phase_s)  # its first rounds are slower: not counted
            for index in range(phases):  # idle, watched, watched, idle, ...: drift cancels
                kind = ("idle", "watched", "watched", "idle")[index % 4]
                await watcher.stdin.send_all(b"on\n" if kind == "watched" else b"off\n")
                phase.update(kind=kind, since=trio.current_time())
                await trio.sleep(phase_s)
        finally:
            await handle.cancel()
            await watcher.stdin.aclose()
            with trio.fail_after(10):
                await watcher.wait()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--phases", type=int, default=32)
    parser.add_argument("--phase-s", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        command = [
            sys.executable,
            "-m",
            "meshfed.cli",
            "run",
            "--json",
            "--no-mdns",
            "--data-dir",
            data_dir,
            "--log-level",
            "warning",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        node = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert node.stdout is not None
            url = json.loads(node.stdout.readline())["api"]
            with httpx.Client(base_url=url) as client:
                _p99_ms(client, "/status", 100)  # warm up
                status_p99 = _p99_ms(client, "/status", args.requests)
                metrics_p99 = _p99_ms(client, "/metrics", args.requests // 2)
            rps = _rps(url, args.requests, args.clients)
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=30)
    with tempfile.TemporaryDirectory() as root:
        times = trio.run(_round_times, args.phases, args.phase_s, Path(root))
    idle, watched = (statistics.median(times[k]) for k in ("idle", "watched"))
    print(
        json.dumps(
            {
                "status_rps": rps,
                "status_p99_ms": status_p99,
                "metrics_p99_ms": metrics_p99,
                "requests": args.requests,
                "clients": args.clients,
                "node": "idle",
                "goal_status_p99_ms_below_20": status_p99 < 20,
                "round_s_idle": round(idle, 4),
                "round_s_watched": round(watched, 4),
                "rounds_idle": len(times["idle"]),
                "rounds_watched": len(times["watched"]),
                "round_watched_over_idle": round(watched / idle, 3),
                "goal_round_watched_within_5pct": watched <= idle * 1.05,
            }
        )
    )


if __name__ == "__main__":
    main()
