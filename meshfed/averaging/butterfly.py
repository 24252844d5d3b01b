"""Plain butterfly all-reduce of one group, as a sans-IO session (no masks, no dropouts).

Peer m of the roster owns slice m of the vector: every peer sends slice m to its owner, the
owner sums the slices and sends the slice sum back to everyone, so each peer sends and receives
about ``2 (g - 1) / g`` of a vector (hivemind's all-reduce, without its load balancing). It is
what secure aggregation costs are measured against, and the averaging used when secure
aggregation is off. An owner that misses its deadline ends the run (:class:`Aborted`), and
the driver may re-run the group with the members whose arrays of that phase came
(:meth:`ButterflySession.present`): a dead member costs one deadline, not the step. Members
that saw different sets derive different contexts, and their re-runs fail instead of mixing;
a member that finished the first run does not re-run, so (rarely: a sum that reached some
members only) members can end with different means, which the caller must allow for.

With a codec (:mod:`.compression`; fp16 or int8, not top-k: a slice sum is dense) both the
slices and the slice sums travel compressed; an owner adds the decoded slices to its own in
float32 and keeps, as its part of the result, what the others decode from its slice sum, so
that every member ends with the same vector.

Same interface as :class:`meshfed.secagg.protocol.SecAggSession`, so the same driver runs both.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import RemoteProtocolError
from ..identity import PeerId
from ..secagg.protocol import (
    Aborted,
    AbortReason,
    Action,
    Finished,
    Progress,
    SendSlice,
    SliceKind,
    slice_bounds,
)
from ..stats import RejectReason
from .compression import Codec, ErrorFeedback, TopK
from .plain_group import PlainGroupSession

__all__ = ["ButterflySession"]


class _Phase(enum.IntEnum):
    INPUT = 1
    SUM = 2
    DONE = 3


_PHASE_OF = {SliceKind.PLAIN_INPUT: _Phase.INPUT, SliceKind.PLAIN_SUM: _Phase.SUM}


class ButterflySession(PlainGroupSession):
    """One peer's plain all-reduce of ``values`` (1-D float32) with ``roster``."""

    NAME = "butterfly"

    def __init__(
        self,
        *,
        job: bytes,
        round: int,
        group: int,
        roster: Sequence[PeerId],
        me: PeerId,
        values: npt.NDArray[np.float32],
        codec: Codec | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        if isinstance(codec, TopK | ErrorFeedback):
            raise ValueError("top-k cannot be summed slice by slice: use an all-gather")
        super().__init__(
            b"meshfed-butterfly-v1",
            job=job, round=round, group=group, roster=roster, me=me, values=values,
            codec=codec, rng=rng,
        )  # fmt: skip
        if len(values) < len(roster):
            raise ValueError(f"values must have at least {len(roster)} elements")
        self._owners = self._roster
        self._phase = _Phase.INPUT
        self._inbox: dict[_Phase, dict[PeerId, npt.NDArray[Any]]] = {p: {} for p in _Phase}
        self._own = values[slice(*self._bounds(me))]
        self._own_sum: npt.NDArray[np.float32] | None = None
        self._aborted_in: _Phase | None = None

    def progress(self) -> Progress:
        """The step and how many of its answers are in."""
        arrived = len(self._inbox[self._phase]) if self._phase < _Phase.DONE else 0
        return Progress((0, int(self._phase)), len(self._others), arrived, self._phase.name.lower())

    def start(self) -> list[Action]:
        """Send every owner its slice."""
        actions: list[Action] = [
            SendSlice(
                owner,
                SliceKind.PLAIN_INPUT,
                self.codec.encode(self._values[slice(*self._bounds(owner))], self._rng),
                self.context,
            )
            for owner in self._owners
            if owner != self.me
        ]
        return actions + self._progress()

    def receive_slice(
        self, sender: PeerId, kind: SliceKind, context: bytes, array: npt.NDArray[Any]
    ) -> list[Action]:
        """Take a slice (as its owner) or a slice sum (from its owner).

        Raises:
            RemoteProtocolError: wrong run, stranger, late, duplicate, or a slice the codec
                refuses (wrong dtype or length, not finite ...).
        """
        phase = _PHASE_OF.get(kind)
        if phase is None:
            raise RemoteProtocolError(f"{kind} in a butterfly", reason=RejectReason.UNKNOWN_TYPE)
        self._admit(sender, context)
        if phase < self._phase or self._phase is _Phase.DONE:
            raise RemoteProtocolError("slice after its phase", reason=RejectReason.LATE)
        if sender in self._inbox[phase]:
            raise RemoteProtocolError("second slice", reason=RejectReason.DUPLICATE)
        lo, hi = self._bounds(self.me if phase is _Phase.INPUT else sender)
        self._inbox[phase][sender] = self.codec.decode(array, hi - lo)
        return self._progress()

    def expire(self) -> list[Action]:
        """The deadline passed with slices missing: the run ends without a sum."""
        if self._phase is _Phase.DONE:
            return []
        missing = len(self._others) - len(self._inbox[self._phase])
        reason = AbortReason.OWNER_LOST if self._phase is _Phase.INPUT else AbortReason.SLICE_LOST
        self._phase, self._aborted_in = _Phase.DONE, self._phase
        return [Aborted(reason, f"{missing} peers missed the deadline", released=False)]

    def present(self) -> tuple[PeerId, ...] | None:
        """After the run aborted: this peer and the members whose arrays of the phase it
        ended in came (input slices, or slice sums), in roster order, whom a re-run can go
        on with; None if the run has not aborted."""
        if self._aborted_in is None:
            return None
        came = self._inbox[self._aborted_in]
        return tuple(peer for peer in self._roster if peer == self.me or peer in came)

    def _bounds(self, owner: PeerId) -> tuple[int, int]:
        return slice_bounds(len(self._values), len(self._owners), self._owners.index(owner))

    def _progress(self) -> list[Action]:
        if self._phase is _Phase.INPUT and len(self._inbox[_Phase.INPUT]) == len(self._others):
            # in roster order, not arrival order: members of other groups holding the same
            # inputs at the same positions (later steps of an exact round) get the same sum
            inputs = self._inbox[_Phase.INPUT]
            total = np.zeros_like(self._own)
            for peer in self._roster:
                total += self._own if peer == self.me else inputs[peer]
            payload, self._own_sum = self._encode(total)
            self._phase = _Phase.SUM
            return [
                SendSlice(peer, SliceKind.PLAIN_SUM, payload, self.context)
                for peer in self._owners
                if peer != self.me
            ] + self._progress()
        sums = self._inbox[_Phase.SUM]
        if self._phase is _Phase.SUM and len(sums) == len(self._others):
            assert self._own_sum is not None
            self._phase = _Phase.DONE
            parts = [self._own_sum if owner == self.me else sums[owner] for owner in self._owners]
            return [Finished(tuple(parts), self._owners)]
        return []
