"""The market end to end on the memory transport: a buyer posts a training job, peers bid,
the winners train with secure averaging and are paid unit by unit, both ledgers agree."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from meshfed.errors import BudgetExceeded, BudgetTooLow, NoMatchingPeers, RequestFailed
from meshfed.market.driver import JobHandle
from meshfed.market.leasebook import LeaseRole, LeaseState
from meshfed.market.ledger import AVAILABLE, earned_account, paid_account
from meshfed.market.messages import Verification
from meshfed.market.terms import MICRO, Requirements
from meshfed.node import Node, open_node
from meshfed.testing import quiet_config
from meshfed.transports.memory import MemoryNetwork
from tests.market.mesh import (
    RestartableNodes,
    market_mesh,
    meshed,
    until_event,
    until_ledgers_agree,
)

JOB = {"job_id": "market-digits", "rounds": 3, "dataset": "digits", "partition": "iid"}
#: a memory node with membership that gossips fast and gives up on a request within 2 s
GOSSIPING = functools.partial(
    quiet_config, membership=True, gossip_interval_s=0.1, request_timeout_s=2.0
)


async def test_a_job_is_bought_trained_and_paid_and_both_ledgers_agree(tmp_path: Path) -> None:
    async with market_mesh(6, tmp_path, market_capacity=1) as nodes:
        buyer, sellers = nodes[0], nodes[1:]
        handle = await buyer.submit_training(JOB, budget=5, min_peers=4, max_peers=4)
        with trio.fail_after(120):
            final = await handle.wait()
        assert final["state"] == "ended", final
        assert final["error"] is None
        events = [e["event"] for e in handle.events]
        assert events.count("award") == 4 and "started" in events
        clearing = handle.buyer.clearing
        assert clearing is not None
        price = {winner.bidder: winner.price for winner in clearing.winners}
        assert set(price) == set(handle.buyer.roster) and len(price) == 4
        market = buyer.market
        assert market is not None
        for seller in sellers:
            assert seller.market is not None
            earned = seller.market.ledger.balance(earned_account(JOB["job_id"], buyer.peer_id))
            paid = market.ledger.balance(paid_account(JOB["job_id"], seller.peer_id))
            assert earned == paid == 3 * price.get(seller.peer_id, 0)  # to the last unit
        spent = 3 * sum(price.values())
        assert market.ledger.balance(AVAILABLE) == 1000 * MICRO - spent  # the rest released


async def test_a_payment_reaches_the_ledger_before_the_release_its_machine_made_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the ledger runs in worker threads: a job's release applied while a payment its machine
    # made first was still under way left that payment to an empty escrow (raised out of the
    # note's handler; the seller, acknowledged on its resend, earned what was never paid)
    async with market_mesh(4, tmp_path, market_capacity=1) as nodes:
        buyer = nodes[0]
        assert buyer.market is not None
        ledger = buyer.market.ledger
        paying = _slowed(monkeypatch, ledger, "pay")  # under way when the job is cancelled
        handle = await _long_plain_job(buyer, "in-order")
        with trio.fail_after(60):
            while not paying.is_set():  # noqa: ASYNC110 - a thread sets it
                await trio.sleep(0.01)
        await handle.cancel()
        with trio.fail_after(60):
            await handle.wait()
        winners = [node for node in nodes if node.peer_id in handle.buyer.roster]
        for seller in winners:
            await until_ledgers_agree(buyer, seller, "in-order", within=15)
        paid = sum(ledger.balance(paid_account("in-order", s.peer_id)) for s in winners)
        assert paid > 0 and handle.buyer.paid and paid == sum(handle.buyer.paid.values())


async def test_a_lease_ended_while_its_record_was_being_written_ends_in_the_book(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the lease book is written in worker threads: a lease's end could be written before the
    # lease itself (a job cancelled right after its winners accepted), and the lease then
    # stayed "active" in the book for good
    async with market_mesh(4, tmp_path, market_capacity=1) as nodes:
        buyer, sellers = nodes[0], nodes[1:]
        for seller in sellers:
            assert seller.market is not None
            _slowed(monkeypatch, seller.market.book, "put_lease")  # the cancel comes meanwhile
        handle = await _long_plain_job(buyer, "short-lived")
        await until_event(handle, "started")
        await handle.cancel()
        with trio.fail_after(60):
            await handle.wait()
        for seller in sellers:
            assert seller.market is not None
            if seller.peer_id in handle.buyer.roster:
                with trio.fail_after(10):
                    while (  # noqa: ASYNC110 - the book is written in a worker thread
                        lease := seller.market.book.lease(
                            "short-lived", LeaseRole.SELLER, buyer.peer_id
                        )
                    ) is None or not lease.state.final:
                        await trio.sleep(0.05)
                assert lease.state is LeaseState.CANCELLED


async def _long_plain_job(buyer: Node, job_id: str) -> JobHandle:
    """A 50-round plain job with two winners: under way long enough to be cancelled in it."""
    job = {**JOB, "job_id": job_id, "rounds": 50, "secure": False}
    return await buyer.submit_training(job, budget=5, min_peers=2, max_peers=2)


def _slowed(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> threading.Event:
    """Make ``owner.name`` (a store write, run in a worker thread) take 0.3 s longer; the
    event is set when a call begins."""
    real, began = getattr(owner, name), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        began.set()
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, slow)
    return began


async def test_a_lease_the_book_lost_in_a_crash_is_written_when_the_journal_is_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease is written to the book after its acceptance is journaled, in a task of its
    own: a node killed between the two lost it from the book for good (the buyer never
    wrote it again; a winner wrote it again in a task that the lease's end, replayed too,
    could overtake). Both come back with it, and the job's end ends it there (for a winner
    that saw the end before it was killed, also in its book)."""
    network = MemoryNetwork(seed=5)
    job = {**JOB, "job_id": "lost-write", "rounds": 6, "epochs": 1}
    nodes = RestartableNodes(network, tmp_path, GOSSIPING)
    async with trio.open_nursery() as nursery:
        sellers = [await nodes.start(nursery, i) for i in range(1, 6)]
        for seller in sellers:
            assert seller.market is not None
            monkeypatch.setattr(seller.market.book, "put_lease", _lost)
        async with open_node(GOSSIPING(tmp_path / "buyer"), network=network) as buyer:
            assert buyer.market is not None
            monkeypatch.setattr(buyer.market.book, "put_lease", _lost)
            await meshed([buyer, *sellers])
            handle = await buyer.submit_training(job, budget=5, min_peers=4, max_peers=4)
            await until_event(handle, "round", unit=1)
            roster = list(handle.buyer.roster)
            victim = next(s for s in sellers if s.peer_id in roster)
            index = sellers.index(victim) + 1
            nodes.kill(victim, index)  # the buyer stops too, at the end of this block
        async with open_node(GOSSIPING(tmp_path / "buyer"), network=network) as buyer:
            assert buyer.market is not None
            book = buyer.market.book
            assert all(book.lease("lost-write", LeaseRole.BUYER, peer) for peer in roster)
            back = await nodes.start(nursery, index)  # the same data directory
            assert back.market is not None
            assert back.market.book.lease("lost-write", LeaseRole.SELLER, buyer.peer_id)
            for seller in sellers:
                if seller is not victim:
                    await buyer.connect(seller.listen_addrs[0])
            await buyer.connect(back.listen_addrs[0])
            with trio.fail_after(120):
                final = await buyer.market.jobs["lost-write"].wait()
            assert final["state"] == "ended", final
            with trio.fail_after(10):
                while not all(  # noqa: ASYNC110 - the book is written in a worker thread
                    (lease := book.lease("lost-write", LeaseRole.BUYER, peer)) is not None
                    and lease.state.final
                    for peer in roster
                ):
                    await trio.sleep(0.05)
            # a winner that lost it and saw the job end: the replay writes it, then its end
            other = next(s for s in sellers if s.peer_id in roster and s is not victim)
            assert other.market is not None
            with trio.fail_after(30):
                while not other.market.seller.lease("lost-write").ended:  # type: ignore[union-attr]  # noqa: ASYNC110
                    await trio.sleep(0.05)
            index = sellers.index(other) + 1
            nodes.kill(other, index)
            again = await nodes.start(nursery, index)
            assert again.market is not None
            lease = again.market.book.lease("lost-write", LeaseRole.SELLER, buyer.peer_id)
            assert lease is not None and lease.state.final, lease
        nodes.stop_all()


def _lost(*args: Any, **kwargs: Any) -> None:
    """A lease book's write that a kill -9 cut off."""


async def test_no_matching_peer_names_the_requirement(tmp_path: Path) -> None:
    async with market_mesh(3, tmp_path) as nodes:
        with pytest.raises(NoMatchingPeers) as caught:
            await nodes[0].submit_training(
                {**JOB, "secure": False}, budget=5, min_peers=2,
                requirements=Requirements(min_memory_mb=2**39),
            )  # fmt: skip
        assert caught.value.excluded == {"memory": 2}


async def test_a_budget_beyond_the_available_credits_is_refused(tmp_path: Path) -> None:
    async with market_mesh(3, tmp_path, market_grant=1.0) as nodes:
        with pytest.raises(BudgetExceeded, match="available"):
            await nodes[0].submit_training(
                {**JOB, "secure": False}, budget=5, min_peers=2,
                requirements=Requirements(dataset=""),
            )  # fmt: skip


async def test_the_buyer_away_for_rounds_comes_back_and_settles(tmp_path: Path) -> None:
    """The roster trains on while the buyer is down; its debit notes wait (resent) and are
    acknowledged once it is back; the journal brings its job back as it was."""
    network = MemoryNetwork(seed=1)
    job = {**JOB, "job_id": "away", "rounds": 8, "epochs": 1}
    nodes = RestartableNodes(network, tmp_path, GOSSIPING)
    async with trio.open_nursery() as nursery:
        sellers = [await nodes.start(nursery, i) for i in range(1, 6)]
        async with open_node(GOSSIPING(tmp_path / "buyer"), network=network) as buyer:
            await meshed([buyer, *sellers])
            handle = await buyer.submit_training(job, budget=5, min_peers=4, max_peers=4)
            await until_event(handle, "round", unit=2)
        # the buyer is down: the winners go on training and note their debits
        working = [s for s in sellers if s.market is not None and "away" in s.market.work]
        with trio.fail_after(60):
            # the work's rounds move with no event to wait on: poll them
            while min(s.market.work["away"].round for s in working if s.market) < 4:  # noqa: ASYNC110
                await trio.sleep(0.1)
        async with open_node(GOSSIPING(tmp_path / "buyer"), network=network) as buyer:
            assert buyer.market is not None
            back = buyer.market.jobs["away"]  # replayed from the journal
            for seller in sellers:
                await buyer.connect(seller.listen_addrs[0])
            with trio.fail_after(90):
                final = await back.wait()
            assert final["state"] == "ended" and final["error"] is None
            assert final["rounds_done"] == 8
            for seller in working:
                assert seller.market is not None
                earned = seller.market.ledger.balance(earned_account("away", buyer.peer_id))
                paid = buyer.market.ledger.balance(paid_account("away", seller.peer_id))
                award = back.buyer.award_to(seller.peer_id)
                assert award is not None
                assert earned == paid == 8 * award.price  # every round, also those it missed
        nodes.stop_all()


async def test_the_estimate_follows_what_jobs_cleared_at_and_a_budget_below_it_is_refused(
    tmp_path: Path,
) -> None:
    async with market_mesh(6, tmp_path) as nodes:
        buyer = nodes[0]
        before = await buyer.pricing_estimate("training", "small", 4, 3)
        assert before.breakdown["source"] != "recent clearing prices"
        assert before.total == 4 * 3 * before.per_unit
        with pytest.raises(BudgetTooLow) as low:
            await buyer.submit_training(JOB, budget=before.total / MICRO / 2, min_peers=4)
        assert low.value.estimate == before.total
        handle = await buyer.submit_training(JOB, budget=5, min_peers=4, max_peers=4)
        with trio.fail_after(120):
            await handle.wait()
        after = await buyer.pricing_estimate("training", "small", 4, 3)
        assert after.breakdown["source"] == "recent clearing prices"
        clearing = handle.buyer.clearing
        assert clearing is not None
        assert after.per_unit <= max(winner.price for winner in clearing.winners)


async def test_rounds_are_paid_once_the_replicas_agree_and_their_models_are_shown(
    tmp_path: Path,
) -> None:
    """Replication (every winner of an exact round ends with the same model: four agree) and
    spot checks of every round (each winner sends the buyer the model its note names, over
    the transport): honest winners are paid for every round."""
    async with market_mesh(5, tmp_path, market_capacity=1) as nodes:
        buyer = nodes[0]
        checks = Verification(replicas=3, spot_rate=1.0)
        handle = await buyer.submit_training(
            JOB, budget=5, min_peers=4, max_peers=4, verification=checks
        )
        with trio.fail_after(120):
            final = await handle.wait()
        assert final["error"] is None, final
        assert [e for e in handle.events if e["event"] == "refused"] == []
        assert handle.rounds_done() == 3
        assert handle.buyer.refused == {}


async def test_a_winner_that_cannot_show_the_model_it_billed_for_is_not_paid_for_it(
    tmp_path: Path,
) -> None:
    """A lazy winner: its notes name the roster's model, but it forgets each round's model
    (as one that copied the digest and never trained would lack it). Every spot check fails:
    it is refused every round, its reputation records wrong results; the others are paid."""
    async with market_mesh(5, tmp_path, market_capacity=1) as nodes:
        buyer, sellers = nodes[0], nodes[1:]
        lazy = sellers[0]
        assert lazy.market is not None and buyer.market is not None

        class Forgetful(dict[int, bytes]):
            def __setitem__(self, key: int, value: bytes) -> None:
                pass  # keeps nothing

        def forget(event: str, document: dict[str, object]) -> None:
            assert lazy.market is not None
            for work in lazy.market.work.values():
                work.states = Forgetful()

        lazy.market.observers.append(forget)
        handle = await buyer.submit_training(
            JOB, budget=5, min_peers=4, max_peers=4,
            verification=Verification(replicas=1, spot_rate=1.0, window_s=5),
        )  # fmt: skip
        with trio.fail_after(120):
            final = await handle.wait()
        assert final["state"] == "ended", final
        roster = handle.buyer.roster
        assert lazy.peer_id in roster  # four of four: everyone was hired
        refused = [e for e in handle.events if e["event"] == "refused"]
        assert {e["peer"] for e in refused} == {str(lazy.peer_id)}
        assert all(e["reason"] == "proof" for e in refused)
        assert handle.buyer.refused == {lazy.peer_id: 3}
        assert buyer.market.ledger.balance(paid_account(JOB["job_id"], lazy.peer_id)) == 0
        assert lazy.market.ledger.balance(earned_account(JOB["job_id"], buyer.peer_id)) == 0
        for seller in sellers[1:]:
            assert handle.units_paid(seller.peer_id) == 3
        assert buyer.market.reputation.scores([lazy.peer_id])[lazy.peer_id] < min(
            buyer.market.reputation.scores([s.peer_id for s in sellers[1:]]).values()
        )


async def test_a_winner_killed_before_its_acknowledgement_came_is_paid_it_when_back(
    tmp_path: Path,
) -> None:
    """The buyer paid a unit and its acknowledgement was on the wire when the winner died:
    the winner never learnt of it. Started again, it replays its journal, sends that debit
    note again and the buyer answers with the same acknowledgement (no second payment): the
    ledgers agree to the micro-credit."""
    network = MemoryNetwork(seed=3, latency=0.02)  # an acknowledgement takes 20 ms to arrive
    job = {**JOB, "job_id": "cut-off", "rounds": 4}
    nodes = RestartableNodes(network, tmp_path, GOSSIPING)
    async with trio.open_nursery() as nursery:
        sellers = [await nodes.start(nursery, i) for i in range(1, 6)]
        async with open_node(GOSSIPING(tmp_path / "buyer"), network=network) as buyer:
            await meshed([buyer, *sellers])
            handle = await buyer.submit_training(job, budget=5, min_peers=4, max_peers=4)
            event = await until_event(
                handle, "round", unit=2
            )  # written ahead: its acknowledgement is on its way
            victim = next(s for s in sellers if str(s.peer_id) == event["seller"])
            index = sellers.index(victim) + 1
            assert victim.market is not None and buyer.market is not None
            nodes.kill(victim, index)  # the acknowledgement never arrives
            earned = victim.market.ledger.balance(earned_account("cut-off", buyer.peer_id))
            assert earned < buyer.market.ledger.balance(paid_account("cut-off", victim.peer_id))
            back = await nodes.start(nursery, index)  # the same data directory
            await back.connect(buyer.listen_addrs[0])
            # usually seconds; once 120 s in CI (not reproduced: a winner back after its peers
            # finished may wait roster_wait_s, 60 s, for them before it reports stopped)
            with trio.fail_after(240):
                final = await handle.wait()
            assert final["state"] == "ended", final
            await until_ledgers_agree(buyer, back, "cut-off")
            paid = buyer.market.ledger.balance(paid_account("cut-off", back.peer_id))
            award = handle.buyer.award_to(back.peer_id)
            assert award is not None and paid % award.price == 0  # whole units, none twice
            assert 2 * award.price <= paid <= 4 * award.price  # of the 4 rounds
        nodes.stop_all()


async def test_a_winner_replaced_while_it_was_down_does_not_train_when_back(
    tmp_path: Path,
) -> None:
    """A winner dies and the buyer replaces it. Started again, it asks the buyer before it
    resumes its lease's training: the job went on without it, so it does not train (nobody
    else would tell it); its notes are still settled."""
    network = MemoryNetwork(seed=4)
    job = {**JOB, "job_id": "moved-on", "rounds": 12}
    nodes = RestartableNodes(network, tmp_path, GOSSIPING)
    async with trio.open_nursery() as nursery:
        sellers = [await nodes.start(nursery, i) for i in range(1, 6)]
        async with open_node(GOSSIPING(tmp_path / "buyer"), network=network) as buyer:
            assert buyer.market is not None  # it finds the death within a round or two
            buyer.market.config = dataclasses.replace(
                buyer.market.config, status_every_s=0.2, silent_polls=2
            )
            await meshed([buyer, *sellers])
            handle = await buyer.submit_training(job, budget=12, min_peers=4, max_peers=4)
            event = await until_event(handle, "round", unit=1)
            victim = next(s for s in sellers if str(s.peer_id) == event["seller"])
            index = sellers.index(victim) + 1
            nodes.kill(victim, index)
            await until_event(handle, "failed", peer=str(victim.peer_id))
            back = await nodes.start(nursery, index)  # the same data directory
            assert back.market is not None
            with trio.fail_after(30):
                while (status := back.market.local_status("moved-on")) is None or (
                    status.state not in ("replaced", "ended")
                ):
                    assert status is None or status.state not in ("running", "finished")
                    await trio.sleep(0.05)
            assert status.state == "replaced", status
            with trio.fail_after(120):
                final = await handle.wait()
            assert final["state"] == "ended", final
            after = back.market.local_status("moved-on")  # it never trained again
            assert after is not None and (after.state, after.round) == ("replaced", status.round)
            await until_ledgers_agree(buyer, back, "moved-on")  # its notes are settled all the same
        nodes.stop_all()


async def test_the_buyer_gets_the_model_the_winners_agree_on(tmp_path: Path) -> None:
    """Before it settles, the buyer takes the model the winners ended with (``collusion + 1``
    of them agree on its digest), checked by that digest, into its store: ``/jobs/{id}/model``
    serves it. Weights nobody asked for are refused and counted."""
    import hashlib

    import numpy as np

    from meshfed.market.delivery import MAX_SENDS, MODEL_PREFIX
    from meshfed.market.messages import ModelQuery
    from meshfed.stats import RejectReason

    job = {**JOB, "job_id": "delivered"}
    async with market_mesh(6, tmp_path, market_capacity=1) as nodes:
        buyer, sellers = nodes[0], nodes[1:]
        handle = await buyer.submit_training(job, budget=5, min_peers=4, max_peers=4)
        with trio.fail_after(120):
            final = await handle.wait()
        assert final["state"] == "ended" and final["error"] is None
        (event,) = [e for e in handle.events if e["event"] == "model"]
        assert event["delivered"] and event["round"] == 3 and event["agreed"] == 4
        assert buyer.store is not None
        kept = buyer.store.load_checkpoint("delivered")
        assert kept is not None and kept.round == 2
        assert hashlib.sha256(kept.model.astype("<f4").tobytes()).hexdigest() == event["digest"]
        winners = [s for s in sellers if s.peer_id in handle.buyer.roster]
        for winner in winners:  # the same bytes every winner ended with
            assert winner.store is not None
            theirs = winner.store.load_checkpoint("delivered")
            assert theirs is not None
            np.testing.assert_array_equal(theirs.model, kept.model)
        # a winner pushing weights the buyer did not ask for
        before = buyer.stats.rejected[RejectReason.WRONG_CONTEXT]
        with pytest.raises(RequestFailed):
            await winners[0].send_array(
                buyer.peer_id, np.zeros(8, np.uint8), name=MODEL_PREFIX + b"delivered".hex()
            )
        assert buyer.stats.rejected[RejectReason.WRONG_CONTEXT] == before + 1
        # a buyer asking for the weights again and again: a winner sends them MAX_SENDS times
        source = next(w for w in winners if str(w.peer_id) == event["source"])
        again = ModelQuery(
            job="delivered", expires_ms=int(time.time() * 1000) + 30_000,
            digest=bytes.fromhex(event["digest"]),
        )  # fmt: skip
        for _ in range(MAX_SENDS - 1):
            await buyer.request(source.peer_id, again)
        with pytest.raises(RequestFailed, match="rate_limited"):
            await buyer.request(source.peer_id, again)
