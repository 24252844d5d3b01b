"""An in-process simulated network: thousands of nodes in one trio program.

Theory of operation (SPEC.md, "Memory transport"). Every frame, request, answer and stream
frame, is delivered after ``latency + jitter x U(0,1) + size / bandwidth`` seconds of trio
time, where the bandwidth term queues behind the sender's earlier frames (one uplink per node).
Loss models TCP honestly: a lost frame is not dropped, it is retransmitted after an RTO of
0.2 s that doubles for each consecutive loss of the same frame, so it arrives late. Frames of
one stream never overtake each other. Partitions and crashes make a peer unreachable:
requests to it fail with ``PeerUnreachable``, its streams are reset, and requests it was
serving are never answered (the requester's deadline fires, or the crash fails them at once).

All randomness comes from one ``random.Random(seed)`` owned by the network, and all time from
trio's clock, so a run under ``trio.testing.MockClock`` is exactly reproducible.

A simulation moves hundreds of thousands of messages, so the per-message machinery is lean:
a batch of requests (``request_each``) is delivered from the sender's one task, which wakes
once for all the answers, and a receiver serves what arrived from one task until a handler
has to wait (then a new task takes the requests behind it).
"""

from __future__ import annotations

import collections
import logging
import math
import operator
import random
import types
from collections.abc import Callable, Coroutine, Generator, Iterable, Sequence
from typing import Any

import trio

from meshfed.errors import (
    PeerUnreachable,
    RemoteProtocolError,
    RequestFailed,
    StreamClosed,
)
from meshfed.identity import Identity, PeerId
from meshfed.stats import NodeStats, RejectReason
from meshfed.transport import (
    RequestHandler,
    Stream,
    StreamHandler,
    Transport,
    TransportLimits,
)

from ._limits import PeerAdmission

__all__ = ["MemoryNetwork", "MemoryStream", "MemoryTransport"]

log = logging.getLogger(__name__)

_RTO_S = 0.2
_ARRIVAL_ORDER = operator.itemgetter(0, 1)
_STREAM_BUFFER_FRAMES = 16


class MemoryNetwork:
    """The simulated network all memory transports of one simulation join.

    Args:
        seed: seeds the network's only random source.
        latency: one-way delay of every frame, seconds.
        jitter: extra delay, uniform in ``[0, jitter)``, per frame.
        bandwidth: each node's uplink in bytes/s (``None``: unlimited).
        loss: probability that a frame is lost once (and retransmitted, see module docstring).
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: float = 0.0,
        jitter: float = 0.0,
        bandwidth: float | None = None,
        loss: float = 0.0,
    ) -> None:
        if latency < 0 or jitter < 0:
            raise ValueError(f"latency and jitter must be >= 0, got {latency} and {jitter}")
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s or None, got {bandwidth}")
        if not 0 <= loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {loss}")
        self.latency, self.jitter, self.bandwidth, self.loss = latency, jitter, bandwidth, loss
        self._rng = random.Random(seed)
        self._nodes: dict[PeerId, MemoryTransport] = {}
        self._group: dict[PeerId, int] = {}
        self._uplink_free_at: dict[PeerId, float] = {}

    def create_transport(
        self,
        identity: Identity,
        *,
        stats: NodeStats,
        limits: TransportLimits = TransportLimits(),  # noqa: B008 - frozen, immutable
        accepts_inbound: bool = True,
    ) -> MemoryTransport:
        """Register a node with this identity and return its transport. A node whose earlier
        transport stopped joins again at its old address (a restart).

        Args:
            accepts_inbound: ``False`` models a peer behind NAT (client mode): others reach it
                only after it contacted them.
        """
        earlier = self._nodes.get(identity.peer_id)
        if earlier is not None and (earlier._serving or earlier._nursery is None):
            raise ValueError(f"{identity.peer_id} already joined this network")
        index = len(self._nodes) if earlier is None else earlier._index
        transport = MemoryTransport(self, identity.peer_id, index, stats, limits)
        transport.accepts_inbound = accepts_inbound
        self._nodes[identity.peer_id] = transport
        return transport

    # -- fault injection -----------------------------------------------------------------------

    def partition(self, *groups: Iterable[PeerId]) -> None:
        """Cut the network: peers in different groups cannot reach each other. Peers named in
        no group keep reaching everyone. Replaces any earlier partition."""
        self._group = {peer: index for index, group in enumerate(groups) for peer in group}
        for node in self._nodes.values():
            node._reset_streams(lambda other, n=node: not self.reachable(n.local_peer, other))

    def heal(self) -> None:
        """Undo :meth:`partition`."""
        self._group = {}

    def crash(self, peer: PeerId) -> None:
        """Stop ``peer`` abruptly: its tasks are cancelled and its streams reset."""
        self._nodes[peer]._crash()

    def reachable(self, a: PeerId, b: PeerId) -> bool:
        """True if ``a`` can reach ``b`` now (both up and not partitioned apart)."""
        node = self._nodes.get(b)
        if node is None or not node._serving or not self._nodes[a]._serving:
            return False
        if not node.accepts_inbound and a not in node._contacts:
            return False  # behind NAT: only over a connection it opened itself
        if not self._group:
            return True
        group_a, group_b = self._group.get(a), self._group.get(b)
        return group_a is None or group_b is None or group_a == group_b

    # -- delivery ------------------------------------------------------------------------------

    def _delivery_time(self, sender: PeerId, size: int, now: float | None = None) -> float:
        """When a frame of ``size`` bytes that ``sender`` puts on the wire at ``now`` (trio
        time; the current one by default) arrives."""
        now = trio.current_time() if now is None else now
        start = now
        if self.bandwidth is not None:
            start = max(now, self._uplink_free_at.get(sender, now))
            self._uplink_free_at[sender] = start + size / self.bandwidth
            start += size / self.bandwidth
        delay = self.latency + (self.jitter * self._rng.random() if self.jitter else 0.0)
        rto = _RTO_S
        while self.loss and self._rng.random() < self.loss:
            delay += rto
            rto *= 2
        return start + delay

    def _node(self, source: PeerId, peer: PeerId) -> MemoryTransport:
        if not self.reachable(source, peer):
            raise PeerUnreachable(f"{peer} is not reachable from {source} (down or partitioned)")
        return self._nodes[peer]


@types.coroutine
def _resume(coroutine: Coroutine[Any, Any, None], waiting: Any) -> Generator[Any, Any, None]:
    """Go on running ``coroutine``, which yielded ``waiting`` to the trio loop, as part of the
    awaiting task (what ``await`` does for a coroutine that has not started)."""
    try:
        while True:
            try:
                sent = yield waiting
            except BaseException as exc:
                waiting = coroutine.throw(exc)
            else:
                waiting = coroutine.send(sent)
    except StopIteration:
        return
    finally:
        coroutine.close()


async def _until(when: float) -> None:
    """Wait until trio time ``when`` (no wait, and no cancel scope, once it has passed: at zero
    latency that is every frame, and a simulation moves hundreds of thousands of them)."""
    if when > trio.current_time():
        await trio.sleep_until(when)


class _Batch:
    """The requests one task sent at once: it wakes when the last is answered."""

    __slots__ = ("done", "pending")

    def __init__(self) -> None:
        self.pending = 0
        self.done = trio.Event()


class _Call:
    """One request in flight: the answer (and when it arrives), or why it never will."""

    __slots__ = ("answer", "arrival", "batch", "error", "finished")

    def __init__(self, batch: _Batch) -> None:
        self.batch = batch
        batch.pending += 1
        self.finished = False
        self.answer: bytes | None = None
        self.error: Exception | None = None
        self.arrival = 0.0

    def finish(
        self, answer: bytes | None = None, error: Exception | None = None, arrival: float = 0.0
    ) -> None:
        if not self.finished:
            self.finished = True
            self.answer, self.error, self.arrival = answer, error, arrival
            self.batch.pending -= 1
            if not self.batch.pending:
                self.batch.done.set()


class MemoryStream(Stream):
    """One end of a simulated stream."""

    def __init__(
        self,
        network: MemoryNetwork,
        local: PeerId,
        remote: PeerId,
        protocol: str,
        outgoing: trio.MemorySendChannel[tuple[float, bytes]],
        incoming: trio.MemoryReceiveChannel[tuple[float, bytes]],
        max_frame_bytes: int,
        stats: NodeStats,
    ) -> None:
        self.remote_peer = remote
        self.protocol = protocol
        self._network = network
        self._local = local
        self._outgoing = outgoing
        self._incoming = incoming
        self._max_frame_bytes = max_frame_bytes
        self._stats = stats
        self._reset = False
        self._last_arrival = 0.0
        self._other: MemoryStream | None = None
        #: called once when this end closes (the dialling transport stops tracking it)
        self._on_close: Callable[[MemoryStream], None] | None = None

    async def send(self, frame: bytes | bytearray | memoryview) -> None:
        if self._reset:
            raise StreamClosed(f"stream to {self.remote_peer} was reset")
        data = bytes(frame)
        arrival = max(self._network._delivery_time(self._local, len(data)), self._last_arrival)
        self._last_arrival = arrival
        self._stats.bytes_out += len(data)
        try:
            await self._outgoing.send((arrival, data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise StreamClosed(f"stream to {self.remote_peer} is closed") from None

    async def _next(self) -> bytes:
        if self._reset:
            raise StreamClosed(f"stream from {self.remote_peer} was reset")
        try:
            arrival, data = await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StreamClosed(f"stream from {self.remote_peer} ended") from None
        await _until(arrival)
        if self._reset:
            raise StreamClosed(f"stream from {self.remote_peer} was reset")
        self._stats.bytes_in += len(data)
        if len(data) > self._max_frame_bytes:
            self.reset()
            raise RemoteProtocolError(
                f"frame of {len(data)} bytes exceeds {self._max_frame_bytes}",
                reason=RejectReason.OVERSIZED,
            )
        return data

    async def receive(self) -> bytes:
        return await self._next()

    async def receive_into(self, buffer: memoryview) -> int:
        data = await self._next()
        if len(data) > len(buffer):
            self.reset()
            raise RemoteProtocolError(
                f"frame of {len(data)} bytes does not fit a {len(buffer)}-byte buffer",
                reason=RejectReason.BAD_FIELD,
            )
        buffer[: len(data)] = data
        return len(data)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close gracefully: frames already sent still arrive, then the peer sees the end."""
        self._outgoing.close()
        self._incoming.close()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self)

    def reset(self) -> None:
        """Abort both ends at once: frames in flight are lost, both sides' next call raises
        ``StreamClosed``."""
        for end in (self, self._other):
            if end is not None:
                end._reset = True
                end.close()


class MemoryTransport(Transport):
    """A node's view of a :class:`MemoryNetwork`. Create with ``network.create_transport``."""

    def __init__(
        self,
        network: MemoryNetwork,
        peer: PeerId,
        index: int,
        stats: NodeStats,
        limits: TransportLimits,
    ) -> None:
        self._network = network
        self._peer = peer
        self._index = index
        self.stats = stats
        self.limits = limits
        self._admission = PeerAdmission(limits)
        self._request_handlers: dict[str, RequestHandler] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._nursery: trio.Nursery | None = None
        self._serving = False
        self._calls: set[_Call] = set()
        self._inbox: collections.deque[tuple[PeerId, RequestHandler, bytes, _Call]] = (
            collections.deque()
        )
        self._streams: set[MemoryStream] = set()
        self._contacts: dict[PeerId, None] = {}
        self.accepts_inbound = True

    @property
    def local_peer(self) -> PeerId:
        return self._peer

    @property
    def listen_addrs(self) -> list[str]:
        if not self._serving or not self.accepts_inbound:
            return []
        return [f"/memory/{self._index}/p2p/{self._peer}"]

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        self._request_handlers[protocol] = handler

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._stream_handlers[protocol] = handler

    def connected_peers(self) -> list[PeerId]:
        return [p for p in self._contacts if self._network.reachable(self._peer, p)]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._serving = True
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._stop()

    def _stop(self) -> None:
        self._serving = False
        for call in list(self._calls):
            call.finish(error=PeerUnreachable(f"{self._peer} stopped"))
        self._reset_streams(lambda _: True)

    def _crash(self) -> None:
        self._stop()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel(reason="crashed by the simulation")

    def _reset_streams(self, condition: object) -> None:
        for stream in list(self._streams):
            if callable(condition) and condition(stream.remote_peer):
                stream.reset()
                self._streams.discard(stream)

    async def connect(self, addr: str) -> PeerId:
        try:
            peer = PeerId.from_string(addr.rsplit("/p2p/", 1)[1])
        except (IndexError, ValueError):
            raise PeerUnreachable(f"{addr!r} does not end in /p2p/<peer id>") from None
        node = self._network._node(self._peer, peer)
        await trio.sleep(2 * self._network.latency)  # a handshake round trip
        self._contacts[peer] = None
        node._contacts[self._peer] = None
        return peer

    # -- requests ------------------------------------------------------------------------------

    async def request(self, peer: PeerId, protocol: str, payload: bytes) -> bytes:
        (answer,) = await self.request_each([(peer, payload)], protocol, deadline=math.inf)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def request_each(
        self, requests: Sequence[tuple[PeerId, bytes]], protocol: str, *, deadline: float
    ) -> list[bytes | Exception]:
        """Every request of the batch from this one task: each is delivered at its arrival
        time and served by a task of its receiver, as :meth:`request` would; the batch ends
        when the last answer arrived or at ``deadline``."""
        batch = _Batch()
        results: list[bytes | Exception | _Call] = []
        outgoing: list[tuple[float, int, MemoryTransport, bytes, _Call]] = []
        now = trio.current_time()
        for peer, payload in requests:
            try:
                target = self._network._node(self._peer, peer)
            except PeerUnreachable as exc:
                results.append(exc)
                continue
            payload = bytes(payload)
            self.stats.bytes_out += len(payload)
            call = _Call(batch)
            arrival = self._network._delivery_time(self._peer, len(payload), now)
            outgoing.append((arrival, len(results), target, payload, call))
            results.append(call)
        with trio.move_on_at(deadline):
            outgoing.sort(key=_ARRIVAL_ORDER)
            for arrival, _, target, payload, call in outgoing:
                if arrival > now:
                    await trio.sleep_until(arrival)
                    now = trio.current_time()
                    try:  # the world may have changed meanwhile
                        target = self._network._node(self._peer, target._peer)
                    except PeerUnreachable as exc:
                        call.finish(error=exc)
                        continue
                self._contacts[target._peer] = None
                target._accept_call(self._peer, protocol, payload, call, now)
            if batch.pending:
                await batch.done.wait()
            # an answer already sent arrives, like TCP data
            await _until(max((item[4].arrival for item in outgoing), default=0.0))
        now = trio.current_time()
        return [self._outcome(item, now) for item in results]

    def _outcome(self, item: bytes | Exception | _Call, now: float) -> bytes | Exception:
        """What one request of a batch came to, once the batch ended (at ``now``)."""
        if not isinstance(item, _Call):
            return item
        if not item.finished or item.arrival > now:
            return trio.TooSlowError("no answer before the deadline")
        if item.error is not None:
            return item.error
        assert item.answer is not None
        self.stats.bytes_in += len(item.answer)
        return item.answer

    def _accept_call(
        self, source: PeerId, protocol: str, payload: bytes, call: _Call, now: float
    ) -> None:
        assert self._nursery is not None
        self._contacts[source] = None
        self.stats.bytes_in += len(payload)
        reason: RejectReason | None = None
        handler = self._request_handlers.get(protocol)
        if len(payload) > self.limits.max_frame_bytes:
            reason = RejectReason.OVERSIZED
        elif handler is None:
            reason = RejectReason.UNKNOWN_PROTOCOL
        else:
            reason = self._admission.admit(source, now, is_request=True)
        if reason is not None:
            self.stats.reject(reason)
            self._answer(call, None, reason.value)
            return
        assert handler is not None
        self._calls.add(call)
        self._inbox.append((source, handler, payload, call))
        if len(self._inbox) == 1:
            self._nursery.start_soon(self._serve_inbox)

    async def _serve_inbox(self) -> None:
        """Serve the calls that arrived, in order, each as if in its own task: one runs here
        until it first waits for something; then a new task takes over the calls behind it,
        and this one stays with the waiting call. Calls that never wait (most) cost no task."""
        while self._inbox:
            source, handler, payload, call = self._inbox[0]
            served = self._serve_call(source, handler, payload, call)
            try:
                waiting = served.send(None)
            except StopIteration:
                self._inbox.popleft()
                continue
            self._inbox.popleft()
            if self._inbox:
                assert self._nursery is not None
                self._nursery.start_soon(self._serve_inbox)
            await _resume(served, waiting)
            return

    async def _serve_call(
        self, source: PeerId, handler: RequestHandler, payload: bytes, call: _Call
    ) -> None:
        answer: bytes | None = None
        error: str | None = None
        try:
            answer = await handler(source, payload)
        except RemoteProtocolError as exc:
            error = str(exc.reason)
        except Exception:
            log.exception("request handler failed", extra={"peer": source.short()})
            error = "internal"
        except BaseException:
            # Cancelled mid-handler (stop or crash): the requester learns now, not at its deadline.
            call.finish(error=PeerUnreachable(f"{self._peer} stopped while serving"))
            raise
        finally:
            self._admission.release(source)
            self._calls.discard(call)
        self._answer(call, answer, error)

    def _answer(self, call: _Call, answer: bytes | None, error: str | None) -> None:
        """Put the answer on the wire: it arrives after the usual delay unless cut off."""
        size = len(answer) if answer is not None else 16
        arrival = self._network._delivery_time(self._peer, size)
        if error is not None:
            call.finish(
                error=RequestFailed(f"{self._peer} refused: {error}", reason=error), arrival=arrival
            )
        else:
            self.stats.bytes_out += size
            call.finish(answer=answer, arrival=arrival)

    # -- streams -------------------------------------------------------------------------------

    async def open_stream(self, peer: PeerId, protocol: str) -> Stream:
        target = self._network._node(self._peer, peer)
        await trio.sleep(2 * self._network.latency)  # the open handshake
        target = self._network._node(self._peer, peer)
        self._contacts[peer] = None
        ours_out, theirs_in = trio.open_memory_channel[tuple[float, bytes]](_STREAM_BUFFER_FRAMES)
        theirs_out, ours_in = trio.open_memory_channel[tuple[float, bytes]](_STREAM_BUFFER_FRAMES)
        mine = MemoryStream(
            self._network,
            self._peer,
            peer,
            protocol,
            ours_out,
            ours_in,
            self.limits.max_frame_bytes,
            self.stats,
        )
        theirs = MemoryStream(
            self._network,
            peer,
            self._peer,
            protocol,
            theirs_out,
            theirs_in,
            target.limits.max_frame_bytes,
            target.stats,
        )
        mine._other, theirs._other = theirs, mine
        refusal = target._accept_stream(theirs)
        if refusal is not None:
            await trio.sleep_until(self._network._delivery_time(peer, 16))  # the refusal travels
            raise RequestFailed(f"{peer} refused the stream: {refusal}", reason=refusal)
        self._streams.add(mine)
        mine._on_close = self._streams.discard  # else every stream ever dialled stays here
        return mine

    def _accept_stream(self, stream: MemoryStream) -> str | None:
        """Start serving ``stream``, or return why it is refused."""
        assert self._nursery is not None
        source = stream.remote_peer
        self._contacts[source] = None
        handler = self._stream_handlers.get(stream.protocol)
        reason = (
            RejectReason.UNKNOWN_PROTOCOL
            if handler is None
            else self._admission.admit(source, trio.current_time(), is_request=False)
        )
        if reason is not None:
            self.stats.reject(reason)
            stream.reset()
            return reason.value
        assert handler is not None
        self._streams.add(stream)
        self._nursery.start_soon(self._serve_stream, handler, stream)
        return None

    async def _serve_stream(self, handler: StreamHandler, stream: MemoryStream) -> None:
        try:
            await handler(stream)
        except StreamClosed:
            pass
        except Exception:
            log.exception("stream handler failed", extra={"peer": stream.remote_peer.short()})
        finally:
            self._admission.release(stream.remote_peer)
            self._streams.discard(stream)
            stream.close()
