"""A node that takes part in job after job: the newest ended jobs keep answering, older ones
let go of the node (their model, data and sessions are freed), and a node that stopped is
freed with its jobs."""

from __future__ import annotations

import gc
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import trio
import trio.lowlevel

from meshfed import Node
from meshfed.errors import RequestFailed
from meshfed.identity import Identity
from meshfed.stats import RejectReason
from meshfed.training.job import TrainingPeer
from meshfed.training.participation import KEEP_FINISHED, take_part
from meshfed.training.preflight import prepare
from meshfed.training.spec import JobSpec
from meshfed.training.sync import StateQuery
from meshfed.training.torch_adapter import flatten
from tests.training.nodes import job_for, memory_nodes


async def test_a_node_keeps_only_its_newest_ended_jobs_and_is_freed_once_stopped(
    tmp_path: Path,
) -> None:
    held = await _six_jobs_on_four_nodes(tmp_path)
    gc.collect()  # a node that stopped is freed: nothing global holds it or its jobs
    assert all(ref() is None for ref in held)


async def _six_jobs_on_four_nodes(tmp_path: Path) -> list[weakref.ref[Node]]:
    """Each of four nodes takes part in six jobs, one after another; checks what each still
    serves; returns weak references to the nodes, stopped."""
    held: list[weakref.ref[Node]] = []
    async with memory_nodes(tmp_path, 4) as nodes:
        held += [weakref.ref(node) for node in nodes]
        for i, node in enumerate(nodes):
            for other in nodes[i + 1 :]:
                await node.connect(other.listen_addrs[0])
        made: dict[str, list[weakref.ref[TrainingPeer]]] = {}
        done: list[str] = []

        def events(name: str, document: dict[str, Any]) -> None:
            if name == "job_done":
                done.append(document["job_id"])

        async def run(job: str) -> None:
            spec = job_for(nodes, job, rounds=1, partition="iid", lr=0.5)
            peers = made[job] = []
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(
                        lambda n: take_part(
                            n, spec, events, roster_wait=30,
                            on_peer=lambda p: peers.append(weakref.ref(p)),
                        ),
                        node,
                    )  # fmt: skip

        jobs = [f"job{j}" for j in range(KEEP_FINISHED + 2)]  # six
        for job in jobs:
            await run(job)
        assert done == [job for job in jobs for _ in nodes]
        gc.collect()
        for job in jobs[:2]:  # let go: nothing holds their peers
            assert all(ref() is None for ref in made[job]), job
        for job in jobs[2:]:
            assert all(ref() is not None for ref in made[job]), job

        async def ask(job: str) -> Any:
            return (await nodes[0].request(nodes[1].peer_id, StateQuery(job=job))).body

        answer = await ask(jobs[-1])  # an ended job still answers (a late peer settles on it)
        assert answer.next_round == 1
        try:
            await ask(jobs[0])
        except RequestFailed as failed:
            assert failed.reason == RejectReason.WRONG_CONTEXT
        else:
            raise AssertionError("a job let go of still answered")
    return held


async def test_a_job_a_node_refuses_leaves_nothing_registered_on_it(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(nodes, "refused", rounds=1, dataset="no-such-data")
        events: list[tuple[str, dict[str, Any]]] = []
        peer = await take_part(nodes[0], spec, lambda *e: events.append(e), roster_wait=1)
        assert peer is None and [name for name, _ in events] == ["job_failed"]
        scoped = [  # the node's handler tables (private): nothing of the job's scope is left
            key for table in (nodes[0]._handlers, nodes[0]._array_handlers) for key in table
            if key[1] == b"refused"
        ]  # fmt: skip
        assert scoped == []


async def test_the_node_answers_while_a_jobs_data_is_read_and_its_model_built(
    tmp_path: Path,
) -> None:
    # a large data set takes seconds to read: a node whose loop stopped meanwhile would miss
    # its peers' probes and be taken for dead
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(nodes, "big", rounds=1, dataset="synthetic", partition="iid")
        turns = 0
        async with trio.open_nursery() as nursery:

            async def count_turns() -> None:
                nonlocal turns
                while True:
                    turns += 1
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(count_turns)
            await trio.lowlevel.checkpoint()
            before = turns
            peer = await TrainingPeer.prepared(nodes[0], spec, store=nodes[0].store)
            during = turns - before
            nursery.cancel_scope.cancel()
        assert len(peer.shard) > 0
        assert during > 1  # the loop ran other tasks while the data and model were prepared
        peer.close()


def test_jobs_prepared_at_once_each_start_from_their_own_seed() -> None:
    # torch's default generator is the process's: without care, one job's model would be
    # drawn partly from another's seed, and its peers would start from different models
    roster = [str(Identity.generate().peer_id) for _ in range(4)]
    specs = [
        JobSpec.from_document(
            {
                "job_id": f"s{seed}",
                "roster": roster,
                "seed": seed,
                "dataset": "digits",
                "model_options": {"hidden": [512, 512]},
            }
        )
        for seed in range(4)
    ]
    alone = [flatten(prepare(spec).model) for spec in specs]
    with ThreadPoolExecutor(len(specs)) as pool:
        for _ in range(3):
            together = list(pool.map(lambda spec: flatten(prepare(spec).model), specs))
            assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))
    assert not np.array_equal(alone[0], alone[1])
