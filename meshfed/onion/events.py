"""What the onion cores hand back: actions for the driver and the reasons a packet is dropped.

A relay's :meth:`~meshfed.onion.relay.Relay.process` returns exactly one of
:class:`Forward`, :class:`Deliver`, :class:`DeliverReply` or :class:`Drop`; the reply book
and the reassembler return :class:`Drop` for what they refuse. Nothing else leaves them:
whatever bytes arrive, the driver counts a :class:`DropReason` and carries on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..identity import PeerId
from ..stats import RejectReason

__all__ = ["Deliver", "DeliverReply", "Drop", "DropReason", "Forward", "RelayAction"]


class DropReason(enum.StrEnum):
    """Why an onion packet, reply or fragment was dropped (count them; never answer them)."""

    #: not exactly one packet long (or a fragment body of the wrong size)
    WRONG_SIZE = "wrong_size"
    #: a packet format version this node does not speak
    BAD_VERSION = "bad_version"
    #: built for a key epoch this node holds no key for (too old, too new or never)
    UNKNOWN_EPOCH = "unknown_epoch"
    #: alpha is a low-order point
    BAD_ELEMENT = "bad_element"
    #: the header MAC (gamma) does not verify: tampered, or not for this node
    BAD_MAC = "bad_mac"
    #: this packet (its replay tag) was processed before in its epoch
    REPLAYED = "replayed"
    #: the replay cache of the epoch is full; refused rather than forgetting tags
    REPLAY_CACHE_FULL = "replay_cache_full"
    #: the routing command, next hop or delay is not one this node accepts
    BAD_ROUTING = "bad_routing"
    #: the payload's authenticator is not all zero: tampered on the way
    BAD_PAYLOAD = "bad_payload"
    #: a reply for a SURB this node does not hold: unknown, expired or already used
    UNKNOWN_SURB = "unknown_surb"
    #: a fragment whose header is out of range or whose padding is not zero
    BAD_FRAGMENT = "bad_fragment"
    #: a fragment that contradicts earlier fragments of its message (count, position)
    FRAGMENT_CONFLICT = "fragment_conflict"
    #: reassembly is at its bound of messages or bytes
    REASSEMBLY_FULL = "reassembly_full"

    @property
    def counted_as(self) -> RejectReason:
        """The node-wide reject reason this drop is counted under in :class:`NodeStats`."""
        return _COUNTED_AS[self]


_COUNTED_AS = {
    DropReason.WRONG_SIZE: RejectReason.MALFORMED,
    DropReason.BAD_VERSION: RejectReason.BAD_VERSION,
    DropReason.UNKNOWN_EPOCH: RejectReason.STALE,
    DropReason.BAD_ELEMENT: RejectReason.BAD_FIELD,
    DropReason.BAD_MAC: RejectReason.BAD_SIGNATURE,
    DropReason.REPLAYED: RejectReason.REPLAYED,
    DropReason.REPLAY_CACHE_FULL: RejectReason.OVERLOADED,
    DropReason.BAD_ROUTING: RejectReason.BAD_FIELD,
    DropReason.BAD_PAYLOAD: RejectReason.INCONSISTENT,
    DropReason.UNKNOWN_SURB: RejectReason.DUPLICATE,
    DropReason.BAD_FRAGMENT: RejectReason.MALFORMED,
    DropReason.FRAGMENT_CONFLICT: RejectReason.INCONSISTENT,
    DropReason.REASSEMBLY_FULL: RejectReason.OVERLOADED,
}


@dataclass(frozen=True, slots=True)
class Forward:
    """Send ``packet`` to ``next_hop`` after ``delay`` seconds.

    The driver must store ``(epoch, replay_tag)`` (see :class:`~.replay.ReplayCache`) before
    it sends, so that a relay restarted after sending still drops a replay.
    """

    next_hop: PeerId
    packet: bytes
    delay: float
    epoch: int
    replay_tag: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """This node is the packet's destination: ``body`` is what the sender put in it
    (:data:`~.packet.BODY_SIZE` bytes, its authenticator checked). Store the replay tag as
    for :class:`Forward`."""

    body: bytes
    epoch: int
    replay_tag: bytes


@dataclass(frozen=True, slots=True)
class DeliverReply:
    """This node made the SURB this reply travelled on: open ``payload`` with
    :meth:`~.surb.SurbBook.open` and ``surb_id``. Store the replay tag as for :class:`Forward`."""

    surb_id: bytes
    payload: bytes
    epoch: int
    replay_tag: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    """Nothing to do but count ``reason``; ``detail`` is for debug logs only."""

    reason: DropReason
    detail: str = ""


#: what :meth:`~meshfed.onion.relay.Relay.process` returns
RelayAction = Forward | Deliver | DeliverReply | Drop
