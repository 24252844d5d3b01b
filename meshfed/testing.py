"""Helpers for programs and tests that run many nodes in one process (like ``trio.testing``).

:func:`open_memory_mesh` opens ``n`` quiet nodes on one simulated network
(:class:`~meshfed.transports.memory.MemoryNetwork`) side by side: each node serves in its own
task of one nursery, so a failure in one of hundreds of nodes cancels the others and comes out
as one exception group, not nested hundreds of levels deep (one ``open_node`` inside the next
made a clear error into a ``RecursionError`` at 400 nodes).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from .config import NodeConfig
from .device.config import DeviceConfig
from .device.readings import ReadingsSource
from .identity import Identity
from .node import Node, open_node
from .transports.memory import MemoryNetwork

__all__ = ["free_port", "open_memory_mesh", "quiet_config"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process told where to listen)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def quiet_config(data_dir: Path, **overrides: Any) -> NodeConfig:
    """A memory-transport node that runs nothing on its own (no pings, membership, mDNS or
    device refreshes) unless ``overrides`` say so."""
    base = NodeConfig(
        data_dir=data_dir,
        transport="memory",
        ping_interval_s=0,
        membership=False,
        mdns=False,
        device=DeviceConfig(refresh_s=0),
    )
    return dataclasses.replace(base, **overrides)


@asynccontextmanager
async def open_memory_mesh(
    n: int,
    root: Path,
    *,
    seed: int = 0,
    latency: float = 0.0,
    identities: Sequence[Identity] | None = None,
    devices: Sequence[ReadingsSource] | None = None,
    **overrides: Any,
) -> AsyncIterator[list[Node]]:
    """``n`` nodes on one new simulated network, node ``i`` keeping its state in
    ``root / f"n{i}"``; yields them in order and stops them all on exit.

    Args:
        seed, latency: the network's (:class:`~meshfed.transports.memory.MemoryNetwork`).
        identities: the nodes' identities (known before they start, e.g. for a job's roster);
            by default each node's identity is loaded or created in its directory.
        devices: each node's readings source (a
            :class:`~meshfed.device.simulator.SimulatedDevice`, say); by default this machine's.
        overrides: :class:`~meshfed.config.NodeConfig` fields for every node.
    """
    if identities is not None and len(identities) != n:
        raise ValueError(f"{len(identities)} identities for {n} nodes")
    if devices is not None and len(devices) != n:
        raise ValueError(f"{len(devices)} devices for {n} nodes")
    network = MemoryNetwork(seed=seed, latency=latency)
    nodes: list[Node] = []
    stop = trio.Event()

    async def serve(index: int, *, task_status: trio.TaskStatus[Node]) -> None:
        config = quiet_config(root / f"n{index}", **overrides)
        identity = None if identities is None else identities[index]
        device = None if devices is None else devices[index]
        async with open_node(config, identity=identity, network=network, device=device) as node:
            task_status.started(node)
            await stop.wait()

    async with trio.open_nursery() as nursery:
        try:
            for index in range(n):
                nodes.append(await nursery.start(serve, index))
            yield nodes
        finally:
            stop.set()
