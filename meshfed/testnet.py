"""A local testnet: N ``meshfed-node run`` processes on 127.0.0.1, watched live.

Each node is its own OS process talking libp2p over loopback. The first node starts alone;
each next one is given the addresses of those before it as bootstrap peers. Nodes ping the
peers they are connected to with signed messages; this module reads each node's JSON status
lines and shows a live table (rich), then stops the nodes with SIGTERM (a graceful stop) and
writes a JSON summary.

The training issue turns this into the federated-learning testnet; the process handling here
stays.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

__all__ = ["run_testnet"]

_STARTUP_S = 60.0
_STOP_S = 15.0


@dataclass
class _Child:
    index: int
    process: trio.Process
    started: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    stopped: dict[str, Any] = field(default_factory=dict)
    ready: trio.Event = field(default_factory=trio.Event)


async def _read_lines(child: _Child) -> None:
    assert child.process.stdout is not None
    buffer = b""
    async for chunk in child.process.stdout:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            try:
                document = json.loads(line)
            except ValueError:
                continue
            event = document.pop("event", None)
            if event == "started":
                child.started = document
                child.ready.set()
            elif event == "status":
                child.status = document
            elif event == "stopped":
                child.stopped = document


def _table(children: list[_Child], elapsed: float, seconds: float) -> Table:
    table = Table(title=f"meshfed testnet: {len(children)} nodes, {elapsed:.0f}/{seconds:.0f} s")
    for column in ("node", "peer id", "peers", "accepted", "rejected", "bytes out", "rtt ms"):
        table.add_column(column, justify="right")
    for child in children:
        status = child.stopped or child.status
        peers = status.get("peers", [])
        stats = status.get("stats", {})
        rtts = [p["rtt_ms"] for p in peers if p.get("rtt_ms") is not None]
        table.add_row(
            str(child.index),
            child.started.get("peer_id", "starting")[-8:],
            str(len(peers)),
            str(sum(stats.get("accepted", {}).values())),
            str(sum(stats.get("rejected", {}).values())),
            str(stats.get("bytes_out", 0)),
            f"{statistics.median(rtts):.2f}" if rtts else "-",
        )
    return table


async def run_testnet(nodes: int, seconds: float, out: Path) -> int:
    """Run the testnet; returns 0 if every node reached every other one, else 1."""
    console = Console(stderr=False)
    # The nodes bootstrap off each other; mDNS stays off so that two testnets (or a testnet and
    # other meshfed nodes on this host) never merge.
    env = {
        **os.environ,
        "MESHFED_PING_INTERVAL_S": "1",
        "MESHFED_LOG_LEVEL": "warning",
        "MESHFED_MDNS": "0",
    }
    children: list[_Child] = []
    with tempfile.TemporaryDirectory(prefix="meshfed-testnet-") as workdir:
        async with trio.open_nursery() as nursery:
            for index in range(nodes):
                bootstrap = [c.started["listen"][0] for c in children]
                command = [sys.executable, "-m", "meshfed.cli", "run", "--json"]
                command += ["--status-interval", "1", "--data-dir", f"{workdir}/node-{index}"]
                for addr in bootstrap:
                    command += ["--bootstrap", addr]
                launch = functools.partial(
                    trio.run_process, command, stdout=subprocess.PIPE, env=env, check=False
                )
                process: trio.Process = await nursery.start(launch)
                child = _Child(index, process)
                children.append(child)
                nursery.start_soon(_read_lines, child)
                with trio.fail_after(_STARTUP_S):
                    await child.ready.wait()
            started = trio.current_time()
            with Live(_table(children, 0, seconds), console=console, refresh_per_second=2) as live:
                while (elapsed := trio.current_time() - started) < seconds:
                    live.update(_table(children, elapsed, seconds))
                    await trio.sleep(0.5)
                for child in children:
                    child.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(_STOP_S):
                    for child in children:
                        await child.process.wait()
                live.update(_table(children, seconds, seconds))
            for child in children:
                if child.process.returncode is None:
                    child.process.kill()
    summary = {
        "nodes": nodes,
        "seconds": seconds,
        "results": [
            {"index": c.index, "returncode": c.process.returncode, **(c.stopped or c.status)}
            for c in children
        ],
    }
    await trio.Path(out).write_text(json.dumps(summary, indent=2))
    full_mesh = all(
        len([p for p in (c.stopped or c.status).get("peers", []) if p.get("rtt_ms") is not None])
        == nodes - 1
        for c in children
    )
    clean = all(c.process.returncode == 0 for c in children)
    rtts = [
        p["rtt_ms"]
        for c in children
        for p in (c.stopped or c.status).get("peers", [])
        if p.get("rtt_ms") is not None
    ]
    median = statistics.median(rtts) if rtts else math.nan
    console.print(
        f"{'full mesh' if full_mesh else 'INCOMPLETE mesh'}, "
        f"{'clean stop' if clean else 'UNCLEAN stop'}, median ping {median:.2f} ms; "
        f"summary written to {out}"
    )
    return 0 if full_mesh and clean else 1
