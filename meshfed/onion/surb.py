"""Single-use reply blocks: how a destination answers a sender it cannot name.

The sender builds a header for a path back to itself (relays, then itself as the last hop,
whose slot says "reply on SURB ``surb_id``"), draws a reply key, and sends the destination
the :class:`Surb` (first hop, header, reply key) inside its request; it keeps the
:class:`SurbSecrets` (every hop's payload key) in its :class:`SurbBook`. The destination
encrypts ``authenticator || body`` once with the reply key (:func:`packet_from_surb`); each
hop decrypts one Lioness layer as for any packet; the sender re-encrypts those layers, then
decrypts with the reply key and checks the authenticator (:meth:`SurbBook.open`).

A reply looks like any other packet to every relay (Sphinx's indistinguishable replies).
A SURB is single-use three times over: the first relay drops a second packet on the same
header (same alpha, same replay tag), so does the sender (its own replay cache, as the last
hop), and the book forgets a SURB's keys when its first reply arrives.

A SURB lives as long as its epoch's keys: until ``schedule.retires_at(epoch)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import LocalProtocolError, RemoteProtocolError
from ..identity import PeerId
from ..stats import RejectReason
from .events import Drop, DropReason
from .lioness import LIONESS_KEY_SIZE, lioness_decrypt, lioness_encrypt
from .packet import (
    AUTHENTICATOR_SIZE,
    BODY_SIZE,
    HEADER_SIZE,
    PEER_ID_SIZE,
    SURB_ID_SIZE,
    Hop,
    OutgoingPacket,
    build_header,
    reply_slot,
)
from .primitives import KEY_SIZE

__all__ = [
    "SURB_SIZE",
    "OpenedReply",
    "Surb",
    "SurbBook",
    "SurbSecrets",
    "build_surb",
    "packet_from_surb",
]

#: a SURB on the wire: first hop (38) || header || reply key (32)
SURB_SIZE = PEER_ID_SIZE + HEADER_SIZE + KEY_SIZE
_REPLY_INFO = b"meshfed-onion-v1 reply key"


def _reply_lioness_key(reply_key: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=LIONESS_KEY_SIZE, salt=None, info=_REPLY_INFO).derive(
        reply_key
    )


@dataclass(frozen=True, slots=True)
class Surb:
    """What the destination gets to answer with: the first hop back, a header, a key."""

    first_hop: PeerId
    header: bytes
    reply_key: bytes

    def to_bytes(self) -> bytes:
        """:data:`SURB_SIZE` bytes: first hop's peer id, header, reply key."""
        return self.first_hop.raw + self.header + self.reply_key

    @classmethod
    def from_bytes(cls, data: bytes) -> Surb:
        """Parse a SURB from a request.

        Raises:
            RemoteProtocolError: ``data`` is not a SURB (wrong size, bad first hop).
        """
        if len(data) != SURB_SIZE:
            raise RemoteProtocolError(
                f"a SURB has {SURB_SIZE} bytes, not {len(data)}", reason=RejectReason.BAD_FIELD
            )
        try:
            first_hop = PeerId.of(data[:PEER_ID_SIZE])
        except ValueError:
            raise RemoteProtocolError(
                "a SURB's first hop is not a peer id", reason=RejectReason.BAD_FIELD
            ) from None
        header_end = PEER_ID_SIZE + HEADER_SIZE
        return cls(first_hop, data[PEER_ID_SIZE:header_end], data[header_end:])


@dataclass(frozen=True, slots=True)
class SurbSecrets:
    """What the SURB's maker keeps to read the reply (never sent)."""

    surb_id: bytes
    hop_keys: tuple[bytes, ...]
    reply_key: bytes


@dataclass(frozen=True, slots=True)
class OpenedReply:
    """A reply opened by its SURB's maker."""

    surb_id: bytes
    body: bytes


def build_surb(
    path: Sequence[Hop], *, epoch: int, random_bytes: Callable[[int], bytes]
) -> tuple[Surb, SurbSecrets]:
    """A SURB for the path back to its last hop, which must be the caller itself (with its
    own onion key of ``epoch``); ``path[i].delay_ms`` as for a forward packet.

    Raises:
        LocalProtocolError: as :func:`~.packet.build_header`.
    """
    surb_id = random_bytes(SURB_ID_SIZE)
    header, keys = build_header(path, reply_slot(surb_id), epoch=epoch, random_bytes=random_bytes)
    reply_key = random_bytes(KEY_SIZE)
    secrets = SurbSecrets(surb_id, tuple(k.payload for k in keys), reply_key)
    return Surb(path[0].peer, header, reply_key), secrets


def packet_from_surb(surb: Surb, body: bytes) -> OutgoingPacket:
    """The reply packet carrying ``body`` (at most :data:`~.packet.BODY_SIZE` bytes).

    Raises:
        LocalProtocolError: ``body`` is too long, or ``surb`` was not parsed from bytes of
            the right size.
    """
    if len(body) > BODY_SIZE:
        raise LocalProtocolError(f"a reply body has at most {BODY_SIZE} bytes, not {len(body)}")
    if len(surb.header) != HEADER_SIZE or len(surb.reply_key) != KEY_SIZE:
        raise LocalProtocolError("a SURB's header or reply key has the wrong size")
    plain = bytes(AUTHENTICATOR_SIZE) + body + bytes(BODY_SIZE - len(body))
    payload = lioness_encrypt(_reply_lioness_key(surb.reply_key), plain)
    return OutgoingPacket(surb.first_hop, surb.header + payload)


class SurbBook:
    """The SURBs a node made and awaits replies on; each opens one reply, once.

    Args:
        max_open: how many SURBs may await replies at once.
    """

    def __init__(self, *, max_open: int = 4096) -> None:
        if max_open < 1:
            raise LocalProtocolError(f"max_open must be positive: {max_open}")
        self.max_open = max_open
        self._open: dict[bytes, tuple[SurbSecrets, float]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(self, secrets: SurbSecrets, *, expires_at: float) -> None:
        """Await a reply on the SURB of ``secrets`` until ``expires_at`` (its epoch's
        retirement at the latest).

        Raises:
            LocalProtocolError: the book is full (call :meth:`expire`, or wait for replies),
                or the SURB is in it already.
        """
        if secrets.surb_id in self._open:
            raise LocalProtocolError("this SURB is in the book already")
        if len(self._open) >= self.max_open:
            raise LocalProtocolError(f"{self.max_open} SURBs await replies; no room for more")
        self._open[secrets.surb_id] = (secrets, expires_at)

    def open(self, surb_id: bytes, payload: bytes, now: float) -> OpenedReply | Drop:
        """Read the reply delivered as :class:`~.events.DeliverReply`; the SURB is used up
        whatever the outcome."""
        entry = self._open.pop(surb_id, None)
        if entry is None or now >= entry[1]:
            return Drop(DropReason.UNKNOWN_SURB)
        secrets = entry[0]
        for key in reversed(secrets.hop_keys):
            payload = lioness_encrypt(key, payload)
        plain = lioness_decrypt(_reply_lioness_key(secrets.reply_key), payload)
        if plain[:AUTHENTICATOR_SIZE] != bytes(AUTHENTICATOR_SIZE):
            return Drop(DropReason.BAD_PAYLOAD, "reply authenticator is not zero")
        return OpenedReply(surb_id, plain[AUTHENTICATOR_SIZE:])

    def expire(self, now: float) -> int:
        """Forget SURBs whose time is over; returns how many."""
        gone = [sid for sid, (_, expires_at) in self._open.items() if now >= expires_at]
        for surb_id in gone:
            del self._open[surb_id]
        return len(gone)
