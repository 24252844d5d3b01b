"""The device service on real nodes: readings refreshed, the decision followed, and the node's
signed record re-published so that peers see the device as it is now."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from meshfed import Node, NodeConfig, open_node
from meshfed.device.config import DeviceConfig
from meshfed.device.policy import DeviceDecision, PauseReason, ThermalPressure
from meshfed.device.readings import ReadingOverrides, Readings
from meshfed.device.service import READ_TIMEOUT_S, DeviceService
from meshfed.device.simulator import PROFILES, SimulatedDevice
from meshfed.device.sources import ManualReadings
from meshfed.membership.records import PeerQuery
from meshfed.testing import open_memory_mesh

QUIET_PHONE = dataclasses.replace(
    PROFILES["phone"],
    start_battery_pct=23.0,
    on_battery_mean_s=0.0,
    charging_mean_s=0.0,
    metered_mean_s=0.0,
    crash_mean_s=0.0,
)


async def eventually(predicate: Callable[[], bool], *, within: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s until it holds, for at most ``within`` seconds."""
    deadline = trio.current_time() + within
    while not predicate():
        assert trio.current_time() < deadline, f"{what} not within {within} s"
        await trio.sleep(0.1)


def seen_by(viewer: Node, subject: Node) -> Readings | None:
    """The readings ``viewer`` holds in ``subject``'s signed record."""
    assert viewer.membership is not None
    record = viewer.membership.table.get(subject.peer_id)
    if record is None:
        return None
    caps = record.capabilities
    return Readings(
        battery_pct=caps.battery_pct,
        charging=caps.charging,
        temperature_c=caps.temperature_c,
        wifi=caps.wifi,
        metered=caps.metered,
    )


@asynccontextmanager
async def two_memory_nodes(
    tmp_path: Path, source: object, device: DeviceConfig
) -> AsyncIterator[tuple[Node, Node]]:
    """``phone`` (reading ``source``) and a plain ``peer`` that knows it, with membership."""
    other = ManualReadings()
    async with open_memory_mesh(
        2,
        tmp_path,
        devices=[source, other],  # type: ignore[list-item]
        membership=True,
        market=False,
        store_file="",  # no worker threads: virtual time runs only when the nodes wait
        device=device,
    ) as (phone, peer):
        await peer.connect(phone.listen_addrs[0])
        yield phone, peer


async def test_a_draining_battery_pauses_the_node_and_its_peers_see_it_until_it_charges(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    phone_device = SimulatedDevice(QUIET_PHONE, seed=1, start=trio.current_time())
    config = DeviceConfig(refresh_s=10.0, min_battery_pct=20)
    async with two_memory_nodes(tmp_path, phone_device, config) as (phone, peer):
        assert phone.device is not None and phone.device.allows_work()
        await eventually(
            lambda: (seen_by(peer, phone) or Readings()).battery_pct == 23,
            within=10, what="the first record",
        )  # fmt: skip
        phone.device.set_load(1.0)  # training: 25 %/h more than idle
        decisions: list[DeviceDecision] = []

        async def follow() -> None:
            assert phone.device is not None
            async for decision in phone.device.changes():
                decisions.append(decision)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            # 23 % at 27 %/h: below 20 % in under 7 minutes
            await eventually(lambda: decisions != [], within=15 * 60, what="the pause")
            assert decisions == [DeviceDecision((PauseReason.BATTERY,))]
            assert not phone.device.allows_work()
            await eventually(
                lambda: (seen_by(peer, phone) or Readings()).battery_pct == 19,
                within=10, what="the low battery in the peer's view",
            )  # fmt: skip
            assert peer.membership is not None
            assert phone.peer_id not in {
                r.peer for r in peer.membership.peers(PeerQuery(min_battery_pct=20))
            }
            # still paused while it drains on: no new decision
            await trio.sleep(120)
            assert len(decisions) == 1 and not phone.device.allows_work()
            phone_device.plug(True)
            await eventually(lambda: len(decisions) == 2, within=30, what="the resume")
            assert decisions[1].allowed and phone.device.allows_work()
            await eventually(
                lambda: (seen_by(peer, phone) or Readings()).charging is True,
                within=10, what="the charger in the peer's view",
            )  # fmt: skip
            nursery.cancel_scope.cancel()


async def test_small_drifts_do_not_re_sign_the_record_and_material_ones_do(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = ManualReadings(Readings(battery_pct=80, charging=False, temperature_c=40.0))
    async with two_memory_nodes(tmp_path, source, DeviceConfig(refresh_s=1.0)) as (phone, _):
        assert phone.membership is not None
        first = phone.membership.table.get(phone.peer_id)
        assert first is not None and first.capabilities.battery_pct == 80
        source.set(battery_pct=78, temperature_c=41.0)
        await trio.sleep(3)
        same = phone.membership.table.get(phone.peer_id)
        assert same is not None and same.seq == first.seq
        source.set(battery_pct=74)
        await trio.sleep(3)
        newer = phone.membership.table.get(phone.peer_id)
        assert newer is not None and newer.seq > first.seq
        assert newer.capabilities.battery_pct == 74
        assert newer.capabilities.roles == first.capabilities.roles  # the rest stays


async def test_configured_readings_win_over_the_source_and_reach_the_record(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = ManualReadings(Readings(wifi=True))
    hotspot = DeviceConfig(refresh_s=1.0, readings=ReadingOverrides(metered=True))
    async with two_memory_nodes(tmp_path, source, hotspot) as (phone, peer):
        assert phone.device is not None
        assert phone.device.decision.reasons == (PauseReason.METERED,)
        await eventually(
            lambda: (seen_by(peer, phone) or Readings()).metered, within=10, what="metered"
        )


async def test_thermal_pressure_reaches_the_batch_scale(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = ManualReadings(Readings(temperature_c=40.0))
    config = DeviceConfig(refresh_s=1.0, warm_temperature_c=60.0, max_temperature_c=80.0)
    async with open_memory_mesh(1, tmp_path, devices=[source], device=config, store_file="") as (
        node,
    ):
        assert node.device is not None and node.device.batch_scale() == 1.0
        source.set(temperature_c=72.0)
        await trio.sleep(1.5)
        assert node.device.decision.thermal is ThermalPressure.SERIOUS
        assert node.device.batch_scale() == 0.5 and node.device.allows_work()


class Stuck:
    """A source that answers once, then fails, then hangs."""

    def __init__(self) -> None:
        self.reads = 0

    async def read(self, now: float) -> Readings:
        self.reads += 1
        if self.reads == 2:
            raise OSError("sensor gone")
        if self.reads > 2:
            await trio.sleep_forever()
        return Readings(battery_pct=50, charging=False)

    def set_load(self, load: float) -> None:
        pass


async def test_a_failing_or_hanging_source_leaves_the_last_readings_standing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    stuck = Stuck()
    async with open_memory_mesh(1, tmp_path, devices=[stuck], store_file="") as (node,):  # type: ignore[list-item]
        assert node.device is not None
        started = trio.current_time()
        for _ in range(2):
            await node.device.refresh()
            assert node.device.readings == Readings(battery_pct=50, charging=False)
        assert trio.current_time() - started == pytest.approx(READ_TIMEOUT_S)


async def test_quiet_hours_follow_the_local_clock(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    minute = [22 * 60 + 59]
    async with open_memory_mesh(1, tmp_path, devices=[ManualReadings()], store_file="") as (node,):
        service = DeviceService(
            node,
            DeviceConfig(quiet_hours=["23:00-07:00"]),
            ManualReadings(),
            local_minute=lambda: minute[0],
        )
        assert (await service.refresh()).allowed
        minute[0] = 23 * 60
        assert (await service.refresh()).reasons == (PauseReason.QUIET_HOURS,)
        minute[0] = 7 * 60
        assert (await service.refresh()).allowed


@asynccontextmanager
async def two_libp2p_nodes(
    tmp_path: Path, source: ManualReadings
) -> AsyncIterator[tuple[Node, Node]]:
    async with AsyncExitStack() as stack:
        phone, peer = [
            await stack.enter_async_context(
                open_node(
                    NodeConfig(
                        data_dir=tmp_path / name,
                        transport="libp2p",
                        listen=["/ip4/127.0.0.1/tcp/0"],
                        mdns=False,
                        market=False,
                        ping_interval_s=0,
                        gossip_interval_s=0.2,
                        device=DeviceConfig(refresh_s=0.2),
                    ),
                    device=readings,
                )
            )
            for name, readings in (("phone", source), ("peer", ManualReadings()))
        ]
        await peer.connect(phone.listen_addrs[0])
        yield phone, peer


async def test_the_pause_and_the_charger_reach_a_peer_over_libp2p(tmp_path: Path) -> None:
    source = ManualReadings(Readings(battery_pct=40, charging=False))
    async with two_libp2p_nodes(tmp_path, source) as (phone, peer):
        assert phone.device is not None
        await eventually(lambda: seen_by(peer, phone) is not None, within=20, what="a record")
        source.set(battery_pct=12)
        await eventually(
            lambda: (seen_by(peer, phone) or Readings()).battery_pct == 12,
            within=20, what="the low battery over libp2p",
        )  # fmt: skip
        assert phone.device.decision.reasons == (PauseReason.BATTERY,)
        source.set(charging=True)
        await eventually(
            lambda: (seen_by(peer, phone) or Readings()).charging is True,
            within=20, what="the charger over libp2p",
        )  # fmt: skip
        assert phone.device.allows_work()


async def test_a_follower_that_falls_behind_gets_the_latest_decision(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = ManualReadings(Readings(battery_pct=50, charging=False))
    async with open_memory_mesh(1, tmp_path, devices=[source], store_file="") as (node,):
        device = node.device
        assert device is not None
        got: list[DeviceDecision] = []

        async def slow_follower() -> None:
            assert device is not None
            async for decision in device.changes():
                got.append(decision)
                await trio.sleep(10)  # busy withdrawing bids, say

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_follower)
            await trio.sleep(1)
            source.set(battery_pct=10)
            await device.refresh()  # paused
            await trio.sleep(1)
            source.set(metered=True)
            await device.refresh()  # paused for two reasons, while the follower is busy
            source.set(battery_pct=10, charging=True, metered=False)
            await device.refresh()  # allowed again, still busy
            await trio.sleep(20)
            assert [d.allowed for d in got] == [False, True]
            nursery.cancel_scope.cancel()
