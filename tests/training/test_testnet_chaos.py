"""Kill 2 of 8 testnet nodes mid-job: the others finish with one model, as accurate as without
the kills (IID shards, so losing two shards late costs little data)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import trio
from rich.console import Console

from meshfed.testnet import run_testnet
from meshfed.training import models

JOB = {"rounds": 5, "epochs": 2, "partition": "iid", "dataset": "digits"}


def run_quietly(out: Path, **options: Any) -> dict[str, Any]:
    quiet = Console(file=io.StringIO())
    code = trio.run(lambda: run_testnet(8, out, limit_s=300, console=quiet, **JOB, **options))
    run: dict[str, Any] = json.loads(out.read_text())
    assert code == 0, json.dumps(run)[:3000]
    return run


def test_six_survivors_finish_as_accurate_as_eight(tmp_path: Path) -> None:
    clean = run_quietly(tmp_path / "clean.json")
    chaos = run_quietly(tmp_path / "chaos.json", kill=2, kill_at_round=2)
    assert len(chaos["killed"]) == 2  # the last two of the roster the auction hired
    assert chaos["finished"] and chaos["same_model_everywhere"]
    survivors = [n for n in chaos["nodes"] if n["index"] not in chaos["killed"]]
    assert all(len(n["rounds"]) == JOB["rounds"] for n in survivors)
    # after the kills, the groups shrink to the six survivors
    assert any(6 in r["groups"] for r in survivors[0]["rounds"])
    assert abs(chaos["final_accuracy"] - clean["final_accuracy"]) <= 0.02


def test_the_testnet_prints_why_nodes_failed(tmp_path: Path) -> None:
    # a model this process knows (so the testnet's checks pass) and the nodes do not
    models.register("test_only_in_the_testnet_process")(models.mlp)
    screen = io.StringIO()
    code = trio.run(
        lambda: run_testnet(
            3, tmp_path / "run.json", limit_s=120, console=Console(file=screen, width=200),
            secure=False, rounds=1, model="test_only_in_the_testnet_process",
        )
    )  # fmt: skip
    assert code == 1
    printed = screen.getvalue()
    assert "NOT every node finished" in printed
    for index in range(3):
        assert f"node {index} failed: job 'testnet-" in printed
    assert printed.count("model: no model 'test_only_in_the_testnet_process'") == 3
