"""Training peers on memory-transport nodes that can die: a node and its job live in one task,
and a killed one is gone (its node closed, its messages refused), as after a SIGKILL."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from meshfed import Node, NodeConfig, open_node
from meshfed.identity import Identity
from meshfed.secagg.driver import Aggregator, DeadlinePolicy
from meshfed.training.job import RoundReport, TrainingPeer
from meshfed.transports.memory import MemoryNetwork
from meshfed.wire import Scope

#: the join floor as deployed (3 s), so that waiting for a dead peer shows
DEPLOYED = DeadlinePolicy(join_s=3.0, grace_s=0.3, phase_max_s=20.0)


def quiet_config(data_dir: Path) -> NodeConfig:
    return NodeConfig(
        data_dir=data_dir, transport="memory", ping_interval_s=0, membership=False, mdns=False
    )


class Dying(Aggregator):
    """An aggregator whose node dies ``after_s`` into its first group run of round
    ``at_round`` (mid-protocol, secure or plain): it sets ``killed`` and never returns."""

    def __init__(self, node: Node, *, at_round: int, after_s: float, killed: trio.Event) -> None:
        super().__init__(node, deadlines=DEPLOYED)
        self.at_round, self.after_s, self.killed = at_round, after_s, killed

    async def _drive(self, session: Any, scope: Scope, *args: Any, **options: Any) -> Any:
        if scope.round // 64 == self.at_round:
            with trio.move_on_after(self.after_s):
                await super()._drive(session, scope, *args, **options)
            self.killed.set()
            await trio.sleep_forever()
        return await super()._drive(session, scope, *args, **options)


class Life:
    """One node and its part in a job, run by :meth:`run` until it ends or ``killed`` is set;
    ``digests[r]`` is the model it held after round ``r``."""

    def __init__(
        self,
        network: MemoryNetwork,
        data_dir: Path,
        make_peer: Callable[[Node], TrainingPeer],
        on_round: Callable[[Life, RoundReport], None] = lambda life, report: None,
    ) -> None:
        self.network, self.data_dir = network, data_dir
        self.identity = Identity.generate()
        self.make_peer, self.on_round = make_peer, on_round
        self.killed = trio.Event()
        self.reports: list[RoundReport] = []
        self.digests: dict[int, str] = {}
        self.peer: TrainingPeer | None = None
        self.node: Node | None = None

    @property
    def id(self) -> str:
        return str(self.identity.peer_id)

    async def run(
        self,
        go: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the node and its peer, then train once ``go`` is set (when every node of
        the job is up: arrays for a job a node does not run yet are refused)."""
        config = quiet_config(self.data_dir)
        async with open_node(config, identity=self.identity, network=self.network) as node:
            self.node = node
            self.peer = peer = self.make_peer(node)
            task_status.started()
            if go is not None:
                await go.wait()

            def seen(report: RoundReport) -> None:
                self.reports.append(report)
                self.digests[report.round] = hashlib.sha256(peer.parameters.tobytes()).hexdigest()
                self.on_round(self, report)

            async with trio.open_nursery() as nursery:

                async def train() -> None:
                    await peer.run(seen)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(train)
                await self.killed.wait()
                nursery.cancel_scope.cancel()
