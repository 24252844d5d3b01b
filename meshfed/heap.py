"""What a long-running process keeps out of the cyclic garbage collector's walks.

A node process holds half a million objects that live as long as it does and that a full
collection walks every time without freeing any: the functions, classes and tables of the
modules it imported (py-libp2p's at start, torch's with its first job). While a job trains,
a full collection came every second or so and stopped the event loop for 150-360 ms each
(measured: a 4-node testnet on two cores). :func:`freeze_imports` freezes the heap
(:func:`gc.freeze`) after imports, so that collections walk only what came since;
:func:`long_lived_heap` does the same for a simulation's run.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["freeze_imports", "long_lived_heap"]

#: how many modules must have come since the last freeze for the next one: a job's first
#: torch import brings ~1,000, a lazily imported helper a few
_NEW_MODULES = 50


#: how many modules the process held at its last freeze (None: :func:`freeze_imports` not
#: called)
_frozen_with: int | None = None


def freeze_imports() -> None:
    """From now on in this process, the collection that follows an import of
    :data:`_NEW_MODULES` modules or more freezes the heap (and this call freezes it now).

    Everything alive then is left out of later collections: what was imported, and what the
    process held at that moment (its node, the job it was preparing). What of it becomes
    garbage later is freed by its reference count as before, unless it is in a reference
    cycle: that stays. Freezes come with imports (the process start, its first job), not with
    every job, so that is bounded; cyclic garbage made after a freeze is collected as ever.
    """
    global _frozen_with
    _frozen_with = len(sys.modules)
    gc.freeze()
    if _after_collection not in gc.callbacks:
        gc.callbacks.append(_after_collection)


def _after_collection(phase: str, info: dict[str, Any]) -> None:
    global _frozen_with
    if (
        phase == "stop"
        and _frozen_with is not None
        and len(sys.modules) >= _frozen_with + _NEW_MODULES
    ):
        _frozen_with = len(sys.modules)
        gc.freeze()


@contextmanager
def long_lived_heap() -> Iterator[None]:
    """Keep the cyclic garbage collector off what the caller set up, for the block's life.

    For a simulation: hundreds of nodes, models and data sets live as long as the run (half a
    million objects): a full collection walks them all (0.1-0.3 s, every second or two at the
    default thresholds, measured) and never frees any. They are frozen out of it, and young
    objects are collected every 20,000 allocations instead of 700 (a round allocates millions;
    a cycle waits a little longer)."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
