"""Simulated devices in the one-process simulation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from meshfed.errors import ConfigError
from meshfed.simulation import run_simulation


async def test_a_simulation_runs_on_simulated_phones_and_servers(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    quiet = Console(file=io.StringIO())
    code = await run_simulation(
        4, out, console=quiet, devices=["phone", "server"], rounds=2, secure=False
    )
    assert code == 0
    rows = json.loads(out.read_text())["rounds"]
    assert [row["device_paused"] for row in rows] == [0, 0]  # phones at 80 %, cool, on Wi-Fi
    assert rows[0]["battery_pct"] == 80  # the phones only: the servers have no battery


async def test_an_unknown_device_profile_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="toaster"):
        await run_simulation(2, tmp_path / "o.json", devices=["toaster"], rounds=1)
