"""The meshfed-node command line, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.procs.harness import ROOT


def cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "meshfed.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **env},
    )


def test_help_lists_the_commands() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("run", "id", "testnet"):
        assert command in result.stdout
    assert "--bootstrap" in cli("run", "--help").stdout


def test_id_creates_once_and_shows_the_same_id(tmp_path: Path) -> None:
    first = cli("id", "--data-dir", str(tmp_path))
    second = cli("id", "--data-dir", str(tmp_path))
    assert first.returncode == 0
    assert first.stdout == second.stdout
    assert first.stdout.startswith("12D3KooW")


def test_bad_configuration_names_the_key(tmp_path: Path) -> None:
    result = cli("run", "--data-dir", str(tmp_path), MESHFED_REQUEST_TIMEOUT_S="soon")
    assert result.returncode == 2
    assert "request_timeout_s (from env MESHFED_REQUEST_TIMEOUT_S)" in result.stderr
    result = cli("run", "--data-dir", str(tmp_path), "--bootstrap", "/ip4/127.0.0.1/tcp/1")
    assert result.returncode == 2
    assert "bootstrap" in result.stderr and "/p2p/" in result.stderr


def test_testnet_forms_a_full_mesh_and_stops_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    result = cli("testnet", "--nodes", "3", "--seconds", "4", "--out", str(out), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "full mesh, clean stop" in result.stdout
    summary = json.loads(out.read_text())
    assert [r["returncode"] for r in summary["results"]] == [0, 0, 0]
    for node in summary["results"]:
        assert len(node["peers"]) == 2
        assert node["stats"]["accepted"]["meshfed.ping"] >= 1
