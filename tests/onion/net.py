"""Real nodes over libp2p on 127.0.0.1 for the onion driver's tests: gossip membership,
stores on disk. All share one /24, so the one-relay-per-prefix rule is off here (it is
tested on its own in ``test_paths.py``): the transport reaches a peer that dialled it at the
connection's source address, which on loopback is 127.0.0.1 whatever address it listens on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from meshfed import Node, NodeConfig, open_node
from meshfed.control import Text


@dataclass
class Member:
    name: str
    config: NodeConfig
    node: Node
    scope: trio.CancelScope
    stopped: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        """Stop the node at once (its tasks cancelled, as by a crash, but the store closed)."""
        self.scope.cancel()


def config_for(tmp_path: Path, name: str, *, relay: bool, **overrides: Any) -> NodeConfig:
    return NodeConfig(
        data_dir=tmp_path / name,
        transport="libp2p",
        listen=["/ip4/127.0.0.1/tcp/0"],
        onion_distinct_prefixes=False,
        roles=["relay"] if relay else ["trainer"],
        mdns=False,
        market=False,
        api="off",
        ping_interval_s=0,
        gossip_interval_s=0.2,
        request_timeout_s=5.0,
        **overrides,
    )


class Mesh:
    """Nodes started in one nursery, each stoppable on its own."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.members: dict[str, Member] = {}
        #: the texts the destination's handler was run for
        self.served: list[str] = []

    async def start(self, config: NodeConfig, name: str) -> Member:
        ready: list[Member] = []
        event = trio.Event()

        async def run() -> None:
            scope = trio.CancelScope()
            with scope:
                async with open_node(config) as node:
                    member = Member(name, config, node, scope)
                    ready.append(member)
                    event.set()
                    await trio.sleep_forever()
            if ready:
                ready[0].stopped.set()

        self.nursery.start_soon(run)
        await event.wait()
        self.members[name] = ready[0]
        return ready[0]

    def bootstrap(self) -> list[str]:
        first = next(iter(self.members.values()))
        return first.node.listen_addrs[:1]

    def node(self, name: str) -> Node:
        return self.members[name].node


async def eventually(predicate: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = trio.current_time() + within
    while not predicate():
        assert trio.current_time() < deadline, f"{what} not within {within} s"
        await trio.sleep(0.1)


def knows_keys(node: Node, others: list[Node]) -> bool:
    """True once ``node`` holds every other's record with its onion keys."""
    assert node.membership is not None
    table = node.membership.table
    for other in others:
        record = table.get(other.peer_id)
        if record is None or not record.capabilities.onion_keys:
            return False
    return True


@asynccontextmanager
async def onion_mesh(
    tmp_path: Path,
    relays: int,
    *,
    relay_overrides: dict[str, Any] | None = None,
    sender_overrides: dict[str, Any] | None = None,
) -> AsyncIterator[Mesh]:
    """``relays`` relays (``r0`` ...), a sender ``alice`` and a destination ``dest`` that
    answers :class:`Text` requests (noting them in ``mesh.served``), with full views."""
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        for i in range(relays):
            extra = {"bootstrap": mesh.bootstrap()} if i else {}
            config = config_for(tmp_path, f"r{i}", relay=True, **extra, **(relay_overrides or {}))
            await mesh.start(config, f"r{i}")
        for name, overrides in (("dest", {}), ("alice", sender_overrides or {})):
            config = config_for(
                tmp_path, name, relay=False, bootstrap=mesh.bootstrap(), **overrides
            )
            await mesh.start(config, name)
        dest = mesh.node("dest")

        async def echo(text: Text) -> Text:
            mesh.served.append(text.text)
            return Text(text=f"echo:{text.text}")

        assert dest.onion is not None
        dest.onion.handle(Text, echo, direct=True)
        nodes = [m.node for m in mesh.members.values()]
        for node in nodes:
            await eventually(
                lambda node=node: knows_keys(node, [n for n in nodes if n is not node]),
                within=30,
                what=f"{node.peer_id.short()}'s full view with onion keys",
            )
        yield mesh
        nursery.cancel_scope.cancel()
