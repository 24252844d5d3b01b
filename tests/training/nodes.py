"""Memory-transport nodes for training tests, and a job run by all of them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from meshfed import Node, NodeConfig, open_node
from meshfed.secagg.driver import Aggregator, DeadlinePolicy
from meshfed.training.job import RoundReport, TrainingPeer
from meshfed.training.spec import JobSpec
from meshfed.transports.memory import MemoryNetwork

#: deadlines for peers that share one process and never stall
QUICK = DeadlinePolicy(join_s=1.0, grace_s=0.3, phase_max_s=20.0)


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


def job_for(nodes: Sequence[Node], job_id: str, **options: Any) -> JobSpec:
    """A job whose roster is ``nodes``, in order; ``options`` are its fields, flat or
    grouped (:meth:`JobSpec.from_document`)."""
    roster = [str(n.peer_id) for n in nodes]
    return JobSpec.from_document({"job_id": job_id, "roster": roster, **options})


def peers_for(
    nodes: Sequence[Node], spec: JobSpec, *, deadlines: DeadlinePolicy = QUICK
) -> list[TrainingPeer]:
    """Each node's part in ``spec``."""
    return [TrainingPeer(node, spec, Aggregator(node, deadlines=deadlines)) for node in nodes]


async def run_together(peers: Sequence[TrainingPeer]) -> list[list[RoundReport]]:
    """Run every peer's job at once; returns each one's reports."""
    reports: list[list[RoundReport]] = [[] for _ in peers]
    async with trio.open_nursery() as nursery:
        for peer, mine in zip(peers, reports, strict=True):
            nursery.start_soon(peer.run, mine.append)
    return reports
