"""The transport interface every node talks through.

A transport gives a node authenticated peers and two ways to talk to them, each on a named
protocol (``"/meshfed/rpc/1"`` style strings):

- request/response: ``await transport.request(peer, protocol, payload)`` returns the bytes the
  peer's request handler returned; ``request_each`` sends several requests at once (one
  message for many peers) and returns each answer or error;
- framed streams: ``await transport.open_stream(peer, protocol)`` gives a :class:`Stream` that
  carries whole frames both ways (used for chunked arrays and anything long-lived).

The transport authenticates peers (``remote_peer`` is the peer whose key proved it), bounds
every frame by :class:`TransportLimits`, rate-limits requests and caps concurrent streams per
peer, and counts what it rejects in the node's :class:`~meshfed.stats.NodeStats`. It knows
nothing about envelopes or message types: those are the node's business.

Two implementations live in ``meshfed.transports``: ``libp2p`` (TCP + Noise + yamux, with a
sealed direct channel for data) and ``memory`` (a simulated network in one process).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from .errors import TransportError
from .identity import PeerId

__all__ = ["RequestHandler", "Stream", "StreamHandler", "Transport", "TransportLimits"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportLimits:
    """Per-peer bounds a transport enforces on what it receives.

    Attributes:
        max_frame_bytes: the largest frame (one request, response or stream frame) accepted.
        max_streams_per_peer: concurrent inbound streams plus requests in flight, per peer.
        requests_per_second: sustained inbound request rate per peer (token bucket).
        request_burst: bucket size for that rate.
    """

    max_frame_bytes: int = 8 * 1024 * 1024
    max_streams_per_peer: int = 64
    requests_per_second: float = 1000.0
    request_burst: int = 2000

    def __post_init__(self) -> None:
        if self.max_frame_bytes < 1024:
            raise ValueError(f"max_frame_bytes must be at least 1024, not {self.max_frame_bytes}")
        if self.max_streams_per_peer < 1:
            raise ValueError("max_streams_per_peer must be at least 1")
        if self.requests_per_second <= 0 or self.request_burst < 1:
            raise ValueError("requests_per_second must be > 0 and request_burst >= 1")


class Stream(ABC):
    """A bidirectional stream of whole frames with one authenticated peer."""

    remote_peer: PeerId
    protocol: str

    @abstractmethod
    async def send(self, frame: bytes | bytearray | memoryview) -> None:
        """Send one frame (at most the peer's ``max_frame_bytes``).

        Raises:
            StreamClosed: if the stream was closed or reset.
        """

    @abstractmethod
    async def receive(self) -> bytes:
        """Receive the next whole frame. Receive errors are not counted by the transport: the
        stream's user counts the ``RemoteProtocolError`` it catches.

        Raises:
            StreamClosed: when the other side has closed the stream (no more frames).
            RemoteProtocolError: if the frame is oversized or truncated (already counted).
        """

    @abstractmethod
    async def receive_into(self, buffer: memoryview) -> int:
        """Receive the next frame into ``buffer`` without an extra copy; return its length.

        Raises:
            StreamClosed: when the other side has closed the stream.
            RemoteProtocolError: if the frame does not fit ``buffer`` or is truncated.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close our side; the peer's next ``receive`` raises :class:`StreamClosed`."""

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


RequestHandler = Callable[[PeerId, bytes], Awaitable[bytes]]
"""``handler(peer, payload) -> response``; raising ``RemoteProtocolError`` answers with an error."""

StreamHandler = Callable[[Stream], Awaitable[None]]
"""``handler(stream)``; the transport closes the stream when the handler returns."""


class Transport(ABC):
    """What a node needs from a network. See the module docstring."""

    @property
    @abstractmethod
    def local_peer(self) -> PeerId:
        """Our own peer id."""

    @property
    @abstractmethod
    def listen_addrs(self) -> list[str]:
        """Multiaddrs (ending in ``/p2p/<id>``) other peers can dial; empty before ``run``."""

    @abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; call ``task_status.started()`` once dialable."""

    @abstractmethod
    async def connect(self, addr: str) -> PeerId:
        """Dial a multiaddr that ends in ``/p2p/<id>`` and return the authenticated peer id.

        Raises:
            PeerUnreachable: if nobody answers, or the peer is not who the address says.
        """

    @abstractmethod
    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        """Serve requests on ``protocol`` with ``handler``."""

    @abstractmethod
    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve inbound streams on ``protocol`` with ``handler``."""

    @abstractmethod
    async def request(self, peer: PeerId, protocol: str, payload: bytes) -> bytes:
        """Send ``payload`` to ``peer``'s handler for ``protocol`` and return its answer.

        The transport sets no deadline: wrap the call in ``trio.fail_after``.

        Raises:
            PeerUnreachable: no connection to ``peer`` could be made.
            RequestFailed: the peer answered with an error (unknown protocol, rate limit ...).
        """

    async def request_each(
        self, requests: Sequence[tuple[PeerId, bytes]], protocol: str, *, deadline: float
    ) -> list[bytes | Exception]:
        """:meth:`request` each ``(peer, payload)`` at once; returns, in order, each answer or
        the error that request met: a :class:`~meshfed.errors.TransportError` as
        :meth:`request` raises it, or ``trio.TooSlowError`` if no answer came by the trio time
        ``deadline``. One concurrent request each here; a transport may do it cheaper."""
        results: list[bytes | Exception] = [trio.TooSlowError() for _ in requests]

        async def one(index: int, peer: PeerId, payload: bytes) -> None:
            try:
                results[index] = await self.request(peer, protocol, payload)
            except TransportError as exc:
                results[index] = exc

        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                for index, (peer, payload) in enumerate(requests):
                    nursery.start_soon(one, index, peer, payload)
        return results

    @abstractmethod
    async def open_stream(self, peer: PeerId, protocol: str) -> Stream:
        """Open a framed stream to ``peer`` on ``protocol``.

        Raises:
            PeerUnreachable: no connection to ``peer`` could be made.
            RequestFailed: the peer refused the stream (``unknown_protocol``,
                ``too_many_streams``).
        """

    @abstractmethod
    def connected_peers(self) -> list[PeerId]:
        """Peers we currently hold a connection to."""
