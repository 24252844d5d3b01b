"""Messages longer than one packet body: split by the sender, reassembled by the destination.

A fragment fills one body (:data:`~.packet.BODY_SIZE` bytes)::

    message id (16) || index (u16 BE) || count (u16 BE) || length (u16 BE) || data || zeros

Every fragment of a message carries the same random message id and count; the destination
collects them by id until all ``count`` arrived, in any order, and ignores duplicates, also
of a message it completed within the timeout (a retried request on a new path is delivered
once). What is held is bounded by messages and bytes, and a message not complete within the
timeout is dropped; the caller's clock drives it (``now`` arguments).

Anyone who knows a node's onion key can send it packets, so fragments are untrusted input:
out-of-range headers are dropped and counted, never raised.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import LocalProtocolError
from .events import Drop, DropReason
from .packet import BODY_SIZE

__all__ = [
    "FRAGMENT_CAPACITY",
    "MAX_FRAGMENTS",
    "MAX_MESSAGE_SIZE",
    "MESSAGE_ID_SIZE",
    "Reassembled",
    "Reassembler",
    "fragment",
]

#: bytes of a message id (random per message; doubles as its idempotency key)
MESSAGE_ID_SIZE = 16
_HEADER = struct.Struct(">HHH")
_FRAGMENT_HEADER_SIZE = MESSAGE_ID_SIZE + _HEADER.size
#: message bytes per fragment
FRAGMENT_CAPACITY = BODY_SIZE - _FRAGMENT_HEADER_SIZE
#: the most fragments of one message
MAX_FRAGMENTS = 1024
#: the longest message (about 2 MB)
MAX_MESSAGE_SIZE = MAX_FRAGMENTS * FRAGMENT_CAPACITY


def fragment(message: bytes, message_id: bytes) -> list[bytes]:
    """Split ``message`` into packet bodies (one at least, even for an empty message).

    Raises:
        LocalProtocolError: the message is longer than :data:`MAX_MESSAGE_SIZE`, or the id
            is not :data:`MESSAGE_ID_SIZE` bytes.
    """
    if len(message_id) != MESSAGE_ID_SIZE:
        raise LocalProtocolError(f"a message id has {MESSAGE_ID_SIZE} bytes, not {len(message_id)}")
    if len(message) > MAX_MESSAGE_SIZE:
        raise LocalProtocolError(f"a message has at most {MAX_MESSAGE_SIZE} bytes: {len(message)}")
    chunks = [message[i : i + FRAGMENT_CAPACITY] for i in range(0, len(message), FRAGMENT_CAPACITY)]
    chunks = chunks or [b""]
    bodies = []
    for index, chunk in enumerate(chunks):
        head = message_id + _HEADER.pack(index, len(chunks), len(chunk))
        bodies.append(head + chunk + bytes(FRAGMENT_CAPACITY - len(chunk)))
    return bodies


@dataclass(frozen=True, slots=True)
class Reassembled:
    """A whole message: every fragment arrived."""

    message_id: bytes
    message: bytes


@dataclass(slots=True)
class _Pending:
    count: int
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Collects fragments into messages, within bounds.

    Args:
        timeout: seconds a message may take from its first fragment to its last; also how
            long a completed message's id is remembered to ignore its duplicates.
        max_messages: incomplete messages held at once.
        max_bytes: fragment bytes held at once, over all incomplete messages.
        max_remembered: completed message ids remembered at once.
    """

    def __init__(
        self,
        *,
        timeout: float = 60.0,
        max_messages: int = 64,
        max_bytes: int = 8 * 2**20,
        max_remembered: int = 4096,
    ) -> None:
        if not (timeout > 0 and max_messages > 0 and max_bytes > 0 and max_remembered > 0):
            raise LocalProtocolError("reassembly timeout and bounds must be positive")
        self.timeout = timeout
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_remembered = max_remembered
        self._pending: dict[bytes, _Pending] = {}
        self._done: dict[bytes, float] = {}  # message id -> when completed (insertion order)
        self._held = 0

    @property
    def held_bytes(self) -> int:
        """Fragment bytes held for incomplete messages."""
        return self._held

    @property
    def pending(self) -> int:
        """Incomplete messages held."""
        return len(self._pending)

    def add(self, body: bytes, now: float) -> Reassembled | Drop | None:
        """Take one delivered body. Returns the message once whole, a :class:`Drop` for a
        fragment refused, or ``None`` (more to come, or a duplicate ignored)."""
        self.expire(now)
        parsed = _parse(body)
        if isinstance(parsed, Drop):
            return parsed
        message_id, index, count, data = parsed
        if message_id in self._done:
            return None
        pending = self._pending.get(message_id)
        if pending is None:
            if len(self._pending) >= self.max_messages:
                return Drop(DropReason.REASSEMBLY_FULL, f"{len(self._pending)} messages")
            pending = self._pending[message_id] = _Pending(count, now)
        elif pending.count != count:
            return Drop(DropReason.FRAGMENT_CONFLICT, f"count {count}, not {pending.count}")
        if index in pending.parts:
            return None
        if self._held + len(data) > self.max_bytes:
            return Drop(DropReason.REASSEMBLY_FULL, f"{self._held} bytes held")
        pending.parts[index] = data
        pending.size += len(data)
        self._held += len(data)
        if len(pending.parts) < count:
            return None
        del self._pending[message_id]
        self._held -= pending.size
        self._remember(message_id, now)
        return Reassembled(message_id, b"".join(pending.parts[i] for i in range(count)))

    def expire(self, now: float) -> int:
        """Drop incomplete messages older than the timeout and forget old completed ids;
        returns how many incomplete messages were dropped."""
        late = [mid for mid, p in self._pending.items() if now - p.started >= self.timeout]
        for message_id in late:
            self._held -= self._pending.pop(message_id).size
        for message_id, done_at in list(self._done.items()):
            if now - done_at < self.timeout:
                break
            del self._done[message_id]
        return len(late)

    def _remember(self, message_id: bytes, now: float) -> None:
        while len(self._done) >= self.max_remembered:
            del self._done[next(iter(self._done))]
        self._done[message_id] = now


def _parse(body: bytes) -> tuple[bytes, int, int, bytes] | Drop:
    if len(body) != BODY_SIZE:
        return Drop(DropReason.WRONG_SIZE, f"a fragment body has {len(body)} bytes")
    index, count, length = _HEADER.unpack_from(body, MESSAGE_ID_SIZE)
    if not (1 <= count <= MAX_FRAGMENTS and index < count and length <= FRAGMENT_CAPACITY):
        return Drop(DropReason.BAD_FRAGMENT, f"index {index}, count {count}, length {length}")
    end = _FRAGMENT_HEADER_SIZE + length
    if any(body[end:]):
        return Drop(DropReason.BAD_FRAGMENT, "padding is not zero")
    return body[:MESSAGE_ID_SIZE], index, count, body[_FRAGMENT_HEADER_SIZE:end]
