"""Membership at scale on the memory transport, in virtual time: convergence, traffic,
failure detection, false positives.

Each node starts with one random bootstrap peer. Prints one JSON line:
``rounds_to_converge`` / ``seconds_to_converge`` (every node holds a full view, or with
``--max-view`` a full partial view and every node is in someone's view), ``bytes_per_node_s``
in steady state, then 10% of the nodes are killed at once: ``detect_s_p99`` (time until every
live node dropped every dead one, 99th percentile over (observer, victim) pairs) and
``false_positive_rate`` (live peers wrongly dropped, over a run with ``--loss`` packet loss).
The reference in the same run is the protocol's own bound: ``detect_bound_s`` (SWIM: every
member probed within two passes, then the prober's suspicion timeout, then each other
observer's own: a third party's claim only starts suspicion, SPEC 7a).

The defaults (500 nodes, Cyclon views of 20) finish in a few minutes; ``--max-view 0`` keeps
full views, whose anti-entropy digests grow with the mesh (1,000 full views take far longer).

Virtual time (trio's MockClock) keeps the CPU cost of simulating 1,000 nodes in one process out
of the protocol's timers.

Usage: python benchmarks/membership.py [--nodes 500] [--max-view 20 (0: full)] [--loss 0.02]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import trio
import trio.testing

from meshfed import Identity, Node, NodeConfig, PeerId, open_node
from meshfed.membership.records import Capabilities, Role
from meshfed.membership.service import Membership, MembershipConfig
from meshfed.transports.memory import MemoryNetwork


class Sim:
    def __init__(self, nodes: int, max_view: int, loss: float, seed: int) -> None:
        self.n = nodes
        self.rng = random.Random(seed)
        self.network = MemoryNetwork(seed=seed, latency=0.005, jitter=0.005, loss=loss)
        self.config = MembershipConfig(gossip_interval_s=1.0, fanout=2, max_view=max_view or None)
        self.members: list[tuple[Node, Membership, trio.CancelScope]] = []

    async def start(self, nursery: trio.Nursery) -> None:
        for index in range(self.n):
            await nursery.start(self._run, index)

    async def _run(self, index: int, task_status: trio.TaskStatus[None]) -> None:
        config = NodeConfig(
            data_dir=Path("/nonexistent"),
            store_file="",  # many identities, one fake data_dir: no store
            transport="memory",
            ping_interval_s=0,
            membership=False,
        )
        with trio.CancelScope() as scope:
            async with open_node(
                config, identity=Identity.generate(), network=self.network
            ) as node:
                if self.members:
                    await node.connect(self.rng.choice(self.members)[0].listen_addrs[0])
                membership = Membership(
                    node,
                    Capabilities(roles=[Role.TRAINER.value]),
                    config=self.config,
                    rng=random.Random(self.rng.random()),
                )
                async with trio.open_nursery() as inner:
                    await inner.start(membership.run)
                    self.members.append((node, membership, scope))
                    task_status.started()
                    await trio.sleep_forever()

    def views(self, alive: list[int]) -> dict[PeerId, set[PeerId]]:
        return {
            self.members[i][0].peer_id: {r.peer for r in self.members[i][1].peers()} for i in alive
        }

    def converged(self, alive: list[int]) -> bool:
        views = self.views(alive)
        if any(len(v) < self.want(alive) for v in views.values()):
            return False
        seen = set().union(*views.values())
        return seen >= set(views)  # everyone is in someone's view

    def want(self, alive: list[int]) -> int:
        """A full view: everyone else, or a partial view with at most one entry out on a
        shuffle (Cyclon takes the partner out until its reply arrives)."""
        if self.config.max_view is None:
            return len(alive) - 1
        return min(len(alive) - 1, self.config.max_view - 1)

    def bytes_out(self) -> int:
        return sum(node.stats.bytes_out for node, _, _ in self.members)


async def wait_converged(sim: Sim, alive: list[int], limit_s: float) -> float:
    """Virtual seconds until ``sim`` converged; exits if it does not within ``limit_s``."""
    started = trio.current_time()
    while True:
        if sim.converged(alive):
            return trio.current_time() - started
        views = sim.views(alive)
        unseen = len(set(views) - set().union(*views.values()))
        short = sum(len(v) < sim.want(alive) for v in views.values())
        print(
            f"t={trio.current_time() - started:.1f}s short views={short} unseen={unseen}",
            file=sys.stderr,
            flush=True,
        )
        if trio.current_time() - started > limit_s:
            raise SystemExit(f"no convergence within {limit_s} s of virtual time")
        await trio.sleep(0.5)


async def measure(args: argparse.Namespace) -> dict[str, float | int]:
    sim = Sim(args.nodes, args.max_view, 0.0, args.seed)
    result: dict[str, float | int] = {"nodes": args.nodes, "max_view": args.max_view or args.nodes}
    async with trio.open_nursery() as nursery:
        await sim.start(nursery)
        everyone = list(range(args.nodes))
        took = await wait_converged(sim, everyone, args.limit_s)
        result["seconds_to_converge"] = round(took, 2)
        result["rounds_to_converge"] = round(took / sim.config.gossip_interval_s, 1)

        before, at = sim.bytes_out(), trio.current_time()
        await trio.sleep(10)
        result["bytes_per_node_s"] = round(
            (sim.bytes_out() - before) / args.nodes / (trio.current_time() - at)
        )

        victims = sim.rng.sample(everyone, max(1, args.nodes // 10))
        survivors = [i for i in everyone if i not in victims]
        dead = {sim.members[i][0].peer_id for i in victims}
        for i in victims:
            sim.network.crash(sim.members[i][0].peer_id)
            sim.members[i][2].cancel()
        killed = trio.current_time()
        dropped_at: dict[tuple[int, PeerId], float] = {}
        while len(dropped_at) < len(survivors) * len(dead):
            await trio.sleep(0.25)
            now = trio.current_time()
            for i in survivors:
                view = {r.peer for r in sim.members[i][1].peers()}
                for victim in dead - view:
                    dropped_at.setdefault((i, victim), now - killed)
            if now - killed > args.limit_s:
                break
        delays = sorted(dropped_at.values()) or [float("nan")]
        result["detect_s_p50"] = round(statistics.median(delays), 2)
        result["detect_s_p99"] = round(delays[min(len(delays) - 1, int(0.99 * len(delays)))], 2)
        result["detected_fraction"] = round(len(dropped_at) / (len(survivors) * len(dead)), 4)
        result["detect_bound_s"] = round(
            2 * min(args.nodes, sim.config.max_view or args.nodes) * sim.config.swim.period_s
            + 2 * sim.members[survivors[0]][1].swim.suspicion_s(),
            2,
        )
        nursery.cancel_scope.cancel()

    lossy = Sim(args.nodes, args.max_view, args.loss, args.seed + 1)
    async with trio.open_nursery() as nursery:
        await lossy.start(nursery)
        everyone = list(range(args.nodes))
        await wait_converged(lossy, everyone, args.limit_s)
        pairs = wrong = 0
        for _ in range(int(args.soak_s / 2)):  # every node is alive: any death is a false one
            await trio.sleep(2)
            for _node, membership, _scope in lossy.members:
                wrong += len(membership.swim.dead_members())
                pairs += len(membership.swim.live_members()) + len(membership.swim.dead_members())
        result["loss"] = args.loss
        result["false_positive_rate"] = round(wrong / max(pairs, 1), 5)
        nursery.cancel_scope.cancel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--max-view", type=int, default=20, help="0: full views")
    parser.add_argument("--loss", type=float, default=0.02)
    parser.add_argument("--soak-s", type=float, default=20.0, help="virtual seconds under loss")
    parser.add_argument("--limit-s", type=float, default=300.0, help="give up after (virtual)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    wall = time.perf_counter()
    result = trio.run(measure, args, clock=trio.testing.MockClock(autojump_threshold=0))
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
