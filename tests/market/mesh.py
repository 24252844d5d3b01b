"""Market test set-up shared by the driver tests: nodes that know each other's asks, nodes
that die and come back, and waits for a job's events and for ledgers to agree."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from meshfed.config import NodeConfig
from meshfed.market.driver import JobHandle
from meshfed.market.ledger import earned_account, paid_account
from meshfed.node import Node, open_node
from meshfed.testing import open_memory_mesh
from meshfed.transports.memory import MemoryNetwork


async def meshed(nodes: list[Node], within: float = 20.0) -> None:
    """Connect every node to the first and wait until each knows every other's record, asks
    included."""
    for node in nodes[1:]:
        await node.connect(nodes[0].listen_addrs[0])
    with trio.fail_after(within):
        while True:
            complete = all(
                sum(1 for r in node.peers() if r.capabilities.prices) == len(nodes) - 1
                for node in nodes
            )
            if complete:
                return
            await trio.sleep(0.1)


@asynccontextmanager
async def market_mesh(n: int, root: Path, **overrides: Any) -> AsyncIterator[list[Node]]:
    """``n`` memory nodes that gossip every 0.1 s, each knowing every other's asks
    (:func:`meshed`); ``overrides`` are more :class:`~meshfed.config.NodeConfig` fields."""
    async with open_memory_mesh(
        n, root, membership=True, gossip_interval_s=0.1, **overrides
    ) as nodes:
        await meshed(nodes)
        yield nodes


async def until_event(
    handle: JobHandle, wanted: str, *, within: float = 60.0, **fields: Any
) -> dict[str, Any]:
    """The job's first ``wanted`` event whose fields include ``fields``, as it happens."""
    with trio.fail_after(within):
        async for event in handle.watch():
            if event["event"] == wanted and all(event.get(k) == v for k, v in fields.items()):
                return dict(event)
            if event["event"] == "ended":
                raise AssertionError(f"the job ended before {wanted}: {event}")
    raise AssertionError("a job's events end with its end")


class RestartableNodes:
    """Nodes on one memory network, node ``i`` in ``root / f"n{i}"``, that a test can kill
    and start again from the same directory (a restart). Use inside a nursery that outlives
    them; :meth:`stop_all` before it ends."""

    def __init__(self, network: MemoryNetwork, root: Path, config: Callable[[Path], NodeConfig]):
        self._network, self._root, self._config = network, root, config
        self._stops: dict[int, trio.Event] = {}
        self._closed: dict[int, trio.Event] = {}

    async def start(self, nursery: trio.Nursery, index: int) -> Node:
        """Node ``index``, started (again, once its directory is free)."""
        if index in self._closed:
            await self._closed[index].wait()
        self._stops[index], self._closed[index] = trio.Event(), trio.Event()
        node: Node = await nursery.start(self._serve, index)
        return node

    def kill(self, node: Node, index: int) -> None:
        """Crash ``node`` on the network (nothing more gets through) and stop it."""
        self._network.crash(node.peer_id)
        self._stops[index].set()

    def stop_all(self) -> None:
        for stop in self._stops.values():
            stop.set()

    async def _serve(self, index: int, *, task_status: trio.TaskStatus[Node]) -> None:
        stop, closed = self._stops[index], self._closed[index]
        async with open_node(self._config(self._root / f"n{index}"), network=self._network) as node:
            task_status.started(node)
            await stop.wait()
        closed.set()


async def until_ledgers_agree(buyer: Node, seller: Node, job: str, within: float = 30.0) -> None:
    """Wait until ``seller`` earned in ``job`` what ``buyer`` paid it (notes are resent on a
    retry timer: a ledger has no event to wait for)."""
    assert buyer.market is not None and seller.market is not None
    with trio.fail_after(within):
        while seller.market.ledger.balance(  # noqa: ASYNC110 - a ledger has no event
            earned_account(job, buyer.peer_id)
        ) != buyer.market.ledger.balance(paid_account(job, seller.peer_id)):
            await trio.sleep(0.1)
