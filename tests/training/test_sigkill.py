"""A roster member SIGKILLed mid-job over libp2p (OS processes on 127.0.0.1, the testnet): the
survivors hold one model after every round, the round of the kill included, and from the
second round after it their rounds cost what they did before (the issue: 0.14 s rounds became
3.1 s, each waiting the join floor for the dead peer, and the survivors' accuracies spread by
0.09-0.25 in the round after the kill)."""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import trio
from rich.console import Console

from meshfed.testnet import run_testnet

ROUNDS, KILL_AT = 6, 2


@pytest.mark.slow  # ~65 s: 5 processes start and buy the job; the rounds take ~10 s of it
def test_after_a_sigkill_the_survivors_hold_one_model_and_stop_waiting(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    quiet = Console(file=io.StringIO())
    code = trio.run(
        lambda: run_testnet(
            5, out, limit_s=240, console=quiet, kill=1, kill_at_round=KILL_AT,
            rounds=ROUNDS, epochs=1, partition="iid", dataset="digits", own_data=False,
        )
    )  # fmt: skip
    run: dict[str, Any] = json.loads(out.read_text())
    assert code == 0, json.dumps(run)[:3000]
    survivors = [n for n in run["nodes"] if n["index"] not in run["killed"]]
    assert len(survivors) == 4
    rounds = [{r["round"]: r for r in node["rounds"]} for node in survivors]
    for number in range(ROUNDS):
        held = {mine[number]["model_digest"] for mine in rounds if number in mine}
        assert len(held) == 1, (number, held)
    for mine in rounds:
        seconds = [mine[number]["seconds"] for number in sorted(mine)]
        before = statistics.median(seconds[1:KILL_AT])
        # a probe of the dead peer, not the 3 s join floor (ratios, within this run)
        assert max(seconds[KILL_AT + 2 :]) <= 2 * before + 0.1, seconds
