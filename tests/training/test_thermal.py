"""Under the device's thermal pressure local training takes smaller batches (SPEC 7g); a
cool device and DP-SGD (whose privacy accounting rests on its batch size) keep theirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshfed.device.config import DeviceConfig
from meshfed.device.readings import Readings
from meshfed.device.sources import ManualReadings
from meshfed.secagg.driver import Aggregator
from meshfed.testing import open_memory_mesh
from meshfed.training.job import TrainingPeer
from tests.training.nodes import QUICK, job_for, run_together


@pytest.mark.parametrize("dp_sgd", [False, True])
async def test_a_warm_device_trains_on_smaller_batches(tmp_path: Path, dp_sgd: bool) -> None:
    limits = DeviceConfig()
    warm = (limits.warm_temperature_c + limits.max_temperature_c) / 2 + 1  # hot, not paused
    devices = [ManualReadings(Readings(temperature_c=30.0)) for _ in range(4)]
    devices[0] = ManualReadings(Readings(temperature_c=warm))
    async with open_memory_mesh(4, tmp_path, devices=devices) as nodes:
        for node in nodes:
            assert node.device is not None
            assert (await node.device.refresh()).allowed
        hot = nodes[0].device
        assert hot is not None and hot.batch_scale() < 1
        privacy = {"dp_clip": 1.0, "dp_mode": "sample", "dp_noise_multiplier": 1.0}
        spec = job_for(
            nodes, f"warm-{dp_sgd}", rounds=2, partition="iid", secure=False,
            **(privacy if dp_sgd else {}),
        )  # fmt: skip
        peers = [  # DP charges each round in the store first
            TrainingPeer(node, spec, Aggregator(node, deadlines=QUICK), store=node.store)
            for node in nodes
        ]
        reports = await run_together(peers)
    batch = spec.training.batch_size
    expected = batch if dp_sgd else round(batch * hot.batch_scale())
    assert [r.batch_size for r in reports[0]] == [expected, expected]
    assert all(r.batch_size == batch for mine in reports[1:] for r in mine)
