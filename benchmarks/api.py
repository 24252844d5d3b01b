"""What serving the REST API costs: ``GET /status`` and ``GET /metrics`` against a running
node (a ``meshfed-node run`` process on 127.0.0.1, idle: no testnet trains meanwhile).

Prints one JSON line: ``status_rps`` (requests per second, ``--clients`` keep-alive clients
at once), ``status_p99_ms`` and ``metrics_p99_ms`` (one client, requests one after another),
and the issue's goal (``status_p99_ms`` < 20). The round time with and without a dashboard
client, and the idle core node's memory and start-up, belong to the dashboard and edge work.

Usage: python benchmarks/api.py [--requests N] [--clients C]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
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
            }
        )
    )


if __name__ == "__main__":
    main()
