"""A node process keeps what it imported out of the garbage collector's walks, at quiet points
only: a job under way is never frozen (it would stay in memory once it ended), and cyclic
garbage is collected as before. Each case runs in a fresh interpreter: a freeze is for the
process's life."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QUIET_POINTS = """
import gc, json, weakref
from meshfed import heap

class Held:
    pass

heap.settle()  # not opted in: nothing
with heap.bulk_import(lambda: True):
    unopted_enabled = gc.isenabled()
unopted = gc.get_freeze_count()
heap.freeze_imports()
opted = gc.get_freeze_count()
with heap.bulk_import(lambda: False):  # not quiet: a job's objects exist
    enabled = gc.isenabled()
    import torch  # noqa
for _ in range(3):
    gc.collect(1)
busy = gc.get_freeze_count() - opted
garbage = Held()
garbage.itself = garbage  # a cycle, garbage by the quiet point
gone = weakref.ref(garbage)
del garbage
with heap.bulk_import(lambda: True):
    import meshfed.training.job  # the rest of the training stack
frozen = gc.get_freeze_count() - opted
later = Held()
later.itself = later  # made after the freeze
later_gone = weakref.ref(later)
del later
gc.collect()
print(json.dumps({
    "unopted": unopted, "unopted_enabled": unopted_enabled, "enabled": enabled,
    "busy": busy, "frozen": frozen, "walked": len(gc.get_objects()),
    "garbage_collected": gone() is None, "later_collected": later_gone() is None,
    "enabled_after": gc.isenabled(),
}))
"""

MARKET_JOB = """
import gc, json, tempfile
from pathlib import Path
import trio
from meshfed import heap
from meshfed.testing import open_memory_mesh
from tests.market.mesh import meshed

heap.freeze_imports()  # as the meshfed-node command does
freezes = []
settle = heap.settle

def watched():
    from meshfed.training.job import TrainingPeer
    peers = sum(isinstance(o, TrainingPeer) for o in gc.get_objects())
    before = gc.get_freeze_count()
    settle()
    freezes.append({"peers": peers, "frozen": gc.get_freeze_count() - before})

heap.settle = watched

async def main():
    async with open_memory_mesh(
        5, Path(tempfile.mkdtemp()), membership=True, gossip_interval_s=0.1, market_capacity=1
    ) as nodes:
        await meshed(nodes)
        order = {"job_id": "frozen", "rounds": 2, "dataset": "digits", "partition": "iid"}
        handle = await nodes[0].submit_training(order, budget=5, min_peers=4, max_peers=4)
        with trio.fail_after(120):
            final = await handle.wait()
        print(json.dumps({"state": final["state"], "freezes": freezes}))

trio.run(main)
"""

SIX_JOBS = """
import gc, json, tempfile
from pathlib import Path
import trio
from meshfed import heap
from tests.training.test_participation import _six_jobs_on_four_nodes

heap.freeze_imports()  # as the meshfed-node command does, and at its node's start
heap.settle()
before = gc.get_freeze_count()
held = trio.run(_six_jobs_on_four_nodes, Path(tempfile.mkdtemp()))  # checks the jobs it let go
gc.collect()
alive = sum(ref() is not None for ref in held)
print(json.dumps({"grew": gc.get_freeze_count() - before, "nodes": alive}))
"""


def run_fresh(code: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=ROOT,
    )
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_imports_are_frozen_at_quiet_points_only_and_cycles_still_collected() -> None:
    seen = run_fresh(QUIET_POINTS)
    assert seen["unopted"] == 0 and seen["unopted_enabled"] is True
    assert seen["enabled"] is False  # no collection walks a bulk import as it grows
    assert seen["busy"] <= 0  # not quiet: nothing frozen (the count only falls)
    # torch brings hundreds of thousands of objects; a collection then walks a small part
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 100_000
    assert isinstance(seen["walked"], int) and seen["walked"] < seen["frozen"] / 10
    assert seen["garbage_collected"] is True  # collected before the freeze, not frozen
    assert seen["later_collected"] is True
    assert seen["enabled_after"] is True


def test_a_winner_freezes_its_first_jobs_imports_before_the_job_exists() -> None:
    seen = run_fresh(MARKET_JOB)
    assert seen["state"] == "ended"
    freezes = seen["freezes"]
    # four winners in one process: the first to import freezes (the others' imports are
    # inside its own, with no collection)
    assert isinstance(freezes, list) and len(freezes) == 1
    assert freezes[0]["frozen"] > 100_000  # torch's stack
    assert all(f["peers"] == 0 for f in freezes)  # no job's training peer was there


def test_jobs_in_an_opted_in_process_are_freed_once_let_go() -> None:
    # freezing while a job ran (torch imports ~800 modules at its first optimizer step) kept
    # it for good: the node's newest ended jobs are held, and a frozen cycle is never freed
    seen = run_fresh(SIX_JOBS)
    assert seen["grew"] <= 0  # nothing was frozen during the jobs
    assert seen["nodes"] == 0


def test_the_node_command_opts_in() -> None:
    code = """
    import gc, json
    from unittest import mock
    from meshfed import cli
    with mock.patch.object(cli, "app", lambda: print(json.dumps(
        {"frozen": gc.get_freeze_count(), "walked": len(gc.get_objects())}))):
        cli.main()
    """
    seen = run_fresh(code)
    assert isinstance(seen["frozen"], int) and isinstance(seen["walked"], int)
    assert seen["walked"] < seen["frozen"] / 10
