"""Four nodes train one model with secure averaging, stop half way, restart, and finish.

Each node holds a non-IID shard of scikit-learn's digits and its own SQLite store. Every round
each node trains locally, the four average their models with secure aggregation (no server),
and each node commits the round (model, optimizer state, metrics) to its store. After round 2
every node is stopped; reopened from the same data directories, they resume at round 3 from
their checkpoints and finish the job with the same model.

Run: ``.venv/bin/python examples/train_and_resume.py``
"""

from __future__ import annotations

import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from meshfed import Node, NodeConfig, open_node
from meshfed.identity import load_or_create_identity
from meshfed.secagg.driver import Aggregator, DeadlinePolicy
from meshfed.training.job import RoundReport, TrainingPeer
from meshfed.training.spec import JobSpec, TrainingSpec

PEERS = 4
QUICK = DeadlinePolicy(join_s=1.0)


async def train(data_dirs: list[Path], spec: JobSpec, *, stop_after: int | None) -> None:
    """Open the nodes, connect them, and run the job on each (until ``stop_after``)."""
    async with AsyncExitStack() as stack:
        nodes: list[Node] = [
            await stack.enter_async_context(
                open_node(NodeConfig(data_dir=d, ping_interval_s=0, mdns=False))
            )
            for d in data_dirs
        ]
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                await a.connect(b.listen_addrs[0])
        peers = [
            TrainingPeer(node, spec, Aggregator(node, deadlines=QUICK), store=node.store)
            for node in nodes
        ]

        async def run(index: int) -> None:
            with trio.CancelScope() as scope:

                def show(report: RoundReport) -> None:
                    if index == 0:
                        print(f"round {report.round}: accuracy {report.accuracy:.3f}")
                    if report.round == stop_after:
                        scope.cancel()  # this node stops once the round is committed

                await peers[index].run(show)

        async with trio.open_nursery() as nursery:
            for index in range(PEERS):
                nursery.start_soon(run, index)
        if stop_after is None:
            print(f"node 0: {peers[0].state.value} ({peers[0].note})")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dirs = [Path(tmp, f"node{i}") for i in range(PEERS)]
        roster = tuple(str(load_or_create_identity(d).peer_id) for d in data_dirs)
        spec = JobSpec(
            job_id="digits-resume", roster=roster, rounds=6, training=TrainingSpec(epochs=2)
        )
        print("first run, stopped after round 2:")
        await train(data_dirs, spec, stop_after=2)
        print("restarted from the stores:")
        await train(data_dirs, spec, stop_after=None)


if __name__ == "__main__":
    trio.run(main)
