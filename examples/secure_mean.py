"""Five nodes average their vectors with secure aggregation; nobody sees another's vector.

Each node holds a private vector; together they compute the mean with pairwise masks and
self-masks (Bonawitz et al.), over libp2p on 127.0.0.1. One node never shows up: the others go
on without it, and every one of them ends with the same mean of the four that took part.

Run: ``.venv/bin/python examples/secure_mean.py``
"""

from __future__ import annotations

import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import trio

from meshfed import NodeConfig, open_node
from meshfed.secagg.driver import Aggregator, DeadlinePolicy
from meshfed.secagg.protocol import GroupSpec
from meshfed.secagg.ring import Quantizer

PEERS = 5
LENGTH = 100_000


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with AsyncExitStack() as stack:
            nodes = [
                await stack.enter_async_context(
                    open_node(
                        NodeConfig(data_dir=Path(tmp, f"n{i}"), ping_interval_s=0, mdns=False)
                    )
                )
                for i in range(PEERS)
            ]
            for i, a in enumerate(nodes):
                for b in nodes[i + 1 :]:
                    await a.connect(b.listen_addrs[0])
            # Every member derives the same spec (in a job, from the signed roster).
            spec = GroupSpec(
                job=b"example",
                round=0,
                group=0,
                roster=tuple(node.peer_id for node in nodes),
                # any 3 can finish, fewer learn nothing; a majority, and at least collusion + 2
                # (default collusion 1): a member that declares others dropped still only
                # sees a sum of two honest vectors or more (SPEC 7b.2)
                threshold=3,
            )
            quantizer = Quantizer(clip=1.0, levels_bits=16, ring_bits=32)
            private = [np.random.default_rng(i).uniform(-1, 1, LENGTH).astype(np.float32)
                       for i in range(PEERS)]  # fmt: skip
            quick = DeadlinePolicy(join_s=1.0)
            means = {}

            async def take_part(i: int) -> None:
                aggregator = Aggregator(nodes[i], deadlines=quick)
                rng = np.random.default_rng(100 + i)
                means[i] = await aggregator.secure_mean(spec, private[i], quantizer, rng=rng)

            async with trio.open_nursery() as nursery:
                for i in range(PEERS - 1):  # the last node stays away
                    nursery.start_soon(take_part, i)
            exact = np.mean(private[: PEERS - 1], axis=0)
            for i, result in means.items():
                error = float(np.max(np.abs(result.value - exact)))
                print(
                    f"node {nodes[i].peer_id.short()}: mean of {len(result.survivors)} peers, "
                    f"max error {error:.2e} (one quantization level is {2 / quantizer.top:.2e})"
                )


if __name__ == "__main__":
    trio.run(main)
