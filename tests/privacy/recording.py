"""Training peers whose aggregator keeps what the peer put into every sum: the vector as it
leaves the peer (before masks, slicing or compression, which only post-process it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from meshfed.node import Node
from meshfed.secagg.driver import AggregationFailed, Aggregator, GroupResult
from meshfed.secagg.protocol import AbortReason, GroupSpec
from meshfed.secagg.ring import Quantizer
from meshfed.training.job import RoundReport, TrainingPeer
from meshfed.training.spec import JobSpec
from tests.training.nodes import QUICK

STEPS_PER_ROUND = 64  # GroupSpec.round = round * 64 + step (job.py)


@dataclass
class Sent:
    """One vector a peer put into a sum, and what the sum gave back (None: it failed)."""

    round: int
    step: int
    vector: npt.NDArray[np.float32]
    members: tuple[Any, ...]
    result: GroupResult | None = None


def never(round: int, step: int) -> bool:
    return False


class Recording(Aggregator):
    """An aggregator that records its peer's inputs; ``fail(round, step)`` makes a step fail
    for this peer before anything is sent (a group that timed out), ``crash(round, step)``
    raises right after the sum came back (the release happened, nothing after it did)."""

    def __init__(
        self,
        node: Node,
        *,
        fail: Callable[[int, int], bool] = never,
        crash: Callable[[int, int], bool] = never,
    ) -> None:
        super().__init__(node, deadlines=QUICK)
        self.fail, self.crash = fail, crash
        self.sent: list[Sent] = []

    async def _record(self, context: int, vector: Any, members: Any, run: Any) -> GroupResult:
        number, step = divmod(context, STEPS_PER_ROUND)
        if self.fail(number, step):
            raise AggregationFailed("the group timed out", reason=AbortReason.TOO_FEW)
        record = Sent(number, step, np.array(vector, np.float32), tuple(members))
        self.sent.append(record)
        record.result = await run()
        if self.crash(number, step):
            raise RuntimeError("the node dies right after the release")
        return record.result

    async def secure_mean(
        self, spec: GroupSpec, values: Any, quantizer: Quantizer, **options: Any
    ) -> GroupResult:
        async def run() -> GroupResult:
            return await super(Recording, self).secure_mean(spec, values, quantizer, **options)

        return await self._record(spec.round, values, spec.roster, run)

    async def plain_mean(self, values: Any, **where: Any) -> GroupResult:
        async def run() -> GroupResult:
            return await super(Recording, self).plain_mean(values, **where)

        return await self._record(where["round"], values, where["roster"], run)

    async def gather(self, values: Any, **where: Any) -> GroupResult:
        async def run() -> GroupResult:
            return await super(Recording, self).gather(values, **where)

        return await self._record(where["round"], values, where["roster"], run)

    async def gather_mean(self, values: Any, **where: Any) -> GroupResult:
        async def run() -> GroupResult:
            return await super(Recording, self).gather_mean(values, **where)

        return await self._record(where["round"], values, where["roster"], run)


def recorded_peers(
    nodes: Sequence[Node], spec: JobSpec, **faults: Callable[[int, int], bool]
) -> tuple[list[TrainingPeer], list[Recording]]:
    """Each node's part in ``spec``, with its store and a recording aggregator."""
    aggregators = [Recording(node, **faults) for node in nodes]
    peers = [
        TrainingPeer(node, spec, aggregator, store=node.store)
        for node, aggregator in zip(nodes, aggregators, strict=True)
    ]
    return peers, aggregators


async def run_all(peers: Sequence[TrainingPeer]) -> list[list[RoundReport] | BaseException]:
    """Run every peer's job at once; each one's reports, or what it raised."""
    outcomes: list[list[RoundReport] | BaseException] = [[] for _ in peers]

    async def one(i: int) -> None:
        try:
            outcomes[i] = await peers[i].run()
        except Exception as exc:
            outcomes[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(peers)):
            nursery.start_soon(one, i)
    return outcomes
