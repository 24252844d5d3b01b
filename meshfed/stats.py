"""Counters a node keeps about what it received, and why it rejected what it rejected.

Every message a peer sends us ends in exactly one of two places: it is accepted, or it is
rejected with one :class:`RejectReason` and counted. ``node.stats.snapshot()`` shows both.
"""

from __future__ import annotations

import collections
import enum

__all__ = ["NodeStats", "RejectReason"]


class RejectReason(enum.StrEnum):
    """Why an inbound frame or message was dropped."""

    #: not a valid msgpack document, or not the expected shape
    MALFORMED = "malformed"
    #: larger than the configured limit
    OVERSIZED = "oversized"
    #: the stream or connection ended in the middle of a frame
    TRUNCATED = "truncated"
    #: a message type this node does not know
    UNKNOWN_TYPE = "unknown_type"
    #: an envelope version this node does not speak
    BAD_VERSION = "bad_version"
    #: a field has the wrong type, length or range
    BAD_FIELD = "bad_field"
    #: the Ed25519 signature does not verify
    BAD_SIGNATURE = "bad_signature"
    #: the signer is not the peer the transport authenticated
    SENDER_MISMATCH = "sender_mismatch"
    #: the timestamp is older than the replay window
    STALE = "stale"
    #: the timestamp is further in the future than the allowed clock skew
    FUTURE = "future"
    #: the nonce was already seen inside the replay window
    REPLAYED = "replayed"
    #: the per-peer request rate was exceeded
    RATE_LIMITED = "rate_limited"
    #: the per-peer concurrent stream limit was exceeded
    TOO_MANY_STREAMS = "too_many_streams"
    #: a transport handshake (key exchange, channel authentication) failed
    HANDSHAKE_FAILED = "handshake_failed"
    #: an unauthenticated connection did not finish its handshake in time
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    #: an unauthenticated connection closed to make room (too many, or no descriptors left)
    OVERLOADED = "overloaded"
    #: a protocol no handler is registered for
    UNKNOWN_PROTOCOL = "unknown_protocol"
    #: a chunked array transfer whose data does not match its header or digest
    BAD_ARRAY = "bad_array"
    #: a protocol message bound to another job, round, group or attempt
    WRONG_CONTEXT = "wrong_context"
    #: a protocol message from a peer outside the group
    NOT_A_MEMBER = "not_a_member"
    #: a second message of one kind from one peer in one protocol run
    DUPLICATE = "duplicate"
    #: a message for a phase that has already ended (a straggler)
    LATE = "late"
    #: a message that contradicts what the sender said before, or fails its own checks
    INCONSISTENT = "inconsistent"


class NodeStats:
    """Counts of accepted messages and of rejections by reason. Not thread-safe (trio only)."""

    def __init__(self) -> None:
        self.rejected: collections.Counter[RejectReason] = collections.Counter()
        self.accepted: collections.Counter[str] = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        #: sealed connections the dialer closed before its handshake was done: no input was
        #: refused (an honest dialer whose deadline passed does it; so does a port scan)
        self.abandoned = 0
        #: the onion driver's counts: packets relayed, delivered, dropped (``drop.<reason>``,
        #: each also counted in ``rejected``), cover traffic and its bytes (SPEC 12)
        self.onion: collections.Counter[str] = collections.Counter()

    def reject(self, reason: RejectReason) -> None:
        """Count one rejected frame or message."""
        self.rejected[reason] += 1

    def accept(self, message_type: str) -> None:
        """Count one accepted message of ``message_type``."""
        self.accepted[message_type] += 1

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready copy: ``{"rejected": {...}, "accepted": {...}, "bytes_in": n, ...}``."""
        return {
            "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
            "accepted": dict(sorted(self.accepted.items())),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "abandoned": self.abandoned,
            "onion": dict(sorted(self.onion.items())),
        }
