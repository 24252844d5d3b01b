"""A node's onion packet processing: one packet in, one action out, no state per sender.

Quoting Sphinx's processing (Danezis and Goldberg 2009, section 3.3), in our order: check the
size and version; pick the key of the packet's epoch; compute the shared secret from alpha;
verify gamma; drop the packet if its replay tag was seen in that epoch, else record the tag;
decrypt the routing information and the payload one layer; then forward (with the blinded
alpha and the next gamma), deliver (destination: the payload's authenticator checked), or
deliver a reply (the SURB's maker). The only state is the key ring and the replay cache, both
per node: a relay keeps nothing about who sent what.
"""

from __future__ import annotations

from .epochs import KeyRing
from .events import Deliver, DeliverReply, Drop, DropReason, Forward, RelayAction
from .packet import authenticate, packet_epoch, peel
from .replay import ReplayCache

__all__ = ["Relay"]


class Relay:
    """Peels onion packets addressed to this node (as a relay or as their destination).

    Args:
        keys: the node's onion keys by epoch.
        replay: the node's replay cache (restored from the store at start).
    """

    def __init__(self, keys: KeyRing, replay: ReplayCache) -> None:
        self.keys = keys
        self.replay = replay

    def process(self, packet: bytes, now: float) -> RelayAction:
        """What to do with ``packet``, received at Unix time ``now``.

        Returns:
            :class:`Forward` (send it on after its delay), :class:`Deliver` (the body is for
            this node), :class:`DeliverReply` (a reply on a SURB this node made), or
            :class:`Drop` with the reason to count. Never raises for any input bytes.
        """
        packet = bytes(packet)  # a bytearray or memoryview from the transport, frozen
        epoch = packet_epoch(packet)
        if isinstance(epoch, Drop):
            return epoch
        secret = self.keys.secret_for(epoch, now)
        if secret is None:
            return Drop(DropReason.UNKNOWN_EPOCH, f"epoch {epoch}")
        keys = authenticate(secret, packet)
        if isinstance(keys, Drop):
            return keys
        tag = keys.replay_tag
        if (epoch, tag) in self.replay:
            return Drop(DropReason.REPLAYED)
        if not self.replay.add(epoch, tag):
            return Drop(DropReason.REPLAY_CACHE_FULL, f"epoch {epoch}")
        peeled = peel(keys, packet)
        if isinstance(peeled, Drop):
            return peeled
        if peeled.next_hop is not None:
            delay = peeled.delay_ms / 1000
            return Forward(peeled.next_hop, peeled.next_packet, delay, epoch, tag)
        if peeled.is_reply:
            return DeliverReply(peeled.surb_id, peeled.payload, epoch, tag)
        return Deliver(peeled.payload, epoch, tag)

    def retire(self, now: float) -> list[int]:
        """Retire expired epochs: their keys and their replay tags. Returns the epochs (the
        driver deletes their stored keys and tags)."""
        schedule = self.keys.schedule
        stale = [e for e in self.replay.epochs if now >= schedule.retires_at(e)]
        gone = sorted(set(self.keys.retire(now)) | set(stale))
        self.replay.retire(gone)
        return gone
