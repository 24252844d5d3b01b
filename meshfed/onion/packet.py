"""Sphinx packets: built by a sender, peeled one layer per hop (Danezis and Goldberg 2009).

Theory of operation. A sender picks a path of up to :data:`MAX_HOPS` hops (relays, then the
destination) and, for each, the hop's X25519 onion key of one key epoch. It draws one
ephemeral scalar ``x``; hop ``i`` sees the group element ``alpha_i = x * b_0 * ... * b_(i-1) * G``
and computes the shared secret ``s_i = sk_i * alpha_i``; the blinding factors ``b_i`` come
from ``s_i``, so the sender can compute every ``s_i`` and no two hops see the same ``alpha``.

The routing information ``beta`` has :data:`MAX_HOPS` slots of :data:`SLOT_SIZE` bytes. Hop
``i`` appends a slot of zeros, XORs the whole with its keystream, reads its slot (the next
hop, its delay and the next MAC, or "deliver here") and passes the rest on: the routing
information shifts by one slot per hop and is always :data:`ROUTING_SIZE` bytes. The sender
precomputes what those appended zeros will have become (the *filler*) and places it at the
end of the last hop's routing information, so that every MAC covers exactly what the hop will
see, and fills the unused slots with random bytes: no hop learns its position or the path
length. ``gamma_i`` is a MAC over the cleartext prefix, ``alpha_i`` and ``beta_i``.

The payload of :data:`PAYLOAD_SIZE` bytes is a 16-byte all-zero authenticator then the body,
encrypted once per hop with the wide-block cipher :mod:`.lioness`, innermost for the last hop;
every hop decrypts one layer. A flipped payload bit goes unnoticed by the relays (they do not
MAC the payload) but turns everything after the next honest hop into noise, and the
destination refuses a payload whose authenticator is not zero.

Every packet on the wire is :data:`PACKET_SIZE` bytes, whatever the path length and the hop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import LocalProtocolError
from ..identity import PeerId
from .events import Drop, DropReason
from .lioness import lioness_decrypt, lioness_encrypt
from .primitives import (
    GROUP_ELEMENT_SIZE,
    GROUP_ORDER,
    MAC_SIZE,
    HopKeys,
    clamped,
    combined_scalar,
    derive_hop_keys,
    mac,
    mac_ok,
    stream_xor,
    x25519,
    x25519_base,
)

__all__ = [
    "AUTHENTICATOR_SIZE",
    "BODY_SIZE",
    "HEADER_SIZE",
    "MAX_DELAY_MS",
    "MAX_EPOCH",
    "MAX_HOPS",
    "PACKET_SIZE",
    "PAYLOAD_SIZE",
    "PEER_ID_SIZE",
    "ROUTING_SIZE",
    "SLOT_SIZE",
    "SURB_ID_SIZE",
    "PACKET_VERSION",
    "Hop",
    "OutgoingPacket",
    "Peeled",
    "authenticate",
    "build_header",
    "build_packet",
    "packet_epoch",
    "peel",
    "reply_slot",
]

#: the packet format version, first byte of every packet
PACKET_VERSION = 1
#: hop slots in every header: up to 4 relays and the destination (``high`` uses 4 of them)
MAX_HOPS = 5
#: a libp2p Ed25519 peer id, the next-hop address
PEER_ID_SIZE = 38
#: one hop's routing information: command (1), next peer (38), delay (4), next MAC (16), zeros
SLOT_SIZE = 64
#: the routing information (beta)
ROUTING_SIZE = MAX_HOPS * SLOT_SIZE
_PREFIX_SIZE = 5  # version (1) + epoch (4), in clear and under the MAC
#: version, epoch, alpha, gamma, beta
HEADER_SIZE = _PREFIX_SIZE + GROUP_ELEMENT_SIZE + MAC_SIZE + ROUTING_SIZE
#: the encrypted payload (delta)
PAYLOAD_SIZE = 2048
#: every packet on the wire
PACKET_SIZE = HEADER_SIZE + PAYLOAD_SIZE
#: the all-zero prefix of a plaintext payload, checked by the destination
AUTHENTICATOR_SIZE = 16
#: what a sender can put in one packet
BODY_SIZE = PAYLOAD_SIZE - AUTHENTICATOR_SIZE
#: names the SURB a reply travelled on, in the last hop's slot
SURB_ID_SIZE = 16
#: the longest per-hop delay a relay accepts (milliseconds)
MAX_DELAY_MS = 60_000
#: the largest epoch number (unsigned 32-bit)
MAX_EPOCH = 2**32 - 1

_FORWARD, _DELIVER, _DELIVER_REPLY = 1, 2, 3
_ALPHA = slice(_PREFIX_SIZE, _PREFIX_SIZE + GROUP_ELEMENT_SIZE)
_GAMMA = slice(_ALPHA.stop, _ALPHA.stop + MAC_SIZE)
_BETA = slice(_GAMMA.stop, HEADER_SIZE)
_ZERO_SLOT = bytes(SLOT_SIZE)
_AUTHENTICATOR = bytes(AUTHENTICATOR_SIZE)


@dataclass(frozen=True, slots=True)
class Hop:
    """One hop of a path: who, its onion key for the packet's epoch, and how long it holds
    the packet before forwarding it (ignored at the last hop)."""

    peer: PeerId
    onion_key: bytes
    delay_ms: int = 0


@dataclass(frozen=True, slots=True)
class OutgoingPacket:
    """A built packet and the peer to hand it to (the path's first hop)."""

    first_hop: PeerId
    packet: bytes


@dataclass(frozen=True, slots=True)
class Peeled:
    """One layer removed (see :func:`peel`). ``next_packet`` is empty unless forwarding."""

    command: int
    next_hop: PeerId | None
    delay_ms: int
    surb_id: bytes
    next_packet: bytes
    payload: bytes

    @property
    def is_reply(self) -> bool:
        """The packet ends here as a reply on the SURB ``surb_id``."""
        return self.command == _DELIVER_REPLY


def _prefix(epoch: int) -> bytes:
    return bytes([PACKET_VERSION]) + epoch.to_bytes(4, "big")


def _check_path(path: Sequence[Hop], epoch: int) -> None:
    if not 1 <= len(path) <= MAX_HOPS:
        raise LocalProtocolError(f"a path has 1 to {MAX_HOPS} hops, not {len(path)}")
    if not 0 <= epoch <= MAX_EPOCH:
        raise LocalProtocolError(f"epoch {epoch} is not an unsigned 32-bit number")
    for i, hop in enumerate(path):
        if len(hop.onion_key) != GROUP_ELEMENT_SIZE:
            size = len(hop.onion_key)
            raise LocalProtocolError(f"hop {i}: an onion key has 32 bytes, not {size}")
        if not 0 <= hop.delay_ms <= MAX_DELAY_MS:
            raise LocalProtocolError(f"hop {i}: delay {hop.delay_ms} ms not in 0..{MAX_DELAY_MS}")


def _hop_secrets(
    path: Sequence[Hop], random_bytes: Callable[[int], bytes]
) -> tuple[list[bytes], list[HopKeys]]:
    """Each hop's alpha and keys: s_i = b_(i-1) * ... * b_0 * x * pk_i, alpha_i likewise.

    The relays apply the blinding factors one at a time; the sender multiplies the clamped
    scalars mod the group order and makes one multiplication per hop and value
    (:func:`~.primitives.combined_scalar`): the same points, two X25519 operations a hop
    instead of up to ``hops + 1``."""
    while True:
        x = random_bytes(GROUP_ELEMENT_SIZE)
        product = clamped(x)
        alphas: list[bytes] = []
        keys: list[HopKeys] = []
        for i, hop in enumerate(path):
            scalar = combined_scalar(product)
            if scalar is None:  # about 2^-127 per hop: start again with another x
                break
            alphas.append(x25519_base(scalar))
            shared = x25519(scalar, hop.onion_key)
            if shared is None:
                raise LocalProtocolError(f"hop {i} ({hop.peer.short()}): low-order onion key")
            keys.append(derive_hop_keys(shared))
            product = product * clamped(keys[-1].blinding) % GROUP_ORDER
        else:
            return alphas, keys


def build_header(
    path: Sequence[Hop],
    last_slot: bytes,
    *,
    epoch: int,
    random_bytes: Callable[[int], bytes],
) -> tuple[bytes, list[HopKeys]]:
    """A header for ``path`` whose last hop reads ``last_slot``; also every hop's keys.

    For :func:`build_packet` and :func:`~.surb.build_surb`; applications call those.

    Raises:
        LocalProtocolError: the path is empty or too long, the epoch is out of range, a delay
            is out of range, an onion key is malformed or of low order, or ``last_slot`` is
            not :data:`SLOT_SIZE` bytes.
    """
    _check_path(path, epoch)
    if len(last_slot) != SLOT_SIZE:
        raise LocalProtocolError(f"a slot has {SLOT_SIZE} bytes, not {len(last_slot)}")
    alphas, keys = _hop_secrets(path, random_bytes)
    n = len(path)
    streams = [stream_xor(k.header_stream, bytes(ROUTING_SIZE + SLOT_SIZE)) for k in keys]
    filler = b""
    for i in range(n - 1):
        tail = streams[i][ROUTING_SIZE - i * SLOT_SIZE :]
        filler = _xor(filler + _ZERO_SLOT, tail)
    prefix = _prefix(epoch)
    plain = last_slot + random_bytes((MAX_HOPS - n) * SLOT_SIZE)
    beta = _xor(plain, streams[n - 1][: len(plain)]) + filler
    gamma = mac(keys[n - 1].header_mac, prefix + alphas[n - 1] + beta)
    for i in range(n - 2, -1, -1):
        hop = path[i]
        slot = (
            bytes([_FORWARD])
            + path[i + 1].peer.raw
            + hop.delay_ms.to_bytes(4, "big")
            + gamma
            + bytes(SLOT_SIZE - 1 - PEER_ID_SIZE - 4 - MAC_SIZE)
        )
        beta = _xor(slot + beta[:-SLOT_SIZE], streams[i][:ROUTING_SIZE])
        gamma = mac(keys[i].header_mac, prefix + alphas[i] + beta)
    return prefix + alphas[0] + gamma + beta, keys


def reply_slot(surb_id: bytes) -> bytes:
    """The last hop's slot of a SURB header: "a reply on SURB ``surb_id``"."""
    if len(surb_id) != SURB_ID_SIZE:
        raise LocalProtocolError(f"a SURB id has {SURB_ID_SIZE} bytes, not {len(surb_id)}")
    return bytes([_DELIVER_REPLY]) + surb_id + bytes(SLOT_SIZE - 1 - SURB_ID_SIZE)


def build_packet(
    path: Sequence[Hop], body: bytes, *, epoch: int, random_bytes: Callable[[int], bytes]
) -> OutgoingPacket:
    """A packet that carries ``body`` (at most :data:`BODY_SIZE` bytes, zero-padded) along
    ``path`` to its last hop, which gets it as :class:`~.events.Deliver`.

    Args:
        path: the relays, then the destination; each hop's key is for ``epoch``.
        body: what the destination receives (padded with zeros to :data:`BODY_SIZE`).
        epoch: the key epoch every hop's ``onion_key`` belongs to.
        random_bytes: a cryptographic random source (``os.urandom`` in a driver).

    Raises:
        LocalProtocolError: ``body`` is too long, or as :func:`build_header`.
    """
    if len(body) > BODY_SIZE:
        raise LocalProtocolError(f"a body has at most {BODY_SIZE} bytes, not {len(body)}")
    header, keys = build_header(
        path, bytes([_DELIVER]) + bytes(SLOT_SIZE - 1), epoch=epoch, random_bytes=random_bytes
    )
    payload = _AUTHENTICATOR + body + bytes(BODY_SIZE - len(body))
    for hop_keys in reversed(keys):
        payload = lioness_encrypt(hop_keys.payload, payload)
    return OutgoingPacket(path[0].peer, header + payload)


def packet_epoch(packet: bytes) -> int | Drop:
    """The key epoch ``packet`` was built for, or why it is not a packet at all."""
    if len(packet) != PACKET_SIZE:
        return Drop(DropReason.WRONG_SIZE, f"{len(packet)} bytes")
    if packet[0] != PACKET_VERSION:
        return Drop(DropReason.BAD_VERSION, f"version {packet[0]}")
    return int.from_bytes(packet[1:_PREFIX_SIZE], "big")


def authenticate(secret_key: bytes, packet: bytes) -> HopKeys | Drop:
    """This hop's keys if ``packet`` (checked by :func:`packet_epoch`) has a valid MAC under
    ``secret_key``; check the replay tag (``keys.replay_tag``) before :func:`peel`."""
    shared = x25519(secret_key, packet[_ALPHA])
    if shared is None:
        return Drop(DropReason.BAD_ELEMENT, "alpha has low order")
    keys = derive_hop_keys(shared)
    if not mac_ok(keys.header_mac, packet[: _GAMMA.start] + packet[_BETA], packet[_GAMMA]):
        return Drop(DropReason.BAD_MAC)
    return keys


def peel(keys: HopKeys, packet: bytes) -> Peeled | Drop:
    """Remove this hop's layer from an authenticated ``packet``: read the slot, decrypt the
    payload one layer, and for a forward build the next packet (the same size)."""
    routing = stream_xor(keys.header_stream, packet[_BETA] + _ZERO_SLOT)
    slot, rest = routing[:SLOT_SIZE], routing[SLOT_SIZE:]
    payload = lioness_decrypt(keys.payload, packet[HEADER_SIZE:])
    command = slot[0]
    if command == _FORWARD:
        return _forward(keys, packet, slot, rest, payload)
    if command == _DELIVER and slot[1:] == _ZERO_SLOT[1:]:
        if payload[:AUTHENTICATOR_SIZE] != _AUTHENTICATOR:
            return Drop(DropReason.BAD_PAYLOAD, "authenticator is not zero")
        return Peeled(command, None, 0, b"", b"", payload[AUTHENTICATOR_SIZE:])
    end = 1 + SURB_ID_SIZE
    if command == _DELIVER_REPLY and slot[end:] == _ZERO_SLOT[end:]:
        return Peeled(command, None, 0, slot[1:end], b"", payload)
    return Drop(DropReason.BAD_ROUTING, f"command {command} with slot {slot.hex()}")


def _forward(
    keys: HopKeys, packet: bytes, slot: bytes, rest: bytes, payload: bytes
) -> Peeled | Drop:
    peer_end = 1 + PEER_ID_SIZE
    delay_end = peer_end + 4
    gamma_end = delay_end + MAC_SIZE
    if slot[gamma_end:] != _ZERO_SLOT[gamma_end:]:
        return Drop(DropReason.BAD_ROUTING, "reserved bytes are not zero")
    try:
        next_hop = PeerId.of(slot[1:peer_end])
    except ValueError:
        return Drop(DropReason.BAD_ROUTING, "next hop is not a peer id")
    delay_ms = int.from_bytes(slot[peer_end:delay_end], "big")
    if delay_ms > MAX_DELAY_MS:
        return Drop(DropReason.BAD_ROUTING, f"delay {delay_ms} ms")
    alpha = x25519(keys.blinding, packet[_ALPHA])
    if alpha is None:  # unreachable: alpha passed the exchange above, blinding is nonzero
        return Drop(DropReason.BAD_ELEMENT, "blinded alpha has low order")
    header = packet[: _ALPHA.start] + alpha + slot[delay_end:gamma_end] + rest
    return Peeled(_FORWARD, next_hop, delay_ms, b"", header + payload, payload)


def _xor(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b[:n], "little")).to_bytes(n, "little")
