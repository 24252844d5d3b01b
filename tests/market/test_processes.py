"""The market end to end in OS processes over libp2p on 127.0.0.1: seven nodes, each with its
own registered data file, and a buyer that hires four of them by auction (the testnet's
path, `meshfed-node run` and `meshfed-node submit training`)."""

from __future__ import annotations

import functools
import io
import json
import statistics
from pathlib import Path
from typing import Any

import trio
from rich.console import Console

from meshfed.identity import PeerId
from meshfed.testnet import run_testnet

ROUNDS = 30
KILL_AT = 4  # the winner dies in round 4 (1-based): after the roster reported 3 rounds
PAUSE_AT = 12  # the buyer is killed once the roster reported 12 rounds, back after 14


def _hex(peer_id: str) -> str:
    return PeerId.from_string(peer_id).raw.hex()


def _paid_and_earned(run: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """What the buyer's ledger paid each seller, and what each seller's ledger earned."""
    job = run["job"]["job_id"]
    ledgers = run["market"]["ledgers"]
    buyer_accounts = ledgers["buyer"]
    buyer_hex = next(
        key.split(":")[-1]
        for name, accounts in ledgers.items()
        if name != "buyer"
        for key in accounts
        if key.startswith(f"earned:{job}:")
    )
    paid = {
        key.split(":")[-1]: amount
        for key, amount in buyer_accounts.items()
        if key.startswith(f"paid:{job}:") and amount
    }
    earned = {}
    for node in run["nodes"]:
        amount = ledgers[f"node-{node['index']}"].get(f"earned:{job}:{buyer_hex}", 0)
        if amount:
            earned[_hex(node["peer_id"])] = amount
    return paid, earned


def test_eight_processes_hire_by_auction_replace_a_killed_winner_and_settle_after_the_buyer_is_back(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run.json"
    screen = io.StringIO()
    run = functools.partial(
        run_testnet, 7, out, limit_s=420, console=Console(file=screen, width=160),
        hire=4, kill=1, kill_at_round=KILL_AT, pause_buyer_at=PAUSE_AT, budget=20.0,
        rounds=ROUNDS, secure=True, local_steps=8, revive=True,
    )  # fmt: skip
    code = trio.run(run)
    summary = json.loads(out.read_text())
    assert code == 0, screen.getvalue()[-4000:]
    events = summary["market"]["events"]
    first_roster = next(e["roster"] for e in events if e["event"] == "started")
    assert len(first_roster) == 4  # four of the seven, by auction
    killed = [summary["nodes"][index]["peer_id"] for index in summary["killed"]]
    assert len(killed) == 1 and killed[0] in first_roster
    failed = [e["peer"] for e in events if e["event"] == "failed"]
    assert failed == killed
    newcomers = {e["peer"] for e in events if e["event"] == "award"} - set(first_roster)
    assert len(newcomers) == 1, events  # replaced from the next-best bids
    newcomer = next(n for n in summary["nodes"] if n["peer_id"] in newcomers)
    assert newcomer["outcome"]["event"] == "job_done" and newcomer["rounds"]

    # every node that trained to the end holds the same model after every round
    assert summary["same_model_everywhere"], summary["rounds"]
    assert all(row["models"] == 1 for row in summary["rounds"]), summary["rounds"]

    # from the second round after the failure, rounds are as fast as before it
    seconds = [row["seconds"] for row in summary["rounds"]]
    before = statistics.median(seconds[: KILL_AT - 1])
    after = statistics.median(seconds[KILL_AT + 1 :])
    assert after <= 1.5 * before + 0.05, (before, after, seconds)

    # the buyer was away for two rounds; back, it settled: the ledgers agree to the micro-credit
    # (the killed winner's too: started again after the job, it asked again for the
    # acknowledgements its death cut off, and the buyer's node answered from its journal)
    assert summary["buyer_stopped_at"] == PAUSE_AT and summary["buyer_restarted_at"] == PAUSE_AT + 2
    statement = summary["market"]["statement"]
    assert statement, "the restarted buyer printed no statement"
    paid, earned = _paid_and_earned(summary)
    assert paid == earned
    assert set(paid) >= {_hex(peer) for peer in first_roster} | {_hex(p) for p in newcomers}
    prices = {e["peer"]: e["price"] for e in events if e["event"] == "award"}
    for peer in set(first_roster) - set(killed):  # paid for every round, also while away
        assert paid[_hex(peer)] == ROUNDS * prices[peer], (peer, paid)
    assert sum(paid.values()) <= 20_000_000
    # the model every winner that stayed ended with is in the buyer's hands
    (model,) = [e for e in events if e["event"] == "model"]
    assert model["delivered"] and model["round"] == ROUNDS
    assert sum(statement["paid"].values()) == sum(paid.values())
