"""1,000 nodes on the memory transport in one process: start, 10 signed requests each, stop.

Prints one JSON line. The reference measured in the same run is the same number of messages
passed between the same number of trio tasks over bare memory channels (no signatures, no
transport), so ``ratio`` is what the node stack costs per message over trio itself.

Usage: python benchmarks/memory_mesh.py [--nodes N] [--fanout K] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from meshfed import Envelope, Identity, NodeConfig, open_node
from meshfed.control import Text
from meshfed.transports.memory import MemoryNetwork


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def mesh(nodes: int, fanout: int, seed: int) -> dict[str, float | int | bool]:
    rng = random.Random(seed)
    network = MemoryNetwork(seed=seed, latency=0.001)
    delivered = 0

    async def count(envelope: Envelope, text: Text) -> None:
        nonlocal delivered
        delivered += 1

    config = NodeConfig(
        data_dir=Path("/nonexistent"),
        store_file="",  # many identities, one fake data_dir: no store
        transport="memory",
        ping_interval_s=0,
        membership=False,
    )
    identities = [Identity.generate() for _ in range(nodes)]
    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        members = [
            await stack.enter_async_context(open_node(config, identity=i, network=network))
            for i in identities
        ]
        for member in members:
            member.handle(Text, count)
        up = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for member in members:
                for target in rng.sample([m for m in members if m is not member], fanout):
                    nursery.start_soon(member.request, target.peer_id, Text(text="hi"))
        sent = time.perf_counter()
    stopped = time.perf_counter()
    return {
        "nodes": nodes,
        "messages": nodes * fanout,
        "delivered": delivered,
        "all_delivered": delivered == nodes * fanout,
        "start_s": round(up - started, 3),
        "send_s": round(sent - up, 3),
        "stop_s": round(stopped - sent, 3),
    }


async def bare_trio(nodes: int, fanout: int, seed: int) -> float:
    """The reference: the same request/answer pattern over bare trio memory channels."""
    rng = random.Random(seed)
    inboxes = [
        trio.open_memory_channel[tuple[int, trio.MemorySendChannel[int]]](0) for _ in range(nodes)
    ]
    started = time.perf_counter()
    async with trio.open_nursery() as servers:

        async def serve(
            receive: trio.MemoryReceiveChannel[tuple[int, trio.MemorySendChannel[int]]],
        ) -> None:
            async for value, reply in receive:
                await reply.send(value)

        for _, receive in inboxes:
            servers.start_soon(serve, receive)

        async def ask(target: int) -> None:
            reply_send, reply_receive = trio.open_memory_channel[int](1)
            await inboxes[target][0].send((target, reply_send))
            await reply_receive.receive()

        async with trio.open_nursery() as clients:
            for source in range(nodes):
                for target in rng.sample([t for t in range(nodes) if t != source], fanout):
                    clients.start_soon(ask, target)
        servers.cancel_scope.cancel()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--fanout", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = trio.run(mesh, args.nodes, args.fanout, args.seed)
    rss = peak_rss_mb()
    baseline = trio.run(bare_trio, args.nodes, args.fanout, args.seed)
    result.update(
        {
            "peak_rss_mb": round(rss, 1),
            "rss_kb_per_node": round(rss * 1024 / args.nodes, 1),
            "baseline_send_s": round(baseline, 3),
            "ratio": round(float(result["send_s"]) / baseline, 1),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
