"""Onion routing: Sphinx packets, relays, single-use reply blocks (SPEC.md, "Onion routing").

Pure cores, no I/O: :mod:`.packet` (build and peel the fixed-size packets), :mod:`.relay`
(one packet in, one action out), :mod:`.surb` (reply blocks and the book of those awaiting
replies), :mod:`.epochs` (key epochs and the key ring), :mod:`.replay` (the replay-tag cache),
:mod:`.fragments` (messages larger than one packet), :mod:`.lioness` and :mod:`.primitives`
(the ciphers). A driver feeds :meth:`Relay.process` the packets it receives and acts on the
:class:`Forward`, :class:`Deliver`, :class:`DeliverReply` or :class:`Drop` it returns.

A sender::

    bodies = fragment(message, message_id=os.urandom(16))
    for body in bodies:
        out = build_packet(path, body, epoch=epoch, random_bytes=os.urandom)
        send(out.first_hop, out.packet)
"""

from .epochs import EpochSchedule as EpochSchedule
from .epochs import KeyRing as KeyRing
from .epochs import derive_epoch_secret as derive_epoch_secret
from .epochs import onion_key_statement as onion_key_statement
from .epochs import verify_onion_key as verify_onion_key
from .events import Deliver as Deliver
from .events import DeliverReply as DeliverReply
from .events import Drop as Drop
from .events import DropReason as DropReason
from .events import Forward as Forward
from .fragments import Reassembled as Reassembled
from .fragments import Reassembler as Reassembler
from .fragments import fragment as fragment
from .packet import BODY_SIZE as BODY_SIZE
from .packet import MAX_HOPS as MAX_HOPS
from .packet import PACKET_SIZE as PACKET_SIZE
from .packet import Hop as Hop
from .packet import OutgoingPacket as OutgoingPacket
from .packet import build_packet as build_packet
from .relay import Relay as Relay
from .replay import ReplayCache as ReplayCache
from .surb import OpenedReply as OpenedReply
from .surb import Surb as Surb
from .surb import SurbBook as SurbBook
from .surb import SurbSecrets as SurbSecrets
from .surb import build_surb as build_surb
from .surb import packet_from_surb as packet_from_surb

__all__ = [
    "BODY_SIZE",
    "MAX_HOPS",
    "PACKET_SIZE",
    "Deliver",
    "DeliverReply",
    "Drop",
    "DropReason",
    "EpochSchedule",
    "Forward",
    "Hop",
    "KeyRing",
    "OpenedReply",
    "OutgoingPacket",
    "Reassembled",
    "Reassembler",
    "Relay",
    "ReplayCache",
    "Surb",
    "SurbBook",
    "SurbSecrets",
    "build_packet",
    "build_surb",
    "derive_epoch_secret",
    "fragment",
    "onion_key_statement",
    "packet_from_surb",
    "verify_onion_key",
]
