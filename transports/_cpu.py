"""CPU time charged to the peer each task works for, and fair turns between peers.

A trio instrument (:class:`CpuAccounting`) reads the thread's CPU clock around every step of
a task that a peer owns (:meth:`CpuAccounting.own`: the task serving its requests, reading its
connection, serving its stream) and charges the difference to that peer in a
:class:`~meshfed.ratelimit.CpuShares` whose clock is the thread's CPU clock: each busy peer
earns its share of the CPU the node actually got, whatever else runs on the machine. Before
a peer's next frame is read or its next stream served, :meth:`CpuAccounting.turn` waits while
it owes CPU time and other peers' work is running, so a peer whose messages are expensive is
read more slowly (TCP holds the rest) while every other peer is served from its own share;
when nobody else wants the CPU, nobody waits.
"""

from __future__ import annotations

import time

import trio

from meshfed.identity import PeerId
from meshfed.ratelimit import CpuShares

__all__ = ["UNAUTHENTICATED", "CpuAccounting"]

#: the key unauthenticated work is charged to (accepting sealed connections, their handshakes):
#: together it takes one peer's share
UNAUTHENTICATED = None

#: shortest and longest pause of a peer in debt before it looks again whether others were
#: busy meanwhile (the shortest is long enough to see a busy peer's next request arrive)
MIN_PAUSE_S, MAX_PAUSE_S = 0.002, 0.05


class CpuAccounting(trio.abc.Instrument):
    """Charges the CPU time of peer-owned tasks to their peers (add it with
    ``trio.lowlevel.add_instrument``)."""

    def __init__(self, shares: CpuShares[PeerId | None] | None = None) -> None:
        self.shares: CpuShares[PeerId | None] = CpuShares() if shares is None else shares
        self._owners: dict[trio.lowlevel.Task, PeerId | None] = {}
        self._began = 0.0

    def own(self, peer: PeerId | None) -> None:
        """Charge the calling task's CPU time, from now until it ends (or it is owned anew),
        to ``peer`` (:data:`UNAUTHENTICATED`: to the work of unauthenticated connections)."""
        task, now = trio.lowlevel.current_task(), time.thread_time()
        if task in self._owners:  # its step so far was its previous owner's
            self.shares.charge(self._owners[task], now - self._began, now)
        self._owners[task] = peer
        self._began = now  # this step is under way: charge the rest of it to ``peer``

    async def turn(self, peer: PeerId | None) -> None:
        """Wait while ``peer`` owes CPU time and other peers' work runs: at once if it owes
        none; if nobody else was charged during a pause, its debt is forgiven (it waited
        for no one: the CPU is not kept idle)."""
        while (owed := self.shares.wait_s(peer, time.thread_time())) > 0:
            others = self.shares.spent_by_others_s(peer)
            await trio.sleep(min(max(owed, MIN_PAUSE_S), MAX_PAUSE_S))
            if self.shares.spent_by_others_s(peer) == others:
                self.shares.forgive(peer)
                return

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task in self._owners:
            self._began = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task in self._owners:
            now = time.thread_time()
            self.shares.charge(self._owners[task], now - self._began, now)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self._owners.pop(task, None)
