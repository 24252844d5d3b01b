"""The operator's commands over a running node's API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .nodes import ROOT, node_process


def meshfed_node(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "meshfed.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_the_commands_answer_from_the_running_node(tmp_path: Path) -> None:
    where = ("--data-dir", str(tmp_path))
    with node_process(tmp_path) as (_, url):
        status = meshfed_node("status", "--json", *where)
        assert status.returncode == 0, status.stderr
        peer_id = json.loads(status.stdout)["peer_id"]
        table = meshfed_node("status", *where)
        assert table.returncode == 0 and peer_id in table.stdout
        for command in ("peers", "jobs", "budget"):
            done = meshfed_node(command, "--json", *where)
            assert done.returncode == 0 and json.loads(done.stdout) == [], (command, done.stderr)
        unknown = meshfed_node("cancel", "no-such-job", *where)
        assert unknown.returncode == 1 and "no job 'no-such-job'" in unknown.stderr
        assert "(HTTP 404)" in unknown.stderr
        audit = meshfed_node("audit", "--json", "--kind", "api_new_client", *where)
        (entry,) = json.loads(audit.stdout)  # the CLI's token came from 127.0.0.1
        assert entry["fields"] == {"address": "127.0.0.1"}
        assert url.startswith("http://127.0.0.1:")


def test_without_a_running_node_the_commands_say_so(tmp_path: Path) -> None:
    done = meshfed_node("status", "--data-dir", str(tmp_path))
    assert done.returncode == 1
    assert "no node serves an API" in done.stderr and "meshfed-node run" in done.stderr


def test_run_api_off_serves_nothing(tmp_path: Path) -> None:
    with node_process(tmp_path, "--api", "off") as (_, url):
        assert url is None
        assert not (tmp_path / "api.json").exists()
