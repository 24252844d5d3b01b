"""The way from a posting to the award in the winners' hands keeps the write-ahead rule while
it saves trips to the disk: quotes are written with the event that waits for them, the
award's escrow with the close of the bid window."""

from __future__ import annotations

from pathlib import Path

import trio

from meshfed.identity import PeerId
from meshfed.market.driver import Market
from meshfed.market.journal import JournalEntry
from meshfed.market.lease import LeaseAction, StartTraining
from meshfed.market.ledger import escrow_account
from meshfed.market.messages import Award, Bid, Decline, MarketMessage, Release, Rfq
from meshfed.node import Node
from meshfed.testing import open_memory_mesh
from tests.market.mesh import meshed, until_event

JOB = {"job_id": "award-path", "rounds": 1, "dataset": "digits", "secure": False}


def _taken(entries: list[JournalEntry], machine: str) -> list[str]:
    """The types of the messages ``machine`` took, in the journal's order."""
    return [
        entry.body["message"][0]
        for entry in entries
        if entry.machine == machine and entry.event == "receive"
    ]


def _market(node: Node) -> Market:
    assert node.market is not None
    return node.market


async def test_when_a_winner_holds_its_award_the_bids_the_close_and_the_escrow_are_on_disk(
    tmp_path: Path,
) -> None:
    """The buyer writes the bids (which do not wait for the disk) with the close of the bid
    window, and escrows in the same trip to the store: when a winner takes its award, every
    one of them is durable at the buyer, and the winner's RFQ and award at the winner."""
    async with open_memory_mesh(
        5, tmp_path, membership=True, gossip_interval_s=0.1, market_capacity=1
    ) as nodes:
        await meshed(nodes)
        buyer, sellers = nodes[0], nodes[1:]
        seen: dict[PeerId, tuple[list[str], list[str], int]] = {}

        def watch(seller: Node) -> None:
            def seen_award(
                sender: PeerId, message: MarketMessage, actions: list[LeaseAction]
            ) -> None:
                if any(isinstance(action, StartTraining) for action in actions):
                    machine = "buyer:" + message.job
                    at_buyer = _taken(_market(buyer).journal.entries(), machine)
                    at_winner = _taken(_market(seller).journal.entries(), "seller")
                    escrow = _market(buyer).ledger.balance(escrow_account(message.job))
                    seen[seller.peer_id] = (at_buyer, at_winner, escrow)

            _market(seller).seller_observers.append(seen_award)

        for seller in sellers:
            watch(seller)
        handle = await buyer.submit_training(JOB, budget=5, min_peers=2, max_peers=2)
        await until_event(handle, "started")
        clearing = handle.buyer.clearing
        assert clearing is not None
        assert set(seen) == set(handle.buyer.roster) and len(seen) == 2
        answers = [e["event"] for e in handle.events if e["event"] in ("bid", "decline")]
        for at_buyer, at_winner, escrow in seen.values():
            # every answer the buyer took, the last one closing the window (leases may follow)
            taken = [kind for kind in at_buyer if kind in (Bid.TYPE, Decline.TYPE)]
            assert len(taken) == len(answers) >= 2, (at_buyer, answers)
            assert at_winner == [Rfq.TYPE, Award.TYPE]
            assert escrow == clearing.total > 0


async def test_a_node_that_stops_writes_the_quotes_it_had_not_written_yet(
    tmp_path: Path,
) -> None:
    """A loser's RFQ and release never wait for the disk; a node that stops (before their
    deadline to be written came) writes them on its way out: back up, it holds them."""
    async with open_memory_mesh(
        4, tmp_path, membership=True, gossip_interval_s=0.1, market_capacity=1
    ) as nodes:
        await meshed(nodes)
        buyer, sellers = nodes[0], nodes[1:]
        released: dict[PeerId, trio.Event] = {seller.peer_id: trio.Event() for seller in sellers}

        def watch(seller: Node) -> None:
            def seen(sender: PeerId, message: MarketMessage, actions: list[LeaseAction]) -> None:
                if isinstance(message, Release):
                    released[seller.peer_id].set()

            _market(seller).seller_observers.append(seen)

        for seller in sellers:
            watch(seller)
        handle = await buyer.submit_training(JOB, budget=5, min_peers=2, max_peers=2)
        await until_event(handle, "started")
        losers = [
            i for i, node in enumerate(nodes[1:], 1) if node.peer_id not in handle.buyer.roster
        ]
        assert len(losers) == 1
        with trio.fail_after(10):
            await released[nodes[losers[0]].peer_id].wait()
        # stop at once: well within the delay after which the loser would have written them
    async with open_memory_mesh(4, tmp_path, membership=True, market_capacity=1) as again:
        loser = _market(again[losers[0]])
        assert _taken(loser.journal.entries(), "seller") == [Rfq.TYPE, Release.TYPE]
