"""The device service on a node: readings refreshed, the policy applied, the record re-signed.

A thin trio driver over the :class:`~meshfed.device.policy.Governor`. Every ``refresh_s`` it
reads its :class:`~meshfed.device.readings.ReadingsSource` (bounded by
:data:`READ_TIMEOUT_S`), applies the ``[device.readings]`` overrides, decides, and re-signs the
node's peer record when the readings changed materially
(:func:`~meshfed.device.readings.material_change`) or the decision changed, so that buyers
match on what the device is now. The rest of the node asks :meth:`DeviceService.allows_work`
before it takes work, follows :meth:`DeviceService.changes` to stop and resume, and scales
local batches by :meth:`DeviceService.batch_scale`.

Start it in the node's nursery before membership (its first readings go into the first record):
``await nursery.start(DeviceService(node, config.device, source).run)``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import trio

from .config import DeviceConfig
from .policy import DeviceDecision, Governor
from .probe import published_readings, with_readings
from .readings import Readings, ReadingsSource, material_change

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["READ_TIMEOUT_S", "DeviceService"]

log = logging.getLogger(__name__)

#: the longest a source may take to answer one read (the last readings stand meanwhile)
READ_TIMEOUT_S = 5.0


def _local_minute() -> int:
    now = datetime.datetime.now().astimezone()
    return now.hour * 60 + now.minute


class DeviceService:
    """Readings, the decision on them, and who is told. See the module docstring.

    Args:
        node: the node whose record carries the readings (through ``node.membership``).
        config: the ``[device]`` section.
        source: where readings come from (default: this machine, by psutil).
        local_minute: the minute of the local day now (default: the wall clock's, in the
            local time zone); quiet hours are judged by it.
    """

    def __init__(
        self,
        node: Node,
        config: DeviceConfig,
        source: ReadingsSource | None = None,
        *,
        local_minute: Callable[[], int] = _local_minute,
    ) -> None:
        if source is None:
            from .sources import PsutilReadings

            source = PsutilReadings()
        self.node = node
        self.config = config
        self.source = source
        #: the readings of the last refresh, overrides applied
        self.readings = config.readings.apply(Readings())
        self._governor = Governor(config)
        self._local_minute = local_minute
        self._changed = trio.Event()
        self._version = 0  # decisions changed so far

    # -- what the node asks ----------------------------------------------------------------

    @property
    def decision(self) -> DeviceDecision:
        """The current decision."""
        return self._governor.decision

    def allows_work(self) -> bool:
        """True when the device may take work now (bid, accept a lease, start a round)."""
        return self._governor.decision.allowed

    def batch_scale(self) -> float:
        """The share (0..1] of its configured batch local training uses now (thermal
        pressure)."""
        return self._governor.decision.batch_scale

    async def changes(self) -> AsyncIterator[DeviceDecision]:
        """Each new decision from now on, as it is made (a consumer that falls behind gets the
        latest, once). Runs until the caller stops iterating or is cancelled."""
        seen = self._version
        while True:
            while self._version == seen:
                await self._changed.wait()
            seen = self._version
            yield self._governor.decision

    def set_load(self, load: float) -> None:
        """The share of the device (0..1) the node's work keeps busy now (a simulated device
        heats and drains by it)."""
        self.source.set_load(load)

    # -- running -----------------------------------------------------------------------------

    async def refresh(self) -> DeviceDecision:
        """Read, decide, tell, and re-sign the record if needed; returns the decision. A source
        that fails or takes longer than :data:`READ_TIMEOUT_S` leaves the last readings
        standing (logged)."""
        try:
            with trio.fail_after(READ_TIMEOUT_S):
                raw = await self.source.read(trio.current_time())
        except (trio.TooSlowError, OSError, ValueError) as exc:
            log.warning("device readings failed", extra={"error": repr(exc)})
            raw = None
        if raw is not None:
            self.readings = self.config.readings.apply(raw)
        before = self._governor.decision
        decision = self._governor.observe(self.readings, minute=self._local_minute())
        if decision != before:
            peer = self.node.peer_id.short()
            log.info("device decision", extra={"peer": peer, **decision.to_json()})
            self._version += 1
            self._changed.set()
            self._changed = trio.Event()
        self._publish(force=decision.allowed != before.allowed)
        return decision

    def _publish(self, *, force: bool) -> None:
        """Re-sign the node's record with the readings if they moved materially (``force``:
        if they moved at all, the decision flipped)."""
        membership = self.node.membership
        own = None if membership is None else membership.table.get(self.node.peer_id)
        if membership is None or own is None:
            return  # no record yet: membership signs its first one with these readings
        published = published_readings(own.capabilities)
        if published == dataclasses.replace(self.readings, cpu_share=None):
            return
        if force or material_change(published, self.readings):
            membership.update_capabilities(with_readings(own.capabilities, self.readings))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the first readings, report ready, then refresh every ``refresh_s`` (with
        ``refresh_s = 0``, only when :meth:`refresh` is called)."""
        await self.refresh()
        task_status.started()
        if self.config.refresh_s == 0:
            return
        while True:
            await trio.sleep(self.config.refresh_s)
            await self.refresh()
