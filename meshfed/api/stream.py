"""A server-sent events feed: numbered frames published once, read by any number of clients.

Publishing encodes a frame once (``id``, ``event``, one ``data`` line of JSON) and keeps the
last ``keep`` frames; each client remembers the last number it sent and, woken by the next
publication, sends what came after it. A client that fell more than ``keep`` frames behind is
ended (its browser reconnects and starts from a fresh snapshot): a slow reader costs the node
no memory of its own. Idle clients get a comment line every ``keepalive_s``.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any

import trio

__all__ = ["Feed", "frame"]


def _finite(data: Any) -> Any:
    """``data`` with every NaN or infinity (a peer's reading, say) as None: not JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


def frame(event: str, data: Any, seq: int | None = None) -> bytes:
    """One server-sent event: ``data`` as one line of compact JSON (not-a-numbers as null)."""
    head = "" if seq is None else f"id: {seq}\n"
    body = json.dumps(_finite(data), separators=(",", ":"), allow_nan=False)
    return f"{head}event: {event}\ndata: {body}\n\n".encode()


class Feed:
    """Frames published on the trio loop and streamed to clients (see the module)."""

    def __init__(self, keep: int = 256, keepalive_s: float = 15.0) -> None:
        self._frames: deque[tuple[int, bytes]] = deque(maxlen=keep)
        self._seq = 0
        self._changed = trio.Event()
        self._keepalive_s = keepalive_s
        #: clients streaming now
        self.clients = 0

    def publish(self, event: str, data: Any) -> None:
        """Send ``data`` as ``event`` to every client."""
        self._seq += 1
        self._frames.append((self._seq, frame(event, data, self._seq)))
        self._changed.set()
        self._changed = trio.Event()

    async def stream(self, first: Iterable[bytes]) -> AsyncIterator[bytes]:
        """A client's frames: ``first`` (its start: history, snapshot), then every frame
        published from now on, until it falls behind or goes away."""
        self.clients += 1
        try:
            seen = self._seq
            for start in first:
                yield start
            while True:
                if self._seq == seen:
                    with trio.move_on_after(self._keepalive_s):
                        await self._changed.wait()
                    if self._seq == seen:
                        yield b": keep-alive\n\n"
                        continue
                if not self._frames or self._frames[0][0] > seen + 1:
                    return  # fell behind what is kept: reconnect for a fresh start
                for seq, published in list(self._frames):
                    if seq > seen:
                        yield published
                        seen = seq
        finally:
            self.clients -= 1
