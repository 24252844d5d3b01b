"""Memory-transport nodes for training tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from meshfed import Node, NodeConfig, open_node
from meshfed.transports.memory import MemoryNetwork


@asynccontextmanager
async def memory_nodes(
    tmp_path: Path, n: int, *, seed: int = 3, latency: float = 0.0
) -> AsyncIterator[list[Node]]:
    """``n`` nodes on one simulated network, their identities and stores in ``tmp_path/n{i}``
    (opening them again is a restart)."""
    network = MemoryNetwork(seed=seed, latency=latency)
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(n):
            config = NodeConfig(
                data_dir=tmp_path / f"n{i}",
                transport="memory",
                ping_interval_s=0,
                membership=False,
                mdns=False,
            )
            nodes.append(await stack.enter_async_context(open_node(config, network=network)))
        yield nodes
