"""Nodes on the real libp2p transport with their API on a loopback port, for the API tests."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx

from meshfed.config import NodeConfig
from meshfed.node import Node, open_node

ROOT = Path(__file__).resolve().parents[2]


def config(data_dir: Path, **overrides: Any) -> NodeConfig:
    """A libp2p node with its API on, the market and membership, no pings or mDNS."""
    base = NodeConfig(data_dir=data_dir, ping_interval_s=0, mdns=False)
    return dataclasses.replace(base, **overrides)


@asynccontextmanager
async def api_node(
    data_dir: Path, **overrides: Any
) -> AsyncIterator[tuple[Node, httpx.AsyncClient]]:
    """A node and an HTTP client of its API (no token sent)."""
    async with open_node(config(data_dir, **overrides)) as node:
        assert node.api_url is not None
        async with httpx.AsyncClient(base_url=node.api_url, timeout=10) as client:
            yield node, client


def bearer(data_dir: Path) -> dict[str, str]:
    """The Authorization header with the node's token."""
    return {"Authorization": f"Bearer {(data_dir / 'api.token').read_text().strip()}"}


@contextmanager
def node_process(data_dir: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``meshfed-node run`` in a process with its API on; yields it and the API's URL."""
    address = data_dir / "api.json"
    address.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "meshfed.cli",
        "run",
        "--data-dir",
        str(data_dir),
        "--no-mdns",
        "--json",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        assert started["event"] == "started", started
        yield process, started["api"]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
