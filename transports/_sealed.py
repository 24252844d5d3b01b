"""Sealed frames: an AES-256-GCM channel over one TCP connection, keyed by a libp2p session.

Theory of operation (SPEC.md, "libp2p transport, sealed channel"). libp2p authenticates the
peers (Noise) and carries a one-round-trip key exchange that yields a 32-byte session key
bound to both peer ids. Data then flows over plain TCP connections to the peer's *sealed
port*, each one keyed afresh from the session key and two nonces:

    dialer   -> listener : session_id (16) || client_nonce (16) || kind (1)
    listener -> dialer   : server_nonce (16)
    k_dialer, k_listener = HKDF-SHA256(session_key, salt = client_nonce || server_nonce,
                                       info = "meshfed-sealed-v1" || session_id || kind)
    dialer   -> listener : CONFIRM frame (empty, id 0, frame counter 0)

The session id is only a lookup key: an eavesdropper can replay it, but the CONFIRM frame,
sealed under keys that depend on the listener's fresh nonce, proves that the dialer holds the
session key. Until it has verified, the listener holds nothing but fixed-size buffers for the
connection and does not hand it to anyone. Every frame afterwards is

    header (13 bytes, clear, authenticated as AAD) = length (4, big-endian) || type (1) || id (8)
    body = AES-256-GCM(key of the sender's direction, nonce = 0^4 || counter (8), AAD = header)
           of `length` bytes of plaintext, then the 16-byte tag

The counter starts at 0 in each direction and increments per frame, so frames cannot be
dropped, reordered, replayed or altered (header included) without a tag failing. A receiver
acts on a frame only after its tag verified, also when it refuses the frame as oversized
(:meth:`SealedSocket.discard_body` authenticates what it drops). Receive buffers grow with
the bytes that actually arrived, never with what a header claims. A send that fails or is
cancelled after part of a frame left marks the connection broken (h11's ``send_failed``):
it refuses further sends and is shut down; its owner opens a new one.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshfed.errors import RemoteProtocolError, StreamClosed
from meshfed.identity import PeerId
from meshfed.stats import NodeStats, RejectReason

__all__ = [
    "CONFIRM",
    "HEADER",
    "HELLO_BYTES",
    "SealedSocket",
    "accept_sealed",
    "derive_connection_keys",
    "derive_session",
    "dial_sealed",
    "fresh_nonce",
]

HEADER = struct.Struct(">IBQ")
TAG_BYTES = 16
NONCE_BYTES = 16
SESSION_ID_BYTES = 16
HELLO_BYTES = SESSION_ID_BYTES + NONCE_BYTES + 1
#: the frame type of the dialer's key confirmation (the frame types of the connection's
#: users are below it)
CONFIRM = 255
_GROWTH_CHUNK = 1 << 16  # a receive buffer grows by at least this much, at most 2x at a time
_DISCARD_CHUNK = 1 << 16

SessionLookup = Callable[[bytes], "tuple[PeerId, bytes] | None"]


def _hkdf(secret: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def derive_session(
    shared: bytes, *, dialer: bytes, listener: bytes, transcript: bytes
) -> tuple[bytes, bytes]:
    """``(session_id, session_key)`` from an X25519 secret, both raw peer ids and the
    exchange transcript (both ephemeral keys and both nonces)."""
    material = _hkdf(
        shared, salt=transcript, info=b"meshfed-session-v1" + dialer + listener, length=48
    )
    return material[:SESSION_ID_BYTES], material[SESSION_ID_BYTES:]


def derive_connection_keys(
    session_key: bytes, *, session_id: bytes, client_nonce: bytes, server_nonce: bytes, kind: int
) -> tuple[bytes, bytes]:
    """``(dialer_key, listener_key)``: each side seals with its own and opens with the other."""
    material = _hkdf(
        session_key,
        salt=client_nonce + server_nonce,
        info=b"meshfed-sealed-v1" + session_id + bytes([kind]),
        length=64,
    )
    return material[:32], material[32:]


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")


class SealedSocket:
    """Frames in and out of one TCP socket, sealed with AES-256-GCM.

    Args:
        sock: a connected trio socket (the handshake already done).
        send_key: our direction's key.
        receive_key: the other direction's key.
        max_frame_bytes: the largest plaintext we accept.
        stats: where the bytes on the wire are counted.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        send_key: bytes,
        receive_key: bytes,
        max_frame_bytes: int,
        stats: NodeStats,
    ) -> None:
        self.sock = sock
        self._seal = AESGCM(send_key)
        self._open = AESGCM(receive_key)
        self._receive_key = receive_key
        self._send_counter = 0
        self._receive_counter = 0
        self.max_frame_bytes = max_frame_bytes
        #: a send failed after part of a frame left: the connection can carry nothing more
        self.broken = False
        self._send_buffer = bytearray(HEADER.size + 4096 + TAG_BYTES)
        self._receive_buffer = bytearray(4096 + TAG_BYTES)
        self._header = b""
        self._send_lock = trio.Lock()
        self._stats = stats

    # -- sending -------------------------------------------------------------------------------

    async def send(
        self, frame_type: int, frame_id: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Seal and send one frame; concurrent senders are serialized.

        A send that fails or is cancelled after part of the frame was written marks the
        connection :attr:`broken` and shuts it down (the peer sees it end); one cancelled
        before any byte left changes nothing.

        Raises:
            StreamClosed: the connection is gone or broken.
        """
        length = len(data)
        async with self._send_lock:
            if self.broken:
                raise StreamClosed("the connection broke on an earlier send")
            total = HEADER.size + length + TAG_BYTES
            if len(self._send_buffer) < total:
                self._send_buffer = bytearray(total)
            view = memoryview(self._send_buffer)
            HEADER.pack_into(view, 0, length, frame_type, frame_id)
            header = bytes(view[: HEADER.size])
            self._seal.encrypt_into(
                _nonce(self._send_counter), data, header, view[HEADER.size : total]
            )
            sent = 0
            try:
                while sent < total:
                    sent += await self.sock.send(view[sent:total])
            except OSError as exc:
                self._break()
                raise StreamClosed(f"connection lost while sending: {exc}") from None
            except BaseException:
                if sent:  # half a frame is out: nothing can follow it
                    self._break()
                raise
            finally:
                self._stats.bytes_out += sent
            self._send_counter += 1

    def _break(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(trio.socket.SHUT_RDWR)

    # -- receiving -----------------------------------------------------------------------------

    async def receive_header(self) -> tuple[int, int, int]:
        """The next frame's ``(length, type, id)``, not yet authenticated: call
        :meth:`receive_body` or :meth:`discard_body` before acting on it.

        Raises:
            StreamClosed: the peer closed the connection between frames.
            RemoteProtocolError: ``TRUNCATED`` if it closed inside the header.
        """
        header = bytearray(HEADER.size)
        got = await self._receive_exactly(memoryview(header), at_boundary=True)
        if got == 0:
            raise StreamClosed("connection closed by the peer")
        length, frame_type, frame_id = HEADER.unpack(header)
        self._header = bytes(header)
        return length, frame_type, frame_id

    async def receive_body(self, length: int, into: memoryview | None = None) -> bytes | int:
        """Receive and open the body announced by the last header.

        Args:
            length: from :meth:`receive_header`.
            into: write the plaintext here and return its length; else return the bytes.

        Raises:
            RemoteProtocolError: ``OVERSIZED`` (above ``max_frame_bytes``, checked before
                reading), ``BAD_FIELD`` (does not fit ``into``), ``TRUNCATED``, or
                ``MALFORMED`` (the tag does not verify: tampering or a desynchronised peer).
        """
        if length > self.max_frame_bytes:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds {self.max_frame_bytes}",
                reason=RejectReason.OVERSIZED,
            )
        if into is not None and length > len(into):
            raise RemoteProtocolError(
                f"frame of {length} bytes does not fit a {len(into)}-byte buffer",
                reason=RejectReason.BAD_FIELD,
            )
        view = await self._receive_sealed(length + TAG_BYTES)
        nonce = _nonce(self._receive_counter)
        self._receive_counter += 1
        try:
            if into is not None:
                self._open.decrypt_into(nonce, view, self._header, into[:length])
                return length
            return self._open.decrypt(nonce, view, self._header)
        except InvalidTag:
            raise RemoteProtocolError(
                "a sealed frame failed authentication", reason=RejectReason.MALFORMED
            ) from None

    async def _receive_sealed(self, sealed: int) -> memoryview:
        """The next ``sealed`` bytes, in a buffer that grows with the bytes that arrived."""
        got = 0
        while True:
            buffer = self._receive_buffer
            end = min(sealed, len(buffer))
            got += await self._receive_exactly(memoryview(buffer)[got:end], at_boundary=False)
            if got == sealed:
                return memoryview(self._receive_buffer)[:sealed]
            grown = bytearray(min(sealed, max(2 * len(buffer), len(buffer) + _GROWTH_CHUNK)))
            grown[:got] = buffer[:got]
            self._receive_buffer = grown

    async def discard_body(self, length: int) -> None:
        """Read, authenticate and drop the body of a refused frame, in bounded memory.

        Raises:
            RemoteProtocolError: ``MALFORMED`` if its tag (over the header too) does not
                verify, ``TRUNCATED``.
        """
        decryptor = Cipher(
            algorithms.AES(self._receive_key), modes.GCM(_nonce(self._receive_counter))
        ).decryptor()
        self._receive_counter += 1
        decryptor.authenticate_additional_data(self._header)
        scratch = memoryview(bytearray(min(length, _DISCARD_CHUNK) or 1))
        remaining = length
        while remaining:
            chunk = scratch[: min(remaining, len(scratch))]
            await self._receive_exactly(chunk, at_boundary=False)
            decryptor.update(chunk)
            remaining -= len(chunk)
        tag = bytearray(TAG_BYTES)
        await self._receive_exactly(memoryview(tag), at_boundary=False)
        try:
            decryptor.finalize_with_tag(bytes(tag))
        except InvalidTag:
            raise RemoteProtocolError(
                "a refused sealed frame failed authentication", reason=RejectReason.MALFORMED
            ) from None

    async def _receive_exactly(self, view: memoryview, *, at_boundary: bool) -> int:
        got = 0
        while got < len(view):
            try:
                n = await self.sock.recv_into(view[got:], len(view) - got)
            except OSError as exc:
                raise StreamClosed(f"connection lost while receiving: {exc}") from None
            if n == 0:
                if at_boundary and got == 0:
                    return 0
                raise RemoteProtocolError(
                    "connection closed in the middle of a frame", reason=RejectReason.TRUNCATED
                )
            got += n
        self._stats.bytes_in += got
        return got

    def close(self) -> None:
        """Close the socket (the peer sees the end)."""
        self.sock.close()


# -- the handshake ------------------------------------------------------------------------------


async def dial_sealed(
    sock: trio.socket.SocketType,
    *,
    session_id: bytes,
    session_key: bytes,
    kind: int,
    max_frame_bytes: int,
    stats: NodeStats,
) -> SealedSocket:
    """The dialer's handshake on a connected socket: hello, the listener's nonce, CONFIRM.

    Raises:
        OSError: the listener closed the connection (it does not know the session).
        StreamClosed: the connection broke while sending the confirmation.
    """
    client_nonce = fresh_nonce()
    hello = session_id + client_nonce + bytes([kind])
    sent = 0
    while sent < len(hello):
        sent += await sock.send(hello[sent:])
    server_nonce = await receive_exactly(sock, NONCE_BYTES)
    dialer_key, listener_key = derive_connection_keys(
        session_key,
        session_id=session_id,
        client_nonce=client_nonce,
        server_nonce=server_nonce,
        kind=kind,
    )
    channel = SealedSocket(sock, dialer_key, listener_key, max_frame_bytes, stats)
    await channel.send(CONFIRM, 0, b"")
    return channel


async def accept_sealed(
    sock: trio.socket.SocketType,
    *,
    lookup: SessionLookup,
    kinds: tuple[int, ...],
    max_frame_bytes: int,
    stats: NodeStats,
) -> tuple[PeerId, int, SealedSocket]:
    """The listener's handshake: ``(peer, kind, channel)`` once the dialer proved that it
    holds the session key. Reads exactly ``HELLO_BYTES`` and one empty frame before that.

    Raises:
        RemoteProtocolError: ``HANDSHAKE_FAILED`` (unknown session or kind, no valid
            confirmation), ``TRUNCATED``.
        OSError, StreamClosed: the connection broke.
    """
    hello = await receive_exactly(sock, HELLO_BYTES)
    known = lookup(hello[:SESSION_ID_BYTES])
    kind = hello[-1]
    if known is None or kind not in kinds:
        raise RemoteProtocolError(
            "unknown session or connection kind", reason=RejectReason.HANDSHAKE_FAILED
        )
    peer, session_key = known
    server_nonce = fresh_nonce()
    await sock.send(server_nonce)
    dialer_key, listener_key = derive_connection_keys(
        session_key,
        session_id=hello[:SESSION_ID_BYTES],
        client_nonce=hello[SESSION_ID_BYTES : SESSION_ID_BYTES + NONCE_BYTES],
        server_nonce=server_nonce,
        kind=kind,
    )
    channel = SealedSocket(sock, listener_key, dialer_key, max_frame_bytes, stats)
    try:
        if await channel.receive_header() != (0, CONFIRM, 0):
            raise RemoteProtocolError("no key confirmation", reason=RejectReason.HANDSHAKE_FAILED)
        await channel.receive_body(0)
    except RemoteProtocolError as exc:
        if exc.reason is RejectReason.TRUNCATED:
            raise
        raise RemoteProtocolError(
            f"key confirmation failed: {exc}", reason=RejectReason.HANDSHAKE_FAILED
        ) from None
    return peer, kind, channel


async def receive_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    """``n`` bytes from ``sock`` (raises ``OSError`` if it closes first)."""
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        received = await sock.recv_into(view[got:], n - got)
        if received == 0:
            raise OSError("connection closed during the handshake")
        got += received
    return bytes(buffer)


def fresh_nonce() -> bytes:
    """16 random bytes for a handshake."""
    return os.urandom(NONCE_BYTES)
