"""The operator's guide (docs/operators.md) covers what the node has: it cannot drift."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import trio
import yaml

from meshfed.api.metrics import NodeMetrics
from meshfed.cli import app
from meshfed.config import NodeConfig
from meshfed.device.config import DeviceConfig
from meshfed.device.readings import ReadingOverrides
from meshfed.device.simulator import PROFILES, SimulatedDevice
from meshfed.node import open_node
from meshfed.testing import quiet_config
from meshfed.transports.memory import MemoryNetwork

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "operators.md").read_text()


def _rows(section: str) -> str:
    """The guide's text from the heading ``section`` to the next heading of its level."""
    start = GUIDE.index(section)
    level = section.split(" ")[0]
    end = GUIDE.find(f"\n{level} ", start + len(section))
    return GUIDE[start : end if end > 0 else None]


@pytest.mark.parametrize("key", [field.name for field in dataclasses.fields(NodeConfig)])
def test_every_configuration_key_has_a_row_with_its_variable(key: str) -> None:
    config = _rows("## 4. Configuration")
    assert f"| `{key}` |" in config or f"`{key}` is a TOML table" in config
    if key != "device":
        assert f"`MESHFED_{key.upper()}`" in config


@pytest.mark.parametrize("key", [field.name for field in dataclasses.fields(DeviceConfig)])
def test_every_device_key_has_a_row(key: str) -> None:
    assert f"| `{key}` |" in _rows("### Device policy")


def test_every_fixed_reading_is_named() -> None:
    device = _rows("### Device policy")
    for field in dataclasses.fields(ReadingOverrides):
        assert f"`{field.name}`" in device


async def _exported_families(data_dir: Path) -> set[str]:
    """The metric families a node with membership, the market and a device exports."""
    config = quiet_config(data_dir, membership=True)
    device = SimulatedDevice(PROFILES["phone"])
    async with open_node(config, network=MemoryNetwork(), device=device) as node:
        return {family.name for family in NodeMetrics(node).registry.collect()}


def test_every_metric_family_is_explained(tmp_path: Path) -> None:
    families = trio.run(_exported_families, tmp_path)
    source = (ROOT / "meshfed" / "api" / "metrics.py").read_text()
    named = set(re.findall(r'"(meshfed_[a-z_]+)"', source))
    assert named <= families  # what the source names is what a node exports, and more
    assert {name for name in families if name.startswith("meshfed_device_")}
    table = _rows("### Metrics")
    for family in families:
        assert f"| `{family}` |" in table, family


def test_every_shipped_alert_is_explained() -> None:
    rules = yaml.safe_load((ROOT / "meshfed" / "api" / "alerts.yml").read_text())
    names = [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
    assert len(names) == 5
    for name in names:
        assert f"| `{name}` |" in _rows("### Alert rules"), name


def test_every_command_is_mentioned() -> None:
    commands = [
        command.name or getattr(command.callback, "__name__", "")
        for command in app.registered_commands
    ]
    commands += [str(group.name) for group in app.registered_groups]
    assert {"run", "backup", "restore", "ledger", "audit", "data", "submit"} <= set(commands)
    for name in commands:
        assert f"meshfed-node {name}" in GUIDE or f"`{name}" in GUIDE, name


def test_the_readme_links_the_guide() -> None:
    using = (ROOT / "README.md").read_text().split("## Using it", 1)[1].split("\n## ", 1)[0]
    assert "(docs/operators.md)" in using
