"""Harness: the libp2p transport's session key exchange and sealed hello, the parts a peer's
bytes reach before anything is authenticated by our own keys.

- ``_parse_exchange``: the message on ``/meshfed/session/1`` (both directions);
- the dialer's completion of the exchange, as ``Libp2pTransport._exchange_keys`` does it
  after reading the answer (parse, ``_agree`` with our ephemeral key, ``derive_session``);
- the listener's handling of a sealed-port hello (``_serve_sealed``: session id lookup, kind,
  ``derive_connection_keys``).

Each must end in a session / connection keys or in our own ``RemoteProtocolError``.
"""

from __future__ import annotations

from collections.abc import Iterator

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshfed.errors import RemoteProtocolError
from meshfed.stats import RejectReason
from meshfed.transports._sealed import (
    HELLO_BYTES,
    SESSION_ID_BYTES,
    derive_connection_keys,
    derive_session,
)
from meshfed.transports.libp2p import CONTROL, STREAM, _agree, _parse_exchange

from ._common import IDENTITIES, Reader, Writer, loose_unpack, pack

_EPHEMERAL = X25519PrivateKey.from_private_bytes(bytes(range(32)))
_OURS = _EPHEMERAL.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
_NONCE = bytes(16)
_DIALER, _LISTENER = IDENTITIES[0].peer_id.raw, IDENTITIES[1].peer_id.raw
ANSWER, HELLO = range(2)


def _complete_as_dialer(answer: bytes) -> tuple[bytes, bytes]:
    """What ``_exchange_keys`` does with the listener's answer (after reading 256 bytes)."""
    theirs, their_nonce, _port = _parse_exchange(answer[:256])
    shared = _agree(_EPHEMERAL, theirs)
    return derive_session(
        shared, dialer=_DIALER, listener=_LISTENER, transcript=_OURS + theirs + _NONCE + their_nonce
    )


def _hello(hello: bytes, sessions: dict[bytes, bytes]) -> tuple[bytes, bytes]:
    """What ``_serve_sealed`` does with the first bytes of a sealed-port connection."""
    if len(hello) != HELLO_BYTES:
        raise RemoteProtocolError("short hello", reason=RejectReason.HANDSHAKE_FAILED)
    key = sessions.get(hello[:SESSION_ID_BYTES])
    kind = hello[-1]
    if key is None or kind not in (CONTROL, STREAM):
        raise RemoteProtocolError("unknown session", reason=RejectReason.HANDSHAKE_FAILED)
    return derive_connection_keys(
        key,
        session_id=hello[:SESSION_ID_BYTES],
        client_nonce=hello[SESSION_ID_BYTES:-1],
        server_nonce=bytes(16),
        kind=kind,
    )


def test_one_input(data: bytes) -> None:
    """An exchange answer, or a hello for a session made from one."""
    reader = Reader(data)
    mode = reader.below(2)
    answer = reader.sized(512)
    if reader.flag():  # a well-formed answer around fuzzed values
        answer = pack([1, reader.take(32), reader.take(16), reader.uint(2)])
    try:
        session_id, key = _complete_as_dialer(answer)
    except RemoteProtocolError:
        return
    if len(session_id) != SESSION_ID_BYTES or len(key) != 32:
        raise AssertionError("a session of the wrong size")
    if mode == HELLO:
        hello = reader.take(HELLO_BYTES)
        if reader.flag():
            hello = session_id + hello[SESSION_ID_BYTES:]
        try:
            dialer_key, listener_key = _hello(hello, {session_id: key})
        except RemoteProtocolError:
            return
        if dialer_key == listener_key or {len(dialer_key), len(listener_key)} != {32}:
            raise AssertionError("connection keys must be 32 bytes, one per direction")


def seeds() -> Iterator[bytes]:
    """A real answer, and a hello for its session."""
    theirs = X25519PrivateKey.from_private_bytes(bytes(32 * [7])).public_key()
    answer = pack([1, theirs.public_bytes(Encoding.Raw, PublicFormat.Raw), bytes(16), 4001])
    yield Writer().below(2, ANSWER).sized(answer).uint(1, 0).build()
    yield Writer().below(2, HELLO).sized(answer).uint(1, 0).raw(bytes(33)).uint(1, 1).build()
    yield Writer().below(2, ANSWER).sized(pack(loose_unpack(answer)[:3])).uint(1, 0).build()
