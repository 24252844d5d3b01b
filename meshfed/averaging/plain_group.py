"""What the plain (unmasked) group sessions share: the roster, the run's context, the codec
its vectors travel in, and the checks every array passes before a session looks at it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..errors import RemoteProtocolError
from ..identity import PeerId
from ..secagg.keys import derived_context
from ..secagg.protocol import Action
from ..stats import RejectReason
from ..wire import Message
from .compression import Codec, Float32, Payload

__all__ = ["PlainGroupSession"]


class PlainGroupSession:
    """Base of :class:`~.butterfly.ButterflySession` and :class:`~.gather.GatherSession`.

    Args:
        domain: the protocol's name in its context (``meshfed-butterfly-v1`` ...).
        job, round, group, roster: the run (bound into its context).
        me: this peer (in ``roster``).
        values: this peer's 1-D float32 vector.
        codec: how vectors travel (:mod:`.compression`; default uncompressed float32); a
            codec other than ``none`` is bound into the context (``<domain>/<codec name>``).
        rng: the randomness of stochastic codecs (required with a codec).
    """

    #: what the session is called in rejection messages
    NAME = "group"

    def __init__(
        self,
        domain: bytes,
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
        if me not in roster or len(set(roster)) != len(roster):
            raise ValueError("a roster of distinct peers that includes this one")
        if values.ndim != 1 or values.dtype != np.float32:
            raise ValueError("values must be a 1-D float32 array")
        self.codec = codec or Float32()
        if self.codec.name != Float32().name:
            if rng is None:
                raise ValueError("a codec needs an rng")
            domain += b"/" + self.codec.name.encode()
        self._rng = rng if rng is not None else np.random.default_rng(0)  # float32: unused
        self.context = derived_context(domain, job=job, round=round, group=group, roster=roster)
        self.me = me
        self._roster = tuple(roster)
        self._values = values
        self._others = frozenset(roster) - {me}

    @property
    def contexts(self) -> tuple[bytes, ...]:
        """The one context of this run."""
        return (self.context,)

    def receive(self, sender: PeerId, message: Message) -> list[Action]:
        """No messages in a plain group run: always rejected."""
        raise RemoteProtocolError(
            f"{message.TYPE} in a {self.NAME}", reason=RejectReason.UNKNOWN_TYPE
        )

    def _encode(self, values: npt.NDArray[np.float32]) -> tuple[Payload, npt.NDArray[np.float32]]:
        """The payload for ``values`` and what the others will decode from it."""
        payload = self.codec.encode(values, self._rng)
        return payload, self.codec.decode(payload, len(values))

    def _admit(self, sender: PeerId, context: bytes) -> None:
        """The checks before any array is looked at: this run, and a member."""
        if context != self.context:
            raise RemoteProtocolError("array of another run", reason=RejectReason.WRONG_CONTEXT)
        if sender not in self._others:
            raise RemoteProtocolError("not in this group", reason=RejectReason.NOT_A_MEMBER)
