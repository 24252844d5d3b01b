"""The node's live view: its alerts raised from the node's own state (logged and streamed),
watched or not, and the snapshot a client starts from."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from meshfed.api.live import LiveView
from meshfed.device.readings import Readings
from meshfed.device.sources import ManualReadings
from meshfed.testing import open_memory_mesh


async def test_a_hot_lonely_node_raises_its_alerts_in_the_log_and_clears_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = ManualReadings(Readings(temperature_c=82.0))
    async with open_memory_mesh(
        1, tmp_path, devices=[device], membership=True, market=True
    ) as (node,):  # fmt: skip
        view = LiveView(node)
        caplog.set_level(logging.INFO, logger="meshfed.api.live")

        async def ticks(start: int, stop: int) -> set[tuple[str, str]]:
            for now in range(start, stop, 5):  # nobody watches: alerts are evaluated anyway
                await view.refresh(now, sample=True)
            return set(view.alerting.firing)

        assert await ticks(0, 120) == set()  # 2 minutes are not over yet
        assert await ticks(120, 125) == {("MeshfedNodeOverheating", "")}
        assert await ticks(125, 305) == {
            ("MeshfedNodeOverheating", ""),
            ("MeshfedTooFewParticipants", ""),  # alone: no roster can be found
        }
        device.set(temperature_c=60.0)
        await node.device.refresh()  # type: ignore[union-attr]
        assert await ticks(305, 310) == {("MeshfedTooFewParticipants", "")}
    said = [(r.getMessage(), getattr(r, "alert", None)) for r in caplog.records]
    assert said == [
        ("alert firing", "MeshfedNodeOverheating"),
        ("alert firing", "MeshfedTooFewParticipants"),
        ("alert cleared", "MeshfedNodeOverheating"),
    ]
    assert caplog.records[0].levelno == logging.WARNING


async def test_a_new_client_starts_from_every_curve_and_a_snapshot(tmp_path: Path) -> None:
    async with open_memory_mesh(2, tmp_path, membership=True, market=True) as nodes:
        view = LiveView(nodes[0])
        for n in range(3):
            view.observe("round", {"job_id": "j", "round": n, "accuracy": n / 10, "loss": 1.0})
        view.observe("round", {"job_id": "j", "round": 2, "accuracy": 0.2, "loss": 1.0})
        view.observe("job_started", {"job_id": "k"})
        curves, snapshot = view.start()
        assert curves.startswith(b"event: curves\n")
        assert curves.count(b'"round":') == 3  # one point per round, in order
        assert b'"peer_id":"' + str(nodes[0].peer_id).encode() in snapshot
