"""Signed envelopes: the one shape every meshfed message travels in.

Theory of operation (SPEC.md, "Envelope"). A frame on the wire is the msgpack array
``[signed, signature]`` where ``signed`` is itself the msgpack encoding of::

    [version, type, sender, [job, round], nonce, timestamp_ms, reply_to, body]

and ``signature`` is the sender's Ed25519 signature of ``b"meshfed-envelope-v1" || signed``.
Signing the exact bytes (instead of a re-encoding) means no canonical form is needed. ``body`` is
the message dataclass encoded by :mod:`meshfed.codec`.

Receiving is :func:`open_envelope`, a pure function of (bytes, authenticated peer, now): it
either returns an :class:`Envelope` or raises :class:`~meshfed.errors.RemoteProtocolError`
whose ``reason`` the caller counts. Parsing is lazy and bounded (SPEC.md 3, "bounded
parsing"): the frame and the header fields are read under bounds that admit nothing but their
own shape, and the body's bytes are parsed only after the signature verified, within the bounds
of its type's schema, so a hostile document costs O(its size) whatever it nests. The checks,
in order: size, outer shape, inner shape and header, version, type known, header fields, sender
equals the peer the transport authenticated, signature, body (parse, then fields), clock
(stale / future), replay (nonce seen). The replay check runs last so that a forged message
cannot poison the replay cache. :class:`ReplayGuard` keeps the nonces it has seen until they
fall out of the freshness window, so its memory is bounded by (rate x window).

What the checks up to the signature find is a function of the frame's bytes alone, so the
process keeps the envelopes of frames that passed them lately (:class:`VerifiedFrames`, keyed
by the exact bytes): a message sealed once for several receivers in one process (a simulation)
is decoded and verified by its first receiver only. A forged or altered frame has other bytes
and takes the full path; the sender and replay checks run for every receiver.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import msgpack

from .codec import UNPACK_ERRORS, bounded, bounded_reader, bounded_unpack, schema_of
from .errors import LocalProtocolError, RemoteProtocolError
from .identity import Identity, PeerId
from .stats import RejectReason

__all__ = [
    "VERIFIED",
    "VERSION",
    "Envelope",
    "Message",
    "ReplayGuard",
    "Scope",
    "VerifiedFrames",
    "message",
    "message_types",
    "open_envelope",
    "seal",
]

VERSION = 1
NONCE_BYTES = 16
SIGNATURE_DOMAIN = b"meshfed-envelope-v1"
_MAX_TYPE_LEN = 64
_MAX_JOB_LEN = 64


class Message:
    """Base of every wire message. Subclasses are frozen dataclasses registered with
    :func:`message`; ``TYPE`` is the name on the wire."""

    TYPE: ClassVar[str]


_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound=type[Message])


def message(type_name: str) -> Callable[[M], M]:
    """Class decorator: register a frozen dataclass as the wire message ``type_name``."""

    def register(cls: M) -> M:
        if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
            raise LocalProtocolError(f"message type {type_name!r} is registered twice")
        if len(type_name) > _MAX_TYPE_LEN:
            raise LocalProtocolError(f"message type name {type_name!r} is too long")
        cls.TYPE = type_name
        schema_of(cls)  # fail at import time on an unsupported field type
        _REGISTRY[type_name] = cls
        return cls

    return register


def message_types() -> dict[str, type[Message]]:
    """All registered message types by wire name."""
    return dict(_REGISTRY)


@dataclass(frozen=True, slots=True)
class Scope:
    """What a message belongs to: a job id (empty for node-level traffic) and a round."""

    job: bytes = bounded(max_len=_MAX_JOB_LEN, default=b"")
    round: int = bounded(ge=0, default=0)


NO_SCOPE = Scope()


@dataclass(frozen=True, slots=True)
class Envelope:
    """A verified message: who sent it, when, in what scope, in reply to what; ``frame`` is
    the signed bytes as received (evidence a third party can verify: the market keeps a
    counterpart's signed acknowledgement with the payment it backs)."""

    sender: PeerId
    scope: Scope
    nonce: bytes
    timestamp_ms: int
    reply_to: bytes
    body: Message
    frame: bytes = field(default=b"", repr=False, compare=False)


def seal(
    identity: Identity,
    body: Message,
    *,
    now_ms: int,
    scope: Scope = NO_SCOPE,
    reply_to: bytes = b"",
    nonce: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Sign ``body`` as ``identity``. Returns ``(frame, nonce)``; pass the nonce as the
    ``reply_to`` of an answer."""
    if type(body).TYPE not in _REGISTRY:
        raise LocalProtocolError(f"{type(body).__name__} is not a registered message type")
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    signed = msgpack.packb(
        [
            VERSION,
            body.TYPE,
            identity.peer_id.raw,
            [scope.job, scope.round],
            nonce,
            now_ms,
            reply_to,
            schema_of(type(body)).encode(body),
        ],
        use_bin_type=True,
    )
    signature = identity.sign(SIGNATURE_DOMAIN + signed)
    return msgpack.packb([signed, signature], use_bin_type=True), nonce


def _malformed(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason=RejectReason.MALFORMED)


def open_envelope(
    frame: bytes,
    *,
    peer: PeerId,
    now_ms: int,
    replay: ReplayGuard,
    max_bytes: int,
) -> Envelope:
    """Decode and verify one frame from ``peer`` (the transport-authenticated sender).

    Args:
        frame: the bytes as received.
        peer: who the transport says sent them.
        now_ms: the local wall clock in milliseconds.
        replay: this node's replay guard (updated only if the envelope is accepted).
        max_bytes: the largest frame accepted.

    Returns:
        The verified :class:`Envelope`.

    Raises:
        RemoteProtocolError: with the counted reason (see the module docstring for the order).
    """
    if len(frame) > max_bytes:
        raise RemoteProtocolError(
            f"frame of {len(frame)} bytes exceeds {max_bytes}", reason=RejectReason.OVERSIZED
        )
    envelope = VERIFIED.get(frame, max_bytes)
    if envelope is None:
        signed, signature = _split(frame, max_bytes)
        header, cls, body = _decode_header(signed, signature, max_bytes)
        _check_sender(header.sender, peer)
        if not header.sender.verify(signature, SIGNATURE_DOMAIN + signed):
            raise RemoteProtocolError(
                f"bad signature on {cls.TYPE}", reason=RejectReason.BAD_SIGNATURE
            )
        # Only now, with the sender known to have signed it, is the body parsed.
        message = schema_of(cls).unpack(body, cls.TYPE, max_bytes=max_bytes)
        envelope = header.with_body(message, bytes(frame))
        VERIFIED.put(frame, max_bytes, envelope)
    else:
        _check_sender(envelope.sender, peer)
    replay.check_and_remember(envelope.sender, envelope.nonce, envelope.timestamp_ms, now_ms)
    return envelope


def _check_sender(sender: PeerId, peer: PeerId) -> None:
    if sender != peer:
        raise RemoteProtocolError(
            f"signed by {sender} but received from {peer}", reason=RejectReason.SENDER_MISMATCH
        )


def _split(frame: bytes, max_bytes: int) -> tuple[bytes, bytes]:
    """The ``signed`` and ``signature`` byte strings of ``frame`` (an array of two bins)."""
    outer = bounded_unpack(frame, max_items=2, max_arrays=1, max_bytes=max_bytes)
    if (
        type(outer) is not list
        or len(outer) != 2
        or type(outer[0]) is not bytes
        or type(outer[1]) is not bytes
    ):
        raise _malformed("an envelope is [signed: bin, signature: bin]")
    return outer[0], outer[1]


@dataclass(frozen=True, slots=True)
class _Header:
    """The envelope fields before the body: checked, not yet verified."""

    sender: PeerId
    scope: Scope
    nonce: bytes
    timestamp_ms: int
    reply_to: bytes

    def with_body(self, body: Message, frame: bytes) -> Envelope:
        return Envelope(
            self.sender, self.scope, self.nonce, self.timestamp_ms, self.reply_to, body, frame
        )


def _decode_header(
    signed: bytes, signature: bytes, max_bytes: int
) -> tuple[_Header, type[Message], memoryview]:
    """The checked header fields of ``signed``, the body's message class, and the body's
    still unparsed bytes (the rest of ``signed``)."""
    # the one array among the header's fields is the scope: [job, round]
    reader = bounded_reader(signed, max_items=2, max_arrays=1, max_bytes=max_bytes)
    try:
        if reader.read_array_header() != 8:
            raise _malformed("the signed part is an array of 8 fields")
        fields = [reader.unpack() for _ in range(7)]
    except UNPACK_ERRORS as exc:
        raise _malformed(f"the signed part is not an array of 8 fields: {exc}") from None
    version, type_name, sender_raw, scope_raw, nonce, timestamp_ms, reply_to = fields
    if version != VERSION or type(version) is not int:
        raise RemoteProtocolError(f"envelope version {version!r}", reason=RejectReason.BAD_VERSION)
    if type(type_name) is not str:
        raise RemoteProtocolError("message type is not a string", reason=RejectReason.BAD_FIELD)
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise RemoteProtocolError(
            f"unknown message type {type_name[:_MAX_TYPE_LEN]!r}", reason=RejectReason.UNKNOWN_TYPE
        )
    if type(sender_raw) is not bytes:
        raise _bad_field("sender is not bytes")
    try:
        sender = PeerId.of(sender_raw)
    except ValueError:
        raise _bad_field("sender is not an Ed25519 peer id") from None
    scope = _SCOPE.decode(scope_raw, "scope")
    if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
        raise _bad_field(f"nonce must be {NONCE_BYTES} bytes")
    if type(timestamp_ms) is not int or not 0 <= timestamp_ms < 2**63:
        raise _bad_field("timestamp is not a non-negative int")
    if type(reply_to) is not bytes or len(reply_to) not in (0, NONCE_BYTES):
        raise _bad_field("reply_to must be empty or a nonce")
    if len(signature) != 64:
        raise _bad_field("signature must be 64 bytes")
    body = memoryview(signed)[reader.tell() :]
    return _Header(sender, scope, nonce, timestamp_ms, reply_to), cls, body


def _bad_field(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"envelope {what}", reason=RejectReason.BAD_FIELD)


_SCOPE = schema_of(Scope)


class VerifiedFrames:
    """The envelopes of frames that parsed and verified lately, by the frame's exact bytes
    and the size limit they were parsed under; the least recently used is forgotten first.

    Only a frame whose signature verified is kept, and only an identical frame finds it: a
    forged or altered copy has other bytes, misses, and is checked in full. What it saves is
    decoding and verifying again a frame sealed once for several receivers *in this process*;
    a node alone in its process never sees a frame twice except as a replay (which its replay
    guard rejects), so there it costs a hash and a lookup per frame and saves nothing.

    Args:
        max_frames: frames kept at most.
        max_bytes: their total size at most (a frame over 1/16 of it is not kept).
    """

    def __init__(self, *, max_frames: int = 4096, max_bytes: int = 16 << 20) -> None:
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._bytes = 0
        self._kept: collections.OrderedDict[tuple[bytes, int], Envelope] = collections.OrderedDict()
        self._lock = threading.Lock()  # nodes may run in the trio loops of several threads

    def get(self, frame: bytes, limit: int) -> Envelope | None:
        """The envelope of ``frame`` as parsed under the size limit ``limit``, if kept."""
        key = (frame, limit)
        with self._lock:
            envelope = self._kept.get(key)
            if envelope is not None:
                self._kept.move_to_end(key)
            return envelope

    def clear(self) -> None:
        """Forget every kept frame (a measurement or a fuzz input that must not take the
        shortcut)."""
        with self._lock:
            self._kept.clear()
            self._bytes = 0

    def put(self, frame: bytes, limit: int, envelope: Envelope) -> None:
        """Keep ``envelope``, which ``frame`` verified as under the size limit ``limit``."""
        if len(frame) > self._max_bytes // 16:
            return
        with self._lock:
            if (frame, limit) in self._kept:
                return
            self._kept[(frame, limit)] = envelope
            self._bytes += len(frame)
            while len(self._kept) > self._max_frames or self._bytes > self._max_bytes:
                (old, _), _ = self._kept.popitem(last=False)
                self._bytes -= len(old)


#: the process's cache of verified frames (see :class:`VerifiedFrames`)
VERIFIED = VerifiedFrames()


class ReplayGuard:
    """Rejects stale, future-dated and replayed envelopes with bounded memory.

    An envelope is fresh if ``now - window < timestamp <= now + max_skew`` and its timestamp is
    above its sender's *floor*, and it is new if its nonce was not seen from that sender.
    Nonces are kept until they leave the window. When one sender's cache would exceed
    ``max_per_peer`` entries, its oldest entries are dropped and that sender's floor rises to
    their timestamp: forgetting a nonce never lets its envelope back in.

    Senders are remembered up to ``max_peers``; past that, the least recently heard is
    forgotten and the *global floor* rises to the newest timestamp it sent, so that none of its
    envelopes is new again. The global floor is the floor of senders not remembered (a new
    sender's entry starts with it); the senders remembered never see it, so a crowd of
    newcomers cannot make an established peer's messages stale. It only ever rises to a
    timestamp our own clock has reached: a sender that may still have a future-dated envelope
    (heard within the last ``max_skew``) is not forgotten, and a newcomer that would need it
    to be is refused [rate_limited] until it can be.

    Args:
        window_ms: how old a message may be.
        max_skew_ms: how far in the future a timestamp may be (peers' clock skew).
        started_ms: despite its name, the initial global floor, not the creation time:
            nothing at or below it is fresh (a node passes its start time minus
            ``max_skew_ms``: a previous run's nonces are not remembered, and peers whose
            clocks lag by up to the skew are heard at once).
        max_per_peer: nonces remembered per sender.
        max_peers: senders remembered.
    """

    def __init__(
        self,
        *,
        window_ms: int,
        max_skew_ms: int,
        started_ms: int,
        max_per_peer: int = 65536,
        max_peers: int = 100_000,
    ) -> None:
        self.window_ms = window_ms
        self.max_skew_ms = max_skew_ms
        self._global_floor = started_ms
        self._max_per_peer = max_per_peer
        self._max_peers = max_peers
        self._seen: collections.OrderedDict[PeerId, _PeerNonces] = collections.OrderedDict()

    def check_and_remember(
        self, sender: PeerId, nonce: bytes, timestamp_ms: int, now_ms: int
    ) -> None:
        """Accept (and remember) the envelope or raise ``RemoteProtocolError``."""
        if timestamp_ms > now_ms + self.max_skew_ms:
            raise RemoteProtocolError(
                f"timestamp {timestamp_ms - now_ms} ms in the future", reason=RejectReason.FUTURE
            )
        peer = self._seen.get(sender)
        floor = max(self._global_floor if peer is None else peer.floor, now_ms - self.window_ms)
        if timestamp_ms <= floor:
            raise RemoteProtocolError(
                f"timestamp {now_ms - timestamp_ms} ms old is at or below the replay floor",
                reason=RejectReason.STALE,
            )
        if peer is None:
            if len(self._seen) >= self._max_peers:
                self._forget_one(now_ms)
            peer = self._seen[sender] = _PeerNonces(self._global_floor)
        else:
            self._seen.move_to_end(sender)
            if nonce in peer.nonces:
                raise RemoteProtocolError("nonce already seen", reason=RejectReason.REPLAYED)
        peer.remember(nonce, timestamp_ms, now_ms - self.window_ms, self._max_per_peer)

    def _forget_one(self, now_ms: int) -> None:
        """Forget the least recently heard sender, or refuse the newcomer that needs it."""
        oldest = next(iter(self._seen.values()))
        if oldest.latest > now_ms:
            raise RemoteProtocolError(
                f"{len(self._seen)} senders heard within the clock skew: a new one must wait",
                reason=RejectReason.RATE_LIMITED,
            )
        self._seen.popitem(last=False)
        self._global_floor = max(self._global_floor, oldest.latest)


class _PeerNonces:
    __slots__ = ("floor", "latest", "nonces")

    def __init__(self, floor: int) -> None:
        self.nonces: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.floor = floor
        self.latest = floor

    def remember(self, nonce: bytes, timestamp_ms: int, expire_before_ms: int, cap: int) -> None:
        self.nonces[nonce] = timestamp_ms
        self.latest = max(self.latest, timestamp_ms)
        # Entries arrive roughly in time order: drop expired ones from the front.
        while self.nonces:
            oldest_nonce, oldest_ts = next(iter(self.nonces.items()))
            if oldest_ts > expire_before_ms and len(self.nonces) <= cap:
                break
            del self.nonces[oldest_nonce]
            if oldest_ts > expire_before_ms:
                self.floor = max(self.floor, oldest_ts)
