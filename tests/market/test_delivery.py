"""Which job spec a delivered model is kept under: the roster the job ended with, else the one
it started with (a secure job that went on with 3 winners after a failure is not a job that
could start: its spec does not validate); weights that are not what was offered."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import trio

from meshfed.errors import RequestFailed
from meshfed.identity import Identity
from meshfed.market.delivery import MODEL_PREFIX, ModelDelivery, _spec
from meshfed.market.messages import ModelOffer, ModelQuery
from meshfed.market.verification import evidence_of
from meshfed.stats import RejectReason
from meshfed.testing import open_memory_mesh
from meshfed.wire import Envelope

JOB = {"job_id": "kept", "rounds": 3, "dataset": "digits", "partition": "iid"}


def handle(ended: list[str], started: list[str]) -> Any:
    buyer = SimpleNamespace(
        job="kept",
        rfq=SimpleNamespace(spec=json.dumps(JOB).encode()),
        roster=tuple(ended),
    )
    return SimpleNamespace(buyer=buyer, events=[{"event": "started", "roster": started}])


def test_the_roster_it_ended_with_when_a_job_may_run_with_it() -> None:
    four = [str(Identity.generate().peer_id) for _ in range(4)]
    spec = _spec(handle(four, [*four[:3], str(Identity.generate().peer_id)]))
    assert spec is not None and list(spec.roster) == four


def test_the_roster_it_started_with_when_the_end_is_too_small_for_secure_groups() -> None:
    four = [str(Identity.generate().peer_id) for _ in range(4)]
    spec = _spec(handle(four[:3], four))
    assert spec is not None and list(spec.roster) == four


def test_none_when_no_roster_makes_a_job() -> None:
    three = [str(Identity.generate().peer_id) for _ in range(3)]
    assert _spec(handle(three, three[:2])) is None


async def test_agreed_weights_of_another_size_than_offered_are_refused(tmp_path: Path) -> None:
    """More colluders than the bound (here the one winner left: a quorum of one) agree on the
    digest of bytes that are not the offer's float32 weights: the buyer refuses them, counted,
    keeps no model and goes on (a ``model`` event, not delivered)."""
    junk, job = b"12345", "kept"
    async with open_memory_mesh(2, tmp_path) as (buyer, winner), trio.open_nursery() as nursery:
        await buyer.connect(winner.listen_addrs[0])

        async def send_junk() -> None:
            with contextlib.suppress(RequestFailed):
                await winner.send_array(
                    buyer.peer_id,
                    np.frombuffer(junk, np.uint8),
                    name=MODEL_PREFIX + job.encode().hex(),
                )

        async def offer(envelope: Envelope, query: ModelQuery) -> ModelOffer:
            if query.digest:  # the weights asked for: five bytes
                nursery.start_soon(send_junk)
            return ModelOffer(
                job=job, expires_ms=int(time.time() * 1000) + 30_000, round=3,
                digest=evidence_of(junk), parameters=2,
            )  # fmt: skip

        winner.handle(ModelQuery, offer)
        delivery = ModelDelivery(buyer, buyer_of=lambda _: None, within_s=1.0)
        delivery.start(nursery)
        four = [str(winner.peer_id), *(str(Identity.generate().peer_id) for _ in range(3))]
        events: list[dict[str, Any]] = []
        bought = handle(four, four)
        bought.buyer.active = [winner.peer_id]
        bought.job_id, bought.report = job, None
        bought._add = lambda name, **fields: events.append({"event": name, **fields})
        await delivery.collect(bought)
        assert [e["event"] for e in events] == ["model"] and not events[0]["delivered"]
        assert buyer.stats.rejected[RejectReason.BAD_ARRAY] == 1
        assert buyer.store is not None and buyer.store.load_checkpoint(job) is None
        nursery.cancel_scope.cancel()
