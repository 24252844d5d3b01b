"""Every script in examples/ runs to completion (as a script: libp2p owns a package named
``examples`` in site-packages, so ours is never imported as a package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs.harness import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_the_sample_node_config_lists_every_key_and_loads(tmp_path: Path) -> None:
    import dataclasses
    import tomllib

    from meshfed.config import NodeConfig

    path = ROOT / "examples" / "node.toml"
    keys = set(tomllib.loads(path.read_text()))
    assert keys == {f.name for f in dataclasses.fields(NodeConfig)}
    loaded = NodeConfig.load(toml_path=path, env={})
    defaults = NodeConfig()
    for key in keys - {"data_dir"}:
        assert getattr(loaded, key) == getattr(defaults, key), key
    # `meshfed-node config` prints the effective configuration, itself a loadable file
    result = subprocess.run(
        [sys.executable, "-m", "meshfed.cli", "config", "--config", str(path), "--no-mdns"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "printed.toml"
    printed.write_text(result.stdout)
    again = NodeConfig.load(toml_path=printed, env={})
    assert again == dataclasses.replace(loaded, mdns=False)


def test_the_sample_job_lists_every_field_with_its_default() -> None:
    import dataclasses
    import tomllib

    from meshfed.training.spec import JobSpec

    path = ROOT / "examples" / "job.toml"
    document = tomllib.loads(path.read_text())
    fields = {f.name: f for f in dataclasses.fields(JobSpec)}
    assert set(document) == set(fields)
    spec = JobSpec.from_file(path)
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            assert getattr(spec, name) == f.default, name
        elif f.default_factory is not dataclasses.MISSING:
            group = f.default_factory()
            assert getattr(spec, name) == group, name  # every group at its defaults ...
            listed = {g.name for g in dataclasses.fields(group)}
            assert set(document[name]) == listed, name  # ... each field listed
        else:
            assert name in ("job_id", "roster")  # the required ones


async def test_the_sample_job_runs(tmp_path: Path) -> None:
    import dataclasses

    from meshfed.training.spec import JobSpec
    from tests.training.nodes import memory_nodes, peers_for, run_together

    sample = JobSpec.from_file(ROOT / "examples" / "job.toml")
    async with memory_nodes(tmp_path, len(sample.roster)) as nodes:
        roster = tuple(str(node.peer_id) for node in nodes)  # our nodes in the sample's places
        spec = dataclasses.replace(sample, roster=roster, rounds=2)
        reports = await run_together(peers_for(nodes, spec))
    assert all([r.round for r in mine] == [0, 1] for mine in reports)
    assert all(r.groups == (4,) for mine in reports for r in mine)
