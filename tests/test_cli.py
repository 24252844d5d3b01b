"""The meshfed-node command line, run as a user would run it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs.harness import ROOT, Process


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


@pytest.mark.parametrize("mode", [[], ["--simulate", "4"]])
def test_a_job_that_cannot_run_is_refused_with_its_reason(mode: list[str]) -> None:
    result = cli("testnet", *mode, "--compression", "topk", "--rounds", "1")
    assert result.returncode == 2
    assert "secure aggregation" in result.stderr and "Traceback" not in result.stderr


def test_testnet_trains_one_model_on_every_node_and_stops_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    result = cli(
        "testnet", "--nodes", "3", "--rounds", "3", "--epochs", "2", "--out", str(out), timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every node finished with the same model" in result.stdout
    assert "clean stop" in result.stdout
    run = json.loads(out.read_text())
    assert run["finished"] and run["same_model_everywhere"]
    assert [node["returncode"] for node in run["nodes"]] == [0, 0, 0]
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
    assert run["rounds"][-1]["accuracy"] > run["rounds"][0]["accuracy"]
    assert run["final_accuracy"] > 0.6
    for node in run["nodes"]:
        assert node["stats"]["accepted"]["meshfed.secagg.unmask"] == 3 * 2  # 3 rounds, 2 others
        assert node["outcome"]["state"] == "finished"  # as each node's store says
        assert not node["stats"]["rejected"]


def test_a_job_file_for_another_node_is_reported_not_fatal(tmp_path: Path) -> None:
    from meshfed.identity import Identity
    from meshfed.training.job import JobSpec

    roster = tuple(str(Identity.generate().peer_id) for _ in range(3))
    job = tmp_path / "job.json"
    job.write_text(JobSpec(job_id="elsewhere", roster=roster).to_json())
    node = Process(
        "-m", "meshfed.cli", "run", "--json", "--data-dir", str(tmp_path / "n"), "--job", str(job)
    )
    try:
        assert node.read()["event"] == "started"
        failed = node.read()
        assert failed["event"] == "job_failed" and "not in the job" in failed["error"]
    finally:
        node.popen.send_signal(signal.SIGTERM)
        assert node.popen.wait(20) == 0  # the node kept serving until told to stop


def test_testnet_simulates_many_peers_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    result = cli("testnet", "--simulate", "12", "--rounds", "2", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads(out.read_text())
    assert run["peers"] == 12 and len(run["rounds"]) == 2
    assert run["rounds"][-1]["accuracy_spread"] < 1e-6  # one group: one model
    assert run["peak_rss_mb"] > 0


def test_a_simulation_averages_on_a_grid_of_groups_no_larger_than_max_group(
    tmp_path: Path,
) -> None:
    out = tmp_path / "sim.json"
    result = cli(
        "testnet", "--simulate", "12", "--max-group", "4", "--rounds", "1", "--out", str(out),
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [row] = json.loads(out.read_text())["rounds"]
    assert row["group_sizes"] == [3, 4]  # a full 4 x 3 grid: two steps
    assert row["cpu_s"] > 0
