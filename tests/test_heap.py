"""A node process keeps what it imported out of the garbage collector's walks, and still
collects the cyclic garbage it makes afterwards (each case in a fresh interpreter: a freeze
is for the process's life)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

AFTER_A_JOBS_IMPORTS = """
import gc, json, sys, weakref
from meshfed import heap
heap.freeze_imports()
heap.freeze_imports()  # twice: still one callback
before = gc.get_freeze_count()
import meshfed.training.job  # torch and the training stack, as a node's first job imports them
gc.collect(0)  # any collection after the imports freezes them
frozen = gc.get_freeze_count() - before

class Node:
    pass

made = Node()
made.itself = made  # a reference cycle, made after the freeze
gone = weakref.ref(made)
del made
gc.collect()
print(json.dumps({
    "frozen": frozen,
    "walked": len(gc.get_objects()),
    "callbacks": sum(c is heap._after_collection for c in gc.callbacks),
    "cycle_collected": gone() is None,
}))
"""


def run_fresh(code: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_a_jobs_imports_are_frozen_and_later_cycles_still_collected() -> None:
    seen = run_fresh(AFTER_A_JOBS_IMPORTS)
    assert seen["callbacks"] == 1
    assert seen["cycle_collected"] is True
    # torch brings hundreds of thousands of objects; a collection walks a small fraction
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 100_000
    assert isinstance(seen["walked"], int) and seen["walked"] < seen["frozen"] / 10


def test_the_node_command_freezes_what_it_imported() -> None:
    code = """
    import gc, json, sys
    from unittest import mock
    from meshfed import cli
    with mock.patch.object(cli, "app", lambda: print(json.dumps(
        {"frozen": gc.get_freeze_count(), "walked": len(gc.get_objects())}))):
        cli.main()
    """
    seen = run_fresh(code)
    assert isinstance(seen["frozen"], int) and isinstance(seen["walked"], int)
    assert seen["walked"] < seen["frozen"] / 10
