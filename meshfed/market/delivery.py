"""The trained model in the buyer's hands (SPEC.md, "7f.6 Delivery of the model").

A buyer pays for rounds of training on data it does not hold; what it gets at the end is the
model. Before it settles a job whose every unit was done, the buyer asks each active winner
(:class:`~.messages.ModelQuery`, no digest) for the model it holds: its latest checkpoint, as
a :class:`~.messages.ModelOffer` (round, SHA-256 of its float32 weights, size). The offer that
``collusion + 1`` winners agree on (every winner, when fewer are left) is the job's model: with
the exact schedule every winner ends a round with the same bytes, so honest winners agree,
and up to ``collusion`` colluders cannot outvote them. The buyer then asks one agreeing winner
after another for the weights (a query with that digest); the weights come as the array
``marketmodel.<job hex>`` and count only from a winner asked, and only if their SHA-256 is the
agreed digest. The buyer keeps them in its store as the job's checkpoint (a job of its own,
state ``finished``), so ``/jobs/{id}/model`` serves them and a backup holds them.

Not guaranteed: a job whose winners hold different models (push-sum gossip, robust
aggregation that kept models apart, more colluders than ``collusion``) has no agreed model and
is settled without one (``model`` event with ``delivered: false``); the buyer pays for rounds,
not for the model (the debit notes were paid as they came).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from ..arrays import ArrayHeader
from ..errors import ConfigError, MeshfedError, RemoteProtocolError, TransportError
from ..identity import PeerId
from ..stats import RejectReason
from ..store import Checkpoint, JobState
from ..wire import Envelope
from .messages import ModelOffer, ModelQuery
from .order import spec_from
from .verification import evidence_of

if TYPE_CHECKING:
    from ..node import Node
    from ..training.spec import JobSpec
    from .driver import JobHandle
    from .lease import BuyerJob

log = logging.getLogger(__name__)

__all__ = ["MODEL_PREFIX", "ModelDelivery"]

#: the weights travel as arrays named ``<prefix><job hex>``
MODEL_PREFIX = "marketmodel."
#: how often a winner sends one job's weights (a buyer that asks again and again for a large
#: model would make the winner upload it again and again)
MAX_SENDS = 3


def _expiry() -> int:
    """A query's or an offer's expiry: 30 s from now, in ms."""
    return int((time.time() + 30) * 1000)


@dataclass(slots=True)
class _Wanted:
    """Weights asked of one winner: the digest and the float32 count they must have, and what
    came."""

    digest: bytes
    parameters: int
    weights: bytes | None = None
    done: trio.Event = field(default_factory=trio.Event)


class ModelDelivery:
    """Both sides of a model's delivery for one node's market.

    Args:
        node: the node (its store holds the checkpoints served and the models delivered).
        buyer_of: the buyer of this node's lease in a job, if it holds one.
        within_s: the deadline of each request and of each transfer.
    """

    def __init__(
        self, node: Node, *, buyer_of: Callable[[str], PeerId | None], within_s: float
    ) -> None:
        self._node = node
        self._buyer_of = buyer_of
        self._within_s = within_s
        self._wanted: dict[tuple[PeerId, str], _Wanted] = {}
        self._sent: Counter[str] = Counter()

    def start(self, nursery: trio.Nursery) -> None:
        """Answer model queries and take the weights asked for."""
        self._nursery = nursery
        self._node.handle(ModelQuery, self._query)
        self._node.on_array(self._weights, prefix=MODEL_PREFIX)

    # -- the winner -------------------------------------------------------------------------

    async def _query(self, envelope: Envelope, query: ModelQuery) -> ModelOffer:
        """Our latest checkpoint of a job we hold a lease in from this buyer; with its digest,
        the weights follow as an array."""
        if self._buyer_of(query.job) != envelope.sender:
            raise RemoteProtocolError(
                f"no lease of {envelope.sender} in {query.job!r}", reason=RejectReason.NOT_A_MEMBER
            )
        store = self._node.store
        assert store is not None  # the market runs with a store
        checkpoint = await trio.to_thread.run_sync(store.load_checkpoint, query.job)
        if checkpoint is None:
            raise RemoteProtocolError(
                f"no model of {query.job!r} here yet", reason=RejectReason.WRONG_CONTEXT
            )
        weights = checkpoint.model.astype("<f4").tobytes()
        offer = ModelOffer(
            job=query.job, expires_ms=_expiry(), round=checkpoint.round + 1,
            digest=evidence_of(weights), parameters=len(checkpoint.model),
        )  # fmt: skip
        if query.digest:
            if not hmac.compare_digest(query.digest, offer.digest):
                raise RemoteProtocolError(
                    "not the model this node holds", reason=RejectReason.INCONSISTENT
                )
            if self._sent[query.job] >= MAX_SENDS:
                raise RemoteProtocolError(
                    f"the model of {query.job!r} was sent {MAX_SENDS} times",
                    reason=RejectReason.RATE_LIMITED,
                )
            self._sent[query.job] += 1
            self._nursery.start_soon(self._send, envelope.sender, query.job, weights)
        return offer

    async def _send(self, buyer: PeerId, job: str, weights: bytes) -> None:
        name = MODEL_PREFIX + job.encode().hex()
        try:
            await self._node.send_array(
                buyer, np.frombuffer(weights, np.uint8), name=name, within=self._within_s
            )
        except (TransportError, RemoteProtocolError) as exc:
            log.warning("model not delivered", extra={"job": job, "error": str(exc)})

    # -- the buyer --------------------------------------------------------------------------

    async def collect(self, handle: JobHandle) -> None:
        """Take the model the winners agree on into this node's store (see the module's
        docstring); a ``model`` event on ``handle`` says how it went."""
        buyer = handle.buyer
        offers = await self._offers(buyer)
        spec = _spec(handle)
        if spec is None:
            handle._add("model", delivered=False, offers=len(offers), quorum=0)
            return
        quorum = min(spec.averaging.collusion + 1, len(buyer.active))
        claims = Counter((o.round, o.digest, o.parameters) for o in offers.values())
        agreed = [claim for claim, count in claims.items() if count >= quorum]
        if not agreed:
            handle._add("model", delivered=False, offers=len(offers), quorum=quorum)
            return
        chosen = max(agreed)  # the furthest round
        holders = [p for p, o in offers.items() if (o.round, o.digest, o.parameters) == chosen]
        for peer in holders:
            weights = await self._fetch(peer, buyer.job, chosen[1], chosen[2])
            if weights is None:
                continue
            try:
                await trio.to_thread.run_sync(self._keep, handle, spec.to_json(), chosen, weights)
            except MeshfedError as exc:
                log.error("delivered model not kept", extra={"job": buyer.job, "error": str(exc)})
                break
            handle._add(
                "model", delivered=True, round=chosen[0], digest=chosen[1].hex(),
                parameters=chosen[2], agreed=claims[chosen], source=str(peer),
            )  # fmt: skip
            return
        handle._add("model", delivered=False, offers=len(offers), quorum=quorum)

    async def _offers(self, buyer: BuyerJob) -> dict[PeerId, ModelOffer]:
        offers: dict[PeerId, ModelOffer] = {}

        async def ask(peer: PeerId) -> None:
            query = ModelQuery(job=buyer.job, expires_ms=_expiry(), digest=b"")
            with trio.move_on_after(self._within_s):
                try:
                    envelope = await self._node.request(peer, query, within=self._within_s)
                except (TransportError, RemoteProtocolError):
                    return
                body = envelope.body
                if isinstance(body, ModelOffer) and body.job == buyer.job:
                    offers[peer] = body

        async with trio.open_nursery() as nursery:
            for peer in buyer.active:
                nursery.start_soon(ask, peer)
        return offers

    async def _fetch(self, peer: PeerId, job: str, digest: bytes, parameters: int) -> bytes | None:
        """The ``parameters`` weights ``peer`` holds under ``digest``, or None (refused, late,
        wrong)."""
        wanted = self._wanted[peer, job] = _Wanted(digest, parameters)
        try:
            query = ModelQuery(job=job, expires_ms=_expiry(), digest=digest)
            await self._node.request(peer, query, within=self._within_s)
            with trio.move_on_after(self._within_s):
                await wanted.done.wait()
        except (TransportError, RemoteProtocolError) as exc:
            log.info("model not fetched", extra={"job": job, "peer": str(peer), "error": str(exc)})
        finally:
            del self._wanted[peer, job]
        return wanted.weights

    async def _weights(self, envelope: Envelope, header: ArrayHeader, array: Any) -> None:
        """Weights a winner sent: taken only if asked of it and of the agreed digest."""
        try:
            job = bytes.fromhex(header.name.removeprefix(MODEL_PREFIX)).decode()
        except ValueError:
            job = ""
        wanted = self._wanted.get((envelope.sender, job))
        if wanted is None or wanted.done.is_set():
            raise RemoteProtocolError("weights nobody asked for", reason=RejectReason.WRONG_CONTEXT)
        weights = array.tobytes() if array.dtype == np.uint8 else b""
        if len(weights) != 4 * wanted.parameters:  # agreed on by colluders beyond the bound
            raise RemoteProtocolError(
                f"{len(weights)} bytes of weights, not the offer's {wanted.parameters} float32s",
                reason=RejectReason.BAD_ARRAY,
            )
        if not hmac.compare_digest(evidence_of(weights), wanted.digest):
            raise RemoteProtocolError(
                "weights that are not the agreed model", reason=RejectReason.INCONSISTENT
            )
        wanted.weights = weights
        wanted.done.set()

    def _keep(
        self, handle: JobHandle, spec: str, chosen: tuple[int, bytes, int], weights: bytes
    ) -> None:
        store = self._node.store
        assert store is not None
        job, (round, digest, _) = handle.job_id, chosen
        report = handle.report
        score = 0.0 if report is None or report.accuracy is None else report.accuracy
        store.put_job(job, spec)
        model = np.frombuffer(weights, "<f4").astype(np.float32)
        store.save_round(Checkpoint(job_id=job, round=round - 1, model=model, score=score), keep=1)
        store.set_job_state(
            job, JobState.FINISHED, f"the model of round {round} ({digest.hex()[:16]}), delivered"
        )


def _spec(handle: JobHandle) -> JobSpec | None:
    """The job as its winners ran it: with the roster it ended with, or, if a job may not run
    with that one (fewer winners than secure groups need, after failures), the one it started
    with; None if neither (logged)."""
    buyer = handle.buyer
    started: list[str] = next((e["roster"] for e in handle.events if e["event"] == "started"), [])
    error: ConfigError | None = None
    for roster in ([str(peer) for peer in buyer.roster], started):
        try:
            return spec_from(buyer.rfq.spec, roster)
        except ConfigError as exc:
            error = exc
    log.warning("no spec for the model", extra={"job": buyer.job, "error": str(error)})
    return None
