"""Time for three node processes to find each other by mDNS alone (no bootstrap), in a
network namespace of their own whose loopback carries multicast (needs root and iproute2).

Prints one JSON line: ``median_s_to_full_view`` over ``--runs`` runs, and for reference in the
same run ``median_s_to_started`` (process start until every node serves: the part of the time
that is not discovery).

Usage: python benchmarks/mdns.py [--runs 3] [--nodes 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_namespace() -> str:
    name = f"meshfed-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    for command in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "set", "lo", "multicast", "on"],
        ["ip", "route", "add", "224.0.0.0/4", "dev", "lo"],
    ):
        subprocess.run(["ip", "netns", "exec", name, *command], check=True)
    return name


def one_run(namespace: str, nodes: int, workdir: Path) -> tuple[float, float]:
    """Seconds until all serve, and until every node lists every other one."""
    env = {**os.environ, "MESHFED_PING_INTERVAL_S": "0", "MESHFED_LOG_LEVEL": "warning"}
    begun = time.monotonic()
    processes = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                namespace,
                sys.executable,
                "-m",
                "meshfed.cli",
                "run",
                "--json",
                "--status-interval",
                "0.2",
                "--data-dir",
                str(workdir / f"n{i}"),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(nodes)
    ]
    try:
        ids = []
        for process in processes:
            assert process.stdout is not None
            ids.append(json.loads(process.stdout.readline())["peer_id"])
        serving = time.monotonic() - begun
        views: dict[int, set[str]] = {}
        while not all(views.get(i) == set(ids) - {ids[i]} for i in range(nodes)):
            if time.monotonic() - begun > 60:
                raise SystemExit("no full view within 60 s")
            for index, process in enumerate(processes):
                assert process.stdout is not None
                status = json.loads(process.stdout.readline())
                views[index] = {m["peer_id"] for m in status.get("members", [])}
        return serving, time.monotonic() - begun
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    namespace = make_namespace()
    try:
        started, full = [], []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as workdir:
                serving, complete = one_run(namespace, args.nodes, Path(workdir))
            started.append(serving)
            full.append(complete)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)
    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "runs": args.runs,
                "median_s_to_full_view": round(statistics.median(full), 2),
                "median_s_to_started": round(statistics.median(started), 2),
                "median_s_discovery": round(
                    statistics.median(f - s for f, s in zip(full, started, strict=True)), 2
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
