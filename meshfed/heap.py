"""What a long-running process keeps out of the cyclic garbage collector's walks.

A node process holds hundreds of thousands of objects that live as long as it does and that
a full collection walks every time without freeing any: the functions, classes and tables of
the modules it imported (py-libp2p's and the API's as its node starts, torch's with its first
job). While a job trained, a full collection came every second or so and stopped the event
loop for 150-360 ms each (measured: a 4-node testnet on two cores).

A process that opts in (:func:`freeze_imports`: the ``meshfed-node`` command does; a library
does not freeze its embedder's heap) freezes its heap (:func:`gc.freeze`) at *quiet points*:
its node has started (:func:`settle`), a job's training stack was imported and no job's
objects exist (:func:`bulk_import`, in the market driver); collections then walk only what
came after. Each freeze follows a full collection (no garbage is frozen), and comes only where
the process holds nothing short-lived of its own: an object frozen is never collected as part
of a reference cycle, so a job frozen while it ran would stay in memory, its data set
included, once it ended (the node holds its newest ended jobs, then lets them go; tested).
What torch imports lazily during a job's first rounds is not frozen. :func:`long_lived_heap`
freezes a simulation's nodes for its run.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["bulk_import", "freeze_imports", "long_lived_heap", "settle"]

#: how many modules must have come since the last freeze for :func:`settle` to freeze again
#: (the training stack brings ~1,500; a lazily imported helper a few)
_NEW_MODULES = 50

#: how many modules the process held at its last freeze; None: it did not opt in
_frozen_with: int | None = None


def freeze_imports() -> None:
    """Opt this process in, and freeze its heap now (after a full collection, so no garbage
    is frozen): call it where the process holds nothing short-lived, e.g. before its node
    starts."""
    global _frozen_with
    gc.collect()
    gc.freeze()
    _frozen_with = len(sys.modules)


def settle() -> None:
    """A quiet point: if this process opted in and imported :data:`_NEW_MODULES` modules or
    more since its last freeze, collect and freeze again (a one-off pause of one full
    collection); else nothing."""
    if _frozen_with is not None and len(sys.modules) >= _frozen_with + _NEW_MODULES:
        freeze_imports()


@contextmanager
def bulk_import(quiet: Callable[[], bool]) -> Iterator[None]:
    """Around a large import in an opted-in process (a job's training stack: ~1,500 modules,
    seconds): no collection while it runs, then, if ``quiet()`` says the process holds nothing
    short-lived of its own, :func:`settle` (one full collection, then the freeze).

    Its objects all live as long as the process, and collections walked more of them each time
    as they came: five or six full collections of up to 250 ms during its import on a loaded
    machine, holding the GIL, so the event loop waited too; and the first collection after it
    walked all of them again. Not opted in: nothing changes."""
    if _frozen_with is None or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
        if quiet():
            settle()
    finally:
        gc.enable()


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
