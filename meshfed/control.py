"""Node-level control messages: liveness pings and the empty acknowledgement."""

from __future__ import annotations

from dataclasses import dataclass

from .codec import bounded
from .wire import Message, message

__all__ = ["Ack", "Ping", "Pong", "Text"]


@message("meshfed.ack")
@dataclass(frozen=True, slots=True)
class Ack(Message):
    """The answer to a request whose handler had nothing to say."""


@message("meshfed.ping")
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Are you there? ``sent_ms`` is the sender's wall clock, echoed back in :class:`Pong`."""

    sent_ms: int = bounded(ge=0)


@message("meshfed.pong")
@dataclass(frozen=True, slots=True)
class Pong(Message):
    """The answer to :class:`Ping`: its ``sent_ms`` and our wall clock (for skew estimates)."""

    echo_ms: int = bounded(ge=0)
    now_ms: int = bounded(ge=0)


@message("meshfed.text")
@dataclass(frozen=True, slots=True)
class Text(Message):
    """A short UTF-8 note between peers (used by the testnet and examples to show traffic)."""

    text: str = bounded(max_len=4096)
