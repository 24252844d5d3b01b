"""The trio side of catching up (:mod:`.sync` holds the messages and the quorum rule): one
job's state offered to the roster, and the state a quorum of it agrees on, fetched and checked.

:class:`StateSync` answers :class:`~.sync.StateQuery` from the job's roster peers with the
state this peer offers (the one its next round starts from) and, asked to, sends it.
:meth:`StateSync.find` asks peers for their claims, takes the furthest state a quorum claims
(:func:`~.sync.agreed_state`), then fetches it from the peers that claimed it, one after the
other, until one sends a state whose digest is the claimed one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from ..arrays import ArrayHeader
from ..errors import MeshfedError, RemoteProtocolError
from ..identity import PeerId
from ..node import Node
from ..stats import RejectReason
from ..wire import Envelope
from .sync import (
    Agreed,
    Claim,
    StateAnswer,
    StateQuery,
    TrainingState,
    agreed_state,
    decode_state,
    encode_state,
    serve,
    state_digest,
    stop_serving,
)

__all__ = ["Found", "StateSync"]

log = logging.getLogger(__name__)

#: states of up to this many parameters are encoded and hashed in the event loop
_INLINE_PARAMETERS = 1 << 18


@dataclass(frozen=True, slots=True)
class Found:
    """A state a quorum agrees on: ``state`` is None when it is the one this peer holds."""

    claim: Claim
    state: TrainingState | None


class StateSync:
    """This peer's catching up in job ``job_id`` on ``node``.

    Args:
        parameters: the model's size (a state of another size is refused).
        members: who may ask for this peer's state (the job's rosters).
        on_query: called with every roster peer that asks (it is alive).
        query_s: how long one claim may take to come.
        send_s: how long sending or fetching one state may take.
    """

    def __init__(
        self,
        node: Node,
        *,
        job_id: str,
        parameters: int,
        members: Callable[[], frozenset[PeerId]],
        on_query: Callable[[PeerId], None],
        query_s: float,
        send_s: float,
    ) -> None:
        self._node = node
        self._job = job_id
        self._parameters = parameters
        self._members = members
        self._on_query = on_query
        self._query_s = query_s
        self._send_s = send_s
        self._prefix = f"trainstate.{job_id.encode().hex()}:"
        self._offer: tuple[TrainingState, npt.NDArray[np.uint8], bytes] | None = None
        self._expected: tuple[PeerId, Claim] | None = None
        self._received: TrainingState | None = None
        #: this peer's round failed and it waits for the others' result (said in answers)
        self.settling = False
        serve(node, job_id, self._answer)
        node.on_array(self._on_state, prefix=self._prefix, replace=True)

    def close(self) -> None:
        """Stop answering and taking states for the job (the node lets go of this one)."""
        stop_serving(self._node, self._job, self._answer)
        self._node.off_array(self._on_state, prefix=self._prefix)

    @property
    def offered(self) -> Claim:
        """What this peer claims now (round -1 before anything is offered)."""
        if self._offer is None:
            return Claim(-1, b"")
        return Claim(self._offer[0].next_round, self._offer[2])

    async def offer(self, state: TrainingState) -> None:
        """Offer ``state`` from now on (what a query is answered with)."""
        encoded, digest = await self.digest(state)
        self._offer = (state, encoded, digest)

    def offer_now(self, state: TrainingState) -> None:
        """:meth:`offer`, encoded and hashed right here (when nothing can wait: at start)."""
        encoded = encode_state(state)
        self._offer = (state, encoded, state_digest(self._job, encoded))

    async def digest(self, state: TrainingState) -> tuple[npt.NDArray[np.uint8], bytes]:
        """``state`` as it travels, and its digest (in a worker thread for a large model)."""

        def work() -> tuple[npt.NDArray[np.uint8], bytes]:
            encoded = encode_state(state)
            return encoded, state_digest(self._job, encoded)

        if len(state.model) > _INLINE_PARAMETERS:
            return await trio.to_thread.run_sync(work)
        return work()

    async def claims(
        self,
        peers: Sequence[PeerId],
        *,
        enough: Callable[[list[tuple[PeerId, Claim]]], bool] = lambda claims: False,
    ) -> list[tuple[PeerId, Claim]]:
        """Ask ``peers`` at once what they hold; returns the claims in the order they came (a
        peer that does not answer in time, or answers for another job, makes none), as soon
        as they are ``enough`` (a dead peer's silence is not waited for then)."""
        claims: list[tuple[PeerId, Claim]] = []

        async def ask(peer: PeerId, scope: trio.CancelScope) -> None:
            try:
                answer = await self._node.request(
                    peer, StateQuery(job=self._job), within=self._query_s
                )
            except MeshfedError:
                return
            body = answer.body
            if isinstance(body, StateAnswer) and body.job == self._job:
                claims.append((peer, Claim(body.next_round, body.digest, body.settling)))
                if enough(claims):
                    scope.cancel()

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer, nursery.cancel_scope)
        return claims

    async def find(
        self,
        peers: Sequence[PeerId],
        *,
        quorum: int,
        least: int,
        most: int,
        own: bytes,
        wait_s: float = 0.0,
        poll_s: float = 0.1,
    ) -> Found | None:
        """The furthest state, at round ``least`` to ``most``, that at least ``quorum`` of
        ``peers`` claim: asked again every ``poll_s`` until ``wait_s`` has passed (once, with
        0). A state at ``least`` whose digest is ``own`` is this peer's already (``state``
        None). Otherwise the state is fetched from the peers that claim it until one sends
        it with the claimed digest.

        Returns:
            None if no state has a quorum (or none of its claimants sent it) in time, or, while
            :attr:`settling`, as soon as every asked peer answers that it is settling round
            ``least - 1`` too (none of them will end it with a result).
        """
        deadline = trio.current_time() + wait_s

        def agreed_on(claims: list[tuple[PeerId, Claim]]) -> Agreed | None:
            return agreed_state(claims, quorum=quorum, least=least, most=most)

        while True:
            claims = await self.claims(peers, enough=lambda claims: agreed_on(claims) is not None)
            agreed = agreed_on(claims)
            if agreed is not None:
                if agreed.claim == Claim(least, own):
                    return Found(agreed.claim, None)
                state = await self._fetch(agreed.claim, agreed.peers)
                if state is not None:
                    return Found(agreed.claim, state)
            stuck = [c for _, c in claims if c.settling and c.next_round == least - 1]
            if trio.current_time() + poll_s > deadline or (
                self.settling and len(stuck) == len(peers)
            ):
                return None
            await trio.sleep(poll_s)

    async def _fetch(self, claim: Claim, peers: Sequence[PeerId]) -> TrainingState | None:
        """The state ``claim`` names, from the first of ``peers`` that sends it intact."""
        for peer in peers:
            self._expected = (peer, claim)
            try:
                await self._node.request(
                    peer, StateQuery(job=self._job, send=True), within=self._send_s
                )
            except MeshfedError as exc:
                log.info("state fetch failed", extra={"peer": peer.short(), "error": repr(exc)})
            finally:
                self._expected = None
            received = self._take()
            if received is not None:
                return received
        return None

    def _take(self) -> TrainingState | None:
        """The state that came for the last fetch, if one did (then forgotten)."""
        received, self._received = self._received, None
        return received

    async def _answer(self, envelope: Envelope, query: StateQuery) -> StateAnswer:
        """What we hold; with ``send``, the state itself goes first."""
        if envelope.sender not in self._members():
            raise RemoteProtocolError(
                "a state query from outside the roster", reason=RejectReason.NOT_A_MEMBER
            )
        self._on_query(envelope.sender)
        if self._offer is None:
            raise RemoteProtocolError("no state offered yet", reason=RejectReason.WRONG_CONTEXT)
        state, encoded, digest = self._offer
        if query.send:
            with trio.fail_after(self._send_s):
                await self._node.send_array(
                    envelope.sender, encoded, name=f"{self._prefix}{state.next_round}"
                )
        return StateAnswer(
            job=self._job, next_round=state.next_round, digest=digest, settling=self.settling
        )

    async def _on_state(self, envelope: Envelope, header: ArrayHeader, array: Any) -> None:
        """Keep the state we asked for, if it is the one claimed."""
        expected = self._expected
        if expected is None or envelope.sender != expected[0]:
            raise RemoteProtocolError(
                "a training state nobody asked for", reason=RejectReason.NOT_A_MEMBER
            )
        claim = expected[1]
        state = decode_state(array, parameters=self._parameters)
        if state.next_round != claim.next_round or state_digest(self._job, array) != claim.digest:
            raise RemoteProtocolError(
                f"a training state for round {state.next_round} that is not the one claimed "
                f"(round {claim.next_round}, digest {claim.digest.hex()[:16]}...)",
                reason=RejectReason.BAD_ARRAY,
            )
        self._received = state
