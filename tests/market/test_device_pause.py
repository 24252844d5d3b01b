"""A winner's device policy meets the market: its battery falls below the limit mid-job, it
finishes the round it is in (paid), hands the lease back (replaced from the standby bids), takes
no new work while paused and bids again once it charges. On the memory transport and over
libp2p on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from meshfed.device.readings import Readings
from meshfed.device.sources import ManualReadings
from meshfed.market.ledger import earned_account, paid_account
from meshfed.node import Node
from meshfed.testing import open_memory_mesh
from tests.market.mesh import meshed, until_event

JOB = {"dataset": "digits", "partition": "iid", "local_steps": 4}
TRANSPORTS = {
    "memory": {},
    "libp2p": {"transport": "libp2p", "listen": ["/ip4/127.0.0.1/tcp/0"]},
}


async def _answers(buyer: Node, job_id: str) -> dict[str, dict[str, Any]]:
    """Post a one-round job to every seller; each seller's answer (bid or decline)."""
    handle = await buyer.submit_training(
        {**JOB, "job_id": job_id, "rounds": 1}, budget=5, min_peers=4, max_peers=4
    )
    with trio.fail_after(120):
        await handle.wait()
    return {e["peer"]: e for e in handle.events if e["event"] in ("bid", "decline")}


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_a_winner_whose_battery_runs_low_hands_its_lease_back_and_bids_again_charged(
    tmp_path: Path, transport: str
) -> None:
    batteries = [ManualReadings(Readings(battery_pct=90, charging=False)) for _ in range(6)]
    async with open_memory_mesh(
        6, tmp_path, devices=batteries, membership=True, gossip_interval_s=0.1,
        market_capacity=1, **TRANSPORTS[transport],
    ) as nodes:  # fmt: skip
        await meshed(nodes, within=40)
        buyer, sellers = nodes[0], nodes[1:]
        assert buyer.market is not None
        handle = await buyer.submit_training(
            {**JOB, "job_id": "drain", "rounds": 12}, budget=5, min_peers=4, max_peers=4
        )
        with trio.fail_after(120):
            await until_event(handle, "round", unit=2)
        phone = next(s for s in sellers if s.peer_id == handle.buyer.roster[0])
        standby = next(s for s in sellers if s.peer_id not in handle.buyer.roster)
        assert phone.device is not None and phone.market is not None
        batteries[nodes.index(phone)].set(battery_pct=12)
        assert not (await phone.device.refresh()).allowed

        with trio.fail_after(120):
            failed = await until_event(handle, "failed", peer=str(phone.peer_id))
            final = await handle.wait()
        assert failed["state"] == "paused"  # it said so: no silence to wait out
        assert final["error"] is None, final
        assert standby.peer_id in handle.buyer.roster  # the standby bid replaced it
        award = handle.buyer.award_to(phone.peer_id)
        assert award is not None
        did = phone.market.work["drain"].round  # rounds done, the one under way included
        paid = buyer.market.ledger.balance(paid_account("drain", phone.peer_id))
        earned = phone.market.ledger.balance(earned_account("drain", buyer.peer_id))
        assert 2 <= did < 12 and earned == paid == did * award.price

        # paused: no new work; charging: it bids again
        answers = await _answers(buyer, "while-paused")
        assert answers[str(phone.peer_id)]["event"] == "decline"
        assert answers[str(phone.peer_id)]["reason"] == "paused"
        batteries[nodes.index(phone)].set(charging=True)
        assert (await phone.device.refresh()).allowed
        answers = await _answers(buyer, "charged")
        assert answers[str(phone.peer_id)]["event"] == "bid"
