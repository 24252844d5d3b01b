"""Reaching the bootstrap peers: dialled at start, retried with backoff until they answer,
and dialled again whenever the node is left with no peer at all.

A bootstrap peer may start after us, restart, or sit behind a network that comes later; a node
that tried once would stay alone for good. :class:`Backoff` is the schedule (sans-IO: it
takes ``now`` and an ``rng``); :class:`Bootstrap` is its trio driver.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..errors import MeshfedError

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["Backoff", "Bootstrap"]

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    """Exponential backoff with jitter: ``first_s``, doubling up to ``max_s``, each delay
    drawn from [0.5, 1.0] of its step so that nodes started together do not dial in step."""

    rng: random.Random
    first_s: float = 0.5
    max_s: float = 30.0
    _step: float = field(init=False, default=0.0)

    def next_delay(self) -> float:
        """The wait before the next attempt (and a longer one after it)."""
        self._step = self.first_s if self._step == 0 else min(self.max_s, 2 * self._step)
        return self._step * (0.5 + 0.5 * self.rng.random())

    def reset(self) -> None:
        """An attempt succeeded: start from ``first_s`` next time."""
        self._step = 0.0


class Bootstrap:
    """Dial ``addrs`` until each has answered once; then watch, and when the node has no
    connected peer left, dial them all again (with backoff).

    Start it in the node's nursery: ``await nursery.start(Bootstrap(node, addrs).run)``; it
    reports started after the first round of dials, so a reachable bootstrap peer is connected
    when the node starts serving.
    """

    def __init__(
        self,
        node: Node,
        addrs: list[str],
        *,
        check_s: float = 5.0,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.node = node
        self.addrs = list(addrs)
        self.check_s = check_s
        self._backoff = backoff or Backoff(rng or random.Random())
        self._failures: dict[str, int] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial, retry and watch until cancelled."""
        pending = await self._dial(self.addrs)
        task_status.started()
        if not self.addrs:
            return
        while True:
            if pending:
                delay = self._backoff.next_delay()
                log.info(
                    "bootstrap peers unreachable, retrying",
                    extra={"addrs": pending, "in_s": round(delay, 2)},
                )
                await trio.sleep(delay)
                pending = await self._dial(pending)
                if not pending:
                    self._backoff.reset()
            else:
                await trio.sleep(self.check_s)
                if not self.node.transport.connected_peers():
                    log.info("no peer left: dialling the bootstrap peers again")
                    pending = await self._dial(self.addrs)

    async def _dial(self, addrs: list[str]) -> list[str]:
        """Dial each of ``addrs``; returns those that did not answer."""
        failed = []
        for addr in addrs:
            try:
                peer = await self.node.connect(addr)
            except (MeshfedError, trio.TooSlowError) as exc:
                failed.append(addr)
                self._failures[addr] = self._failures.get(addr, 0) + 1
                if self._failures[addr] == 1:  # the first failure says why; retries are info
                    log.warning(
                        "bootstrap peer unreachable", extra={"addr": addr, "error": str(exc)}
                    )
                continue
            if self._failures.pop(addr, 0):
                log.info("bootstrap peer reached", extra={"addr": addr, "peer": peer.short()})
        return failed
