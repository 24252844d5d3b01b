"""What the onion driver sends: the signed link message and the requests and replies inside.

Between two neighbours on a path a packet travels as :class:`OnionPacket`, a signed envelope
from the previous hop (which the receiver knows anyway: it is the link) holding exactly one
2,421-byte packet. Inside the packets, once reassembled at the destination, a request is an
:class:`OnionRequest` and the answer, reassembled by the sender from its SURBs' replies, an
:class:`OnionReply`; both are msgpack arrays of their fields, parsed under their schema.
Neither names the sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from ..codec import bounded, schema_of
from ..errors import RemoteProtocolError
from ..stats import RejectReason
from ..wire import Message, message, message_types
from .fragments import MAX_MESSAGE_SIZE
from .packet import PACKET_SIZE
from .surb import SURB_SIZE

__all__ = [
    "MAX_REPLY_PACKETS",
    "REQUEST_ID_SIZE",
    "OnionPacket",
    "OnionReply",
    "OnionRequest",
    "decode",
    "decode_body",
    "encode",
    "encode_body",
]

#: bytes of a request id (random per request, the same on every retry: its idempotency key)
REQUEST_ID_SIZE = 16
#: the most SURBs a request carries (the reply fills one packet per SURB)
MAX_REPLY_PACKETS = 16
_MAX_TYPE_LEN = 64


@message("meshfed.onion_packet")
@dataclass(frozen=True, slots=True)
class OnionPacket(Message):
    """One onion packet handed to the next hop on a path."""

    packet: bytes = bounded(min_len=PACKET_SIZE, max_len=PACKET_SIZE)


@dataclass(frozen=True, slots=True)
class OnionRequest:
    """A request as the destination reassembles it: a wire message's type and encoded
    fields, and the SURBs to answer on (``surbs[i]`` carries reply fragment ``i``)."""

    request_id: bytes = bounded(min_len=REQUEST_ID_SIZE, max_len=REQUEST_ID_SIZE)
    surbs: list[bytes] = bounded(min_len=1, max_len=MAX_REPLY_PACKETS)
    type: str = bounded(max_len=_MAX_TYPE_LEN)
    body: bytes = bounded(max_len=MAX_MESSAGE_SIZE)

    def __post_init__(self) -> None:
        if any(len(surb) != SURB_SIZE for surb in self.surbs):
            raise ValueError(f"a SURB has {SURB_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class OnionReply:
    """The destination's answer: a wire message (``type`` and encoded fields) or, when
    ``error`` is not empty, why there is none (``error`` is a short reason code)."""

    request_id: bytes = bounded(min_len=REQUEST_ID_SIZE, max_len=REQUEST_ID_SIZE)
    type: str = bounded(max_len=_MAX_TYPE_LEN, default="")
    body: bytes = bounded(max_len=MAX_MESSAGE_SIZE, default=b"")
    error: str = bounded(max_len=64, default="")
    detail: str = bounded(max_len=256, default="")


R = TypeVar("R", OnionRequest, OnionReply)


def decode(cls: type[R], data: bytes) -> R:
    """An encoded request or reply, parsed under its schema.

    Raises:
        RemoteProtocolError: ``data`` is not one.
    """
    decoded: R = schema_of(cls).unpack(data, cls.__name__, max_bytes=len(data))
    return decoded


def encode(value: OnionRequest | OnionReply) -> bytes:
    """The msgpack array of ``value``'s fields."""
    packed: bytes = msgpack.packb(schema_of(type(value)).encode(value), use_bin_type=True)
    return packed


def encode_body(body: Message) -> bytes:
    """A wire message's fields, msgpack-encoded as in an envelope."""
    packed: bytes = msgpack.packb(schema_of(type(body)).encode(body), use_bin_type=True)
    return packed


def decode_body(type_name: str, data: bytes) -> Message:
    """The registered wire message ``type_name`` from its encoded fields.

    Raises:
        RemoteProtocolError: an unknown type (``unknown_type``) or fields out of bounds.
    """
    cls = message_types().get(type_name)
    if cls is None:
        raise RemoteProtocolError(f"unknown type {type_name!r}", reason=RejectReason.UNKNOWN_TYPE)
    decoded: Any = schema_of(cls).unpack(data, cls.TYPE, max_bytes=len(data))
    result: Message = decoded
    return result
