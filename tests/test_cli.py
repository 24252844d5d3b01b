"""The meshfed-node command line, run as a user would run it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from torch import nn

from meshfed import Envelope, Node, Text
from meshfed.cli import _train
from meshfed.secagg.driver import Aggregator
from meshfed.store import JobState
from meshfed.testing import open_memory_mesh
from meshfed.training import models
from meshfed.training.job import TrainingPeer
from meshfed.training.spec import JobSpec, TrainingSpec
from tests.procs.harness import ROOT, Process
from tests.training.nodes import QUICK, run_together


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
        "testnet", "--nodes", "4", "--rounds", "3", "--epochs", "2", "--out", str(out), timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every node finished with the same model" in result.stdout
    assert "clean stop" in result.stdout
    run = json.loads(out.read_text())
    assert run["finished"] and run["same_model_everywhere"]
    assert [node["returncode"] for node in run["nodes"]] == [0, 0, 0, 0]
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
    assert run["rounds"][-1]["accuracy"] > run["rounds"][0]["accuracy"]
    assert run["final_accuracy"] > 0.6
    for node in run["nodes"]:
        # 3 rounds, 3 others, two sums a round: the model and the pooled validation counts
        assert node["stats"]["accepted"]["meshfed.secagg.unmask"] == 3 * 3 * 2
        assert node["outcome"]["state"] == "finished"  # as each node's store says
        assert not node["stats"]["rejected"]


def test_a_job_file_for_another_node_is_reported_not_fatal(tmp_path: Path) -> None:
    from meshfed.identity import Identity
    from meshfed.training.spec import JobSpec

    roster = tuple(str(Identity.generate().peer_id) for _ in range(4))
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


def _node_id(data_dir: Path) -> str:
    result = cli("id", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _job_node(tmp_path: Path, **fields: object) -> Process:
    """A `run --json --job` node, roster itself and three peers that never come."""
    from meshfed.identity import Identity

    me = _node_id(tmp_path / "me")
    roster = [me, *(str(Identity.generate().peer_id) for _ in range(3))]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "j", "roster": roster, **fields}))
    return Process(
        "-m", "meshfed.cli", "run", "--json", "--no-mdns", "--status-interval", "0.5",
        "--data-dir", str(tmp_path / "me"), "--job", str(job), "--roster-wait", "7",
    )  # fmt: skip


def test_a_job_file_with_a_misspelled_field_stops_run_naming_it(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "j", "roster": [], "epoch": 2}))
    result = cli("run", "--data-dir", str(tmp_path / "n"), "--job", str(job), timeout=60)
    assert result.returncode == 2
    assert f"job file {job}: epoch: unknown job field; did you mean 'epochs'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_that_does_not_fit_the_data_fails_the_job_not_the_node(tmp_path: Path) -> None:
    node = _job_node(tmp_path, model="mlp", model_options={"inputs": 3})
    try:
        assert node.read()["event"] == "started"
        events = [node.read() for _ in range(3)]
        [failed] = [e for e in events if e["event"] == "job_failed"]
        assert "model_options" in failed["error"] and "64 features" in failed["error"]
        assert node.read()["event"] == "status"  # still serving
    finally:
        node.popen.send_signal(signal.SIGTERM)
        assert node.popen.wait(20) == 0
    assert "Traceback" not in node.stderr


def test_a_node_waiting_for_its_roster_says_whom_it_waits_for(tmp_path: Path) -> None:
    node = _job_node(tmp_path)
    try:
        assert node.read()["event"] == "started"
        events: list[dict[str, object]] = []
        while not events or events[-1]["event"] != "job_failed":
            events.append(node.read(timeout=30))
        roster = json.loads((tmp_path / "job.json").read_text())["roster"]
        waits = [e for e in events if e["event"] == "waiting"]
        assert waits and all(e["missing"] == roster[1:] for e in waits)
        error = str(events[-1]["error"])
        assert all(peer in error for peer in roster[1:]) and "no address known" in error
    finally:
        node.popen.send_signal(signal.SIGTERM)
        assert node.popen.wait(20) == 0


class _BreaksInTraining(nn.Module):
    """digits' MLP that answers in evaluation mode and raises once trained: a model bug that
    only training finds (the job's pre-flight check runs it in evaluation mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = models.build("mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("boom in forward")
        result: torch.Tensor = self.body(x)
        return result


models.register("test_breaks_in_training")(_BreaksInTraining)


async def _connect_all(nodes: list[Node]) -> None:
    for a in nodes:
        for b in nodes:
            if a is not b:
                await a.connect(b.listen_addrs[0])


def _events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def test_an_error_inside_training_fails_the_job_and_the_node_serves_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_memory_mesh(4, tmp_path) as nodes:
        await _connect_all(nodes)
        roster = tuple(str(node.peer_id) for node in nodes)
        spec = JobSpec(
            job_id="breaks", roster=roster, training=TrainingSpec(model="test_breaks_in_training")
        )
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(_train, node, spec, True, 30.0)
        failed = [e for e in _events(capsys.readouterr().out) if e["event"] == "job_failed"]
        assert len(failed) == 4
        assert all("RuntimeError: boom in forward" in e["error"] for e in failed)

        async def echo(envelope: Envelope, text: Text) -> Text:
            return Text(text=f"still here: {text.text}")

        nodes[0].handle(Text, echo)
        answer = await nodes[1].request(nodes[0].peer_id, Text(text="hello"))
        assert answer.body == Text(text="still here: hello")
        assert nodes[0].store is not None
        record = nodes[0].store.job("breaks")
        assert record is not None and record.state is JobState.FAILED
        assert "boom in forward" in record.note


async def test_a_job_this_node_finished_is_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_memory_mesh(4, tmp_path) as nodes:
        roster = tuple(str(node.peer_id) for node in nodes)
        spec = JobSpec(job_id="done", roster=roster, rounds=1)
        peers = [
            TrainingPeer(node, spec, Aggregator(node, deadlines=QUICK), store=node.store)
            for node in nodes
        ]
        await run_together(peers)
    async with open_memory_mesh(1, tmp_path) as [node]:  # node 0 again; the others are gone
        began = trio.current_time()
        await _train(node, spec, True, 120.0)
        assert trio.current_time() - began < 10
    [done] = [e for e in _events(capsys.readouterr().out) if e["event"] == "job_done"]
    assert (done["state"], done["rounds"]) == ("finished", 1)


def test_a_simulation_too_large_for_its_data_is_refused_at_once_saying_what_fits(
    tmp_path: Path,
) -> None:
    result = cli("testnet", "--simulate", "400", "--rounds", "1", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "partition: alpha 0.5 leaves some of 400 peers" in result.stderr
    assert "digits (1437 training examples) feeds about" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "o").exists()


def test_a_testnet_job_that_cannot_run_is_refused_before_any_node_starts(tmp_path: Path) -> None:
    out = str(tmp_path / "run.json")
    result = cli("testnet", "--nodes", "4", "--algorithm", "adam", "--out", out, timeout=60)
    assert result.returncode == 2
    assert "algorithm: no strategy 'adam'; known: fedavg" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_testnet_node_that_cannot_start_is_named(tmp_path: Path) -> None:
    # every node is given a listen address another socket holds (a malformed one is refused
    # by the testnet itself now, as it reads the nodes' configuration to register their data)
    import socket

    out = str(tmp_path / "run.json")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"/ip4/127.0.0.1/tcp/{taken.getsockname()[1]}"
        result = cli("testnet", "--nodes", "4", "--out", out, timeout=60, MESHFED_LISTEN=listen)
    assert result.returncode == 2
    assert "node 0 ended with code 1 before it started" in result.stderr
    assert f"cannot listen on {listen} (address in use)" in result.stderr  # the node's own error


def test_a_simulation_of_many_small_shards_says_why_accuracy_stays_low(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    result = cli(
        "testnet", "--simulate", "50", "--plain", "--rounds", "1", "--out", str(out),
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    said = " ".join(result.stdout.split())  # as the console wrapped it
    assert "50 peers share 1437 training examples" in said
    assert "1 SGD step(s) per peer per round" in said and "--epochs" in said


def test_help_names_the_default_data_dir_the_mdns_switch_and_every_model(tmp_path: Path) -> None:
    wide = {"COLUMNS": "300", "XDG_DATA_HOME": str(tmp_path / "xdg")}
    run_help = " ".join(cli("run", "--help", **wide).stdout.split())
    assert f"default: {tmp_path / 'xdg' / 'meshfed'}" in run_help
    assert "--no-mdns" in run_help
    testnet_help = cli("testnet", "--help", **wide).stdout
    for model in ("mlp", "cnn", "cifar_cnn", "resnet", "mobilenet"):
        assert model in testnet_help
    assert "config" in cli("--help").stdout


def test_data_add_list_remove_through_the_command_line(tmp_path: Path) -> None:
    import numpy as np

    node = str(tmp_path / "node")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "scans.npz", x=rng.random((30, 3, 4, 4)), y=np.arange(30) % 5)
    (tmp_path / "notes.csv").write_text("a,kind,b\n1,0,2\n3,1,4\n5,1,6\n")
    added = cli("data", "add", "scans", str(tmp_path / "scans.npz"), "--data-dir", node)
    assert added.returncode == 0, added.stderr
    assert "registered scans: 30 examples of 3x4x4 features, 5 classes" in added.stdout
    added = cli(
        "data", "add", "notes", str(tmp_path / "notes.csv"), "--label-column", "kind",
        "--data-dir", node,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = cli("data", "list", "--json", "--data-dir", node)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["name"], r["examples"], r["feature_shape"], r["classes"]) for r in rows] == [
        ("notes", 3, [2], 2),
        ("scans", 30, [3, 4, 4], 5),
    ]
    removed = cli("data", "remove", "notes", "--data-dir", node)
    assert removed.returncode == 0 and "removed notes" in removed.stdout
    assert cli("data", "list", "--data-dir", node).stdout.startswith("scans\t30 examples\t3x4x4")
    again = cli("data", "remove", "notes", "--data-dir", node)
    assert again.returncode == 1 and "no data set 'notes' on this node" in again.stderr


def test_data_add_refuses_a_bad_file_naming_it_and_records_nothing(tmp_path: Path) -> None:
    node = str(tmp_path / "node")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\n1,0\n2,x\n")
    result = cli("data", "add", "bad", str(bad), "--data-dir", node)
    assert result.returncode == 1
    assert f"error: {bad}, line 3, column 'label': 'x' is not a number" in result.stderr
    assert "Traceback" not in result.stderr
    assert cli("data", "list", "--data-dir", node).stdout == ""


def test_data_add_waits_for_the_node_to_stop(tmp_path: Path) -> None:
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.arange(4) % 2)
    node = Process("-m", "meshfed.cli", "run", "--json", "--data-dir", str(tmp_path / "n"))
    try:
        assert node.read()["event"] == "started"
        result = cli("data", "add", "d", str(tmp_path / "d.npz"), "--data-dir", str(tmp_path / "n"))
        assert result.returncode == 1 and "is in use by another node" in result.stderr
    finally:
        node.popen.send_signal(signal.SIGTERM)
        assert node.popen.wait(20) == 0
