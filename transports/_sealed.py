"""Sealed frames: an AES-256-GCM channel over one TCP connection, keyed by a libp2p session.

Theory of operation (SPEC.md, "libp2p transport, sealed channel"). libp2p authenticates the
peers (Noise) and carries a one-round-trip key exchange that yields a 32-byte session key
bound to both peer ids. Data then flows over plain TCP connections to the peer's *sealed
port*, each one keyed afresh from the session key and two nonces:

    dialer   -> listener : session_id (16) || client_nonce (16) || kind (1)
    listener -> dialer   : server_nonce (16)
    k_dialer, k_listener = HKDF-SHA256(session_key, salt = client_nonce || server_nonce,
                                       info = "meshfed-sealed-v1" || session_id || kind)

The server nonce makes a recorded connection useless to replay. Every frame afterwards is

    header (13 bytes, clear, authenticated as AAD) = length (4, big-endian) || type (1) || id (8)
    body = AES-256-GCM(key of the sender's direction, nonce = 0^4 || counter (8), AAD = header)
           of `length` bytes of plaintext, then the 16-byte tag

The counter starts at 0 in each direction and increments per frame, so frames cannot be
dropped, reordered or replayed without the next tag failing. ``type`` and ``id`` are in clear
so that a receiver can refuse an oversized frame by id (and skip its body) without decrypting.
"""

from __future__ import annotations

import os
import struct

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshfed.errors import RemoteProtocolError, StreamClosed
from meshfed.stats import NodeStats, RejectReason

__all__ = [
    "HEADER",
    "HELLO_BYTES",
    "SealedSocket",
    "derive_connection_keys",
    "derive_session",
    "fresh_nonce",
]

HEADER = struct.Struct(">IBQ")
TAG_BYTES = 16
NONCE_BYTES = 16
SESSION_ID_BYTES = 16
HELLO_BYTES = SESSION_ID_BYTES + NONCE_BYTES + 1
_MAX_LENGTH = 2**31
_DISCARD_CHUNK = 1 << 20


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
        self._send_counter = 0
        self._receive_counter = 0
        self.max_frame_bytes = max_frame_bytes
        self._send_buffer = bytearray(HEADER.size + 4096 + TAG_BYTES)
        self._receive_buffer = bytearray(4096 + TAG_BYTES)
        self._send_lock = trio.Lock()
        self._stats = stats

    # -- sending -------------------------------------------------------------------------------

    async def send(
        self, frame_type: int, frame_id: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Seal and send one frame; concurrent senders are serialized.

        Raises:
            StreamClosed: the connection is gone.
        """
        length = len(data)
        async with self._send_lock:
            total = HEADER.size + length + TAG_BYTES
            if len(self._send_buffer) < total:
                self._send_buffer = bytearray(total)
            view = memoryview(self._send_buffer)
            HEADER.pack_into(view, 0, length, frame_type, frame_id)
            nonce = b"\0\0\0\0" + self._send_counter.to_bytes(8, "big")
            self._send_counter += 1
            header = bytes(view[: HEADER.size])
            self._seal.encrypt_into(nonce, data, header, view[HEADER.size : total])
            await self._send_all(view[:total])
            self._stats.bytes_out += total

    async def _send_all(self, view: memoryview) -> None:
        sent = 0
        try:
            while sent < len(view):
                sent += await self.sock.send(view[sent:])
        except OSError as exc:
            raise StreamClosed(f"connection lost while sending: {exc}") from None

    # -- receiving -----------------------------------------------------------------------------

    async def receive_header(self) -> tuple[int, int, int]:
        """The next frame's ``(length, type, id)``; then call :meth:`receive_body` or
        :meth:`skip_body`.

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
        sealed = length + TAG_BYTES
        if len(self._receive_buffer) < sealed:
            self._receive_buffer = bytearray(sealed)
        view = memoryview(self._receive_buffer)[:sealed]
        await self._receive_exactly(view, at_boundary=False)
        nonce = b"\0\0\0\0" + self._receive_counter.to_bytes(8, "big")
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

    async def skip_body(self, length: int) -> None:
        """Read and drop the body of a refused frame (its counter slot is used up)."""
        remaining = length + TAG_BYTES
        scratch = memoryview(bytearray(min(remaining, _DISCARD_CHUNK)))
        while remaining:
            chunk = scratch[: min(remaining, len(scratch))]
            await self._receive_exactly(chunk, at_boundary=False)
            remaining -= len(chunk)
        self._receive_counter += 1

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


def fresh_nonce() -> bytes:
    """16 random bytes for a handshake."""
    return os.urandom(NONCE_BYTES)
