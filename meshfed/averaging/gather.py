"""All-gather of one group, as a sans-IO session: every member gets every member's vector.

For robust aggregation outside secure aggregation (coordinate-wise median, trimmed mean, Krum,
centred clipping need the individual vectors). Each member sends its whole vector to every
other member (``gather.vector:<context>``), so it costs ``(g - 1)`` vectors each way, against
about 2 for a butterfly. When the deadline passes, the members that arrived are enough if they
are a majority of the group (with this peer); members can then end up with different sets, and
so with slightly different aggregates, which the next round's averaging reconciles.

With a codec (:mod:`.compression`, top-k above all, which the butterfly cannot carry) every
member sends its payload instead and keeps, as its own part, what the others decode from it;
with ``everyone`` a missing vector ends the run, so that every member that finishes holds the
same parts and can sum them, in roster order, to the same mean.

Same interface as :class:`meshfed.secagg.protocol.SecAggSession`.
"""

from __future__ import annotations

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
)
from ..stats import RejectReason
from .compression import Codec
from .plain_group import PlainGroupSession

__all__ = ["GatherSession"]


class GatherSession(PlainGroupSession):
    """One peer's all-gather of ``values`` (1-D float32) with ``roster``; with ``everyone``,
    only a complete gather finishes."""

    NAME = "gather"

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
        everyone: bool = False,
    ) -> None:
        super().__init__(
            b"meshfed-gather-v1",
            job=job, round=round, group=group, roster=roster, me=me, values=values,
            codec=codec, rng=rng,
        )  # fmt: skip
        self._everyone = everyone
        self._own = values
        self._received: dict[PeerId, npt.NDArray[Any]] = {}
        self._done = False

    def progress(self) -> Progress:
        """One step: the vectors in."""
        step = (0, 2 if self._done else 1)
        return Progress(step, len(self._others), len(self._received), "gather")

    def start(self) -> list[Action]:
        """Send this peer's vector (its payload) to every other member."""
        payload, self._own = self._encode(self._values)
        sends: list[Action] = [
            SendSlice(peer, SliceKind.GATHER, payload, self.context)
            for peer in self._roster
            if peer != self.me
        ]
        return sends + self._finish_if_complete()

    def receive_slice(
        self, sender: PeerId, kind: SliceKind, context: bytes, array: npt.NDArray[Any]
    ) -> list[Action]:
        """Take a member's vector.

        Raises:
            RemoteProtocolError: wrong kind or run, stranger, late, duplicate, or a vector the
                codec refuses (wrong dtype or length, not finite ...).
        """
        if kind is not SliceKind.GATHER:
            raise RemoteProtocolError(f"{kind} in a gather", reason=RejectReason.UNKNOWN_TYPE)
        self._admit(sender, context)
        if self._done:
            raise RemoteProtocolError("vector after the gather ended", reason=RejectReason.LATE)
        if sender in self._received:
            raise RemoteProtocolError("second vector", reason=RejectReason.DUPLICATE)
        self._received[sender] = self.codec.decode(array, len(self._values))
        return self._finish_if_complete()

    def expire(self) -> list[Action]:
        """The deadline passed: finish with a majority (unless ``everyone``), or abort."""
        if self._done:
            return []
        if not self._everyone and len(self._received) + 1 > len(self._roster) // 2:
            return self._finish()
        self._done = True
        detail = f"only {len(self._received) + 1} of {len(self._roster)} vectors arrived"
        return [Aborted(AbortReason.TOO_FEW, detail, released=False)]

    def _finish_if_complete(self) -> list[Action]:
        return self._finish() if len(self._received) == len(self._others) else []

    def _finish(self) -> list[Action]:
        self._done = True
        present = [p for p in self._roster if p == self.me or p in self._received]
        parts = tuple(self._own if p == self.me else self._received[p] for p in present)
        return [Finished(parts, tuple(present))]
