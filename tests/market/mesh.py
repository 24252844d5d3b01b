"""Market test set-up shared by the driver tests: nodes that know each other's asks."""

from __future__ import annotations

from typing import Any

import trio

from meshfed.market.driver import JobHandle
from meshfed.node import Node


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
