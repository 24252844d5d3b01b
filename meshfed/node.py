"""The node: one equal peer, composed of an identity, a transport and the envelope layer.

A :class:`Node` is what ``open_node`` yields. It owns no thread and no loop: every task it runs
lives in the nursery of ``open_node``, and leaving that ``async with`` block stops them all
(gracefully first, within ``config.stop_timeout_s``, then by cancellation).

Everything a peer sends passes :func:`meshfed.wire.open_envelope` before any handler sees it;
what fails is counted in :attr:`Node.stats` and answered with an error, and the node keeps
serving.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy.typing as npt
import trio

from .arrays import (
    INLINE_ARRAY_BYTES,
    ArrayAssembler,
    ArrayHeader,
    ArrayPart,
    ArrayParts,
    InlineArray,
    header_for,
    iter_chunks,
    parts_frame,
    split_parts_frame,
)
from .audit import AUDITED_REJECTIONS, AuditKind, AuditTrail, seller_auditor
from .config import NodeConfig
from .control import Ack, Ping, Pong
from .datadir import hold_data_dir
from .errors import (
    ConfigError,
    LocalProtocolError,
    MeshfedError,
    RemoteProtocolError,
    RequestTimeout,
    StreamClosed,
)
from .identity import _KEY_FILE, Identity, PeerId, load_or_create_identity
from .stats import NodeStats, RejectReason
from .store import Store
from .transport import Stream, Transport
from .wire import NO_SCOPE, Envelope, Message, ReplayGuard, Scope, open_envelope, seal

if TYPE_CHECKING:
    from .data.registry import DataRegistry
    from .device.readings import ReadingsSource
    from .device.service import DeviceService
    from .market.driver import JobHandle, Market
    from .market.messages import JobStatusReport, Verification
    from .market.pricing import Estimate
    from .market.terms import Requirements
    from .membership.records import DatasetOffer, PeerRecord, Role
    from .membership.service import Membership
    from .onion.service import OnionService
    from .transports.memory import MemoryNetwork

__all__ = ["ArrayHandler", "Node", "PeerState", "MessageHandler", "open_node"]

log = logging.getLogger(__name__)

RPC_PROTOCOL = "/meshfed/rpc/1"
MSG_PROTOCOL = "/meshfed/msg/1"
PARTS_PROTOCOL = "/meshfed/parts/1"
ARRAY_PROTOCOL = "/meshfed/array/2"
_MAX_JOB_LEN = 64  # Scope.job's bound (SPEC 3)
#: what the key a node's store is sealed with is derived for (``Identity.derive_key``)
STORE_KEY_PURPOSE = b"meshfed-store-v1"

M = TypeVar("M", bound=Message)
MessageHandler = Callable[[Envelope, Any], Awaitable[Message | None]]
"""``handler(envelope, body) -> answer``; ``None`` answers :class:`~meshfed.control.Ack`."""
ArrayHandler = Callable[[Envelope, ArrayHeader, npt.NDArray[Any]], Awaitable[None]]
"""``handler(envelope, header, array)``, called once the whole array arrived and checked out."""


K = TypeVar("K")
V = TypeVar("V")


def _register(
    table: dict[tuple[K, bytes | None], V],
    key: K,
    job: bytes | None,
    value: V,
    *,
    replace: bool,
    what: str,
) -> None:
    """``table[key, job] = value``, refusing a second registration unless ``replace``."""
    if job is not None and len(job) > _MAX_JOB_LEN:
        raise LocalProtocolError(
            f"a job scope has at most {_MAX_JOB_LEN} bytes, not {len(job)}: no envelope has it"
        )
    if (key, job) in table and not replace:
        for_job = "" if job is None else f" for job {job!r}"
        raise LocalProtocolError(
            f"{what} handled already{for_job}; pass replace=True to replace the handler"
        )
    table[key, job] = value


def _unregister(
    table: dict[tuple[K, bytes | None], V], key: K, job: bytes | None, value: object
) -> None:
    """Remove ``table[key, job]`` if it is ``value`` (not a later registration's)."""
    if table.get((key, job)) == value:
        del table[key, job]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class PeerState:
    """What this node knows about one peer from talking to it."""

    peer: PeerId
    last_seen: float = 0.0
    rtt_s: float | None = None
    failures: int = 0


class Node:
    """One meshfed peer. Do not construct directly: use :func:`open_node`."""

    def __init__(
        self, config: NodeConfig, identity: Identity, transport: Transport, stats: NodeStats
    ) -> None:
        self.config = config
        self.identity = identity
        self.transport = transport
        #: counters shared with the transport: what arrived, what was rejected and why
        self.stats = stats
        #: what talking to each peer showed (round trip, failures); see ``peers()`` for membership
        self.links: dict[PeerId, PeerState] = {}
        self.membership: Membership | None = None
        #: the node's persistent state (``config.store_file``), open while the node runs
        self.store: Store | None = None
        #: the node's own data sets (with a store): registered ones are offered in its record
        self.datasets: DataRegistry | None = None
        #: buying and selling work (``config.market``, with a store and membership)
        self.market: Market | None = None
        #: the device's readings and whether it takes work now (``config.device``)
        self.device: DeviceService | None = None
        #: where security-relevant events are noted for the store's audit log (:meth:`audit`)
        self.audit_trail = AuditTrail(keeps=config.store_path is not None)
        #: onion routing: relaying, anonymous requests and privacy levels (SPEC 12)
        self.onion: OnionService | None = None
        #: the REST API's base URL while it serves (``config.api``), else None
        self.api_url: str | None = None
        self._started = trio.current_time()
        self._replay = ReplayGuard(
            window_ms=int(config.replay_window_s * 1000),
            max_skew_ms=int(config.max_clock_skew_s * 1000),
            started_ms=_now_ms() - int(config.max_clock_skew_s * 1000),
        )
        self._handlers: dict[tuple[type[Message], bytes | None], MessageHandler] = {}
        self._array_handlers: dict[tuple[str, bytes | None], ArrayHandler] = {}
        self._in_flight = 0
        self._idle: trio.Event | None = None  # only while someone waits for the handlers
        transport.set_request_handler(RPC_PROTOCOL, self._serve_request)
        transport.set_request_handler(MSG_PROTOCOL, self._serve_message)
        transport.set_request_handler(PARTS_PROTOCOL, self._serve_parts)
        transport.set_stream_handler(ARRAY_PROTOCOL, self._serve_array)
        self.handle(Ping, self._answer_ping)

    # -- identity and addresses ------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        """This node's peer id."""
        return self.identity.peer_id

    @property
    def listen_addrs(self) -> list[str]:
        """Multiaddrs other peers can dial (ending in ``/p2p/<id>``)."""
        return self.transport.listen_addrs

    @property
    def uptime_s(self) -> float:
        """Seconds since the node started (ms precision)."""
        return round(trio.current_time() - self._started, 3)

    async def connect(self, addr: str) -> PeerId:
        """Dial ``addr`` (a multiaddr with ``/p2p/<id>``) and return the peer's id.

        Raises:
            PeerUnreachable: if the peer cannot be reached or is not who the address names.
            RequestTimeout: no connection within ``config.request_timeout_s``.
        """
        timeout = self.config.request_timeout_s
        try:
            with trio.fail_after(timeout):
                peer = await self.transport.connect(addr)
        except trio.TooSlowError:
            raise RequestTimeout(f"{addr} did not answer within {timeout:g} s") from None
        self._peer(peer).last_seen = trio.current_time()
        if self.membership is not None:
            self.membership.introduce(peer)
        return peer

    def _peer(self, peer: PeerId) -> PeerState:
        state = self.links.get(peer)
        if state is None:
            state = self.links[peer] = PeerState(peer)
        return state

    # -- requests ------------------------------------------------------------------------------

    def handle(
        self,
        message_type: type[M],
        handler: Callable[[Envelope, M], Awaitable[Any]],
        *,
        job: bytes | None = None,
        replace: bool = False,
    ) -> None:
        """Answer requests whose body is a ``message_type`` with ``handler``.

        The handler gets the verified envelope and its body and returns the answer (a
        registered message) or ``None`` for an :class:`~meshfed.control.Ack`. Raising
        :class:`~meshfed.errors.RemoteProtocolError` rejects the request: it is counted and the
        requester gets :class:`~meshfed.errors.RequestFailed` with that reason.

        Args:
            message_type: the registered message class to answer.
            handler: ``handler(envelope, body)``.
            job: take only envelopes of this job scope (``envelope.scope.job``); ``None``
                takes every scope no handler was registered for by job. Two jobs on one
                node each register their own handler and each gets its own messages.
            replace: replace the handler registered for ``(message_type, job)``.

        Raises:
            LocalProtocolError: a handler for ``(message_type, job)`` exists and ``replace``
                is false (two parts of a program would otherwise steal each other's messages).
        """
        key: type[Message] = message_type
        what = f"{key.TYPE} is"
        _register(self._handlers, key, job, handler, replace=replace, what=what)

    def unhandle(
        self,
        message_type: type[M],
        handler: Callable[[Envelope, M], Awaitable[Any]],
        *,
        job: bytes | None = None,
    ) -> None:
        """Stop answering ``message_type`` (of ``job``) with ``handler``, as :meth:`handle`
        registered it; a handler registered in its place since stays."""
        key: type[Message] = message_type
        _unregister(self._handlers, key, job, handler)

    async def request(
        self,
        peer: PeerId,
        body: Message,
        *,
        scope: Scope = NO_SCOPE,
        within: float | None = None,
    ) -> Envelope:
        """Send a signed request and return the peer's verified answer.

        Args:
            peer: who to ask.
            body: a registered message.
            scope: the job and round the message belongs to.
            within: seconds to wait for the answer; never more than
                ``config.request_timeout_s``, so a deadline a peer chose (a SWIM ping-req's
                ``timeout_ms``) can be passed as it is.

        Raises:
            RequestTimeout: no answer within ``within`` or ``config.request_timeout_s``.
            PeerUnreachable: the peer cannot be reached.
            RequestFailed: the peer rejected the request (``.reason`` says why).
            RemoteProtocolError: the answer failed verification (counted).
        """
        frame, nonce = seal(self.identity, body, now_ms=_now_ms(), scope=scope)
        started = trio.current_time()
        answer = await self._transport_request(peer, frame, body.TYPE, self._bound(within))
        try:
            envelope = self._open(answer, peer)
            if envelope.reply_to != nonce:
                raise RemoteProtocolError(
                    "the answer's reply_to is not our request", reason=RejectReason.BAD_FIELD
                )
        except RemoteProtocolError as exc:
            self.count_rejection(peer, exc)
            raise
        self._peer(peer).rtt_s = trio.current_time() - started
        return envelope

    def sealed(self, body: Message, *, scope: Scope = NO_SCOPE) -> bytes:
        """``body`` signed by this node, for :meth:`send`: a message for many peers is sealed
        once (each receiver's replay guard sees its nonce once)."""
        return seal(self.identity, body, now_ms=_now_ms(), scope=scope)[0]

    async def send(
        self,
        peer: PeerId,
        body: Message | bytes,
        *,
        scope: Scope = NO_SCOPE,
        within: float | None = None,
    ) -> None:
        """Send a signed one-way message (or a frame from :meth:`sealed`); returns once the
        peer's handler took it. The acknowledgement is the transport's (an empty answer on an
        authenticated connection): no envelope comes back. Bounded by ``within`` seconds if
        given, and by ``config.request_timeout_s``.

        Raises:
            RequestTimeout, PeerUnreachable: as for :meth:`request`.
            RequestFailed: the peer rejected the message (``.reason`` says why).
            RemoteProtocolError: the answer was not empty (counted).
        """
        frame = body if isinstance(body, bytes) else self.sealed(body, scope=scope)
        (error,) = await self.send_each([(peer, frame)], within=within)
        if error is not None:
            raise error

    async def send_each(
        self,
        frames: Sequence[tuple[PeerId, bytes]],
        *,
        within: float | None = None,
        parts: bool = False,
    ) -> list[Exception | None]:
        """Send each ``(peer, frame)`` (frames from :meth:`sealed` or :meth:`sealed_array`;
        with ``parts``, from :meth:`sealed_parts`) as :meth:`send` does, all at once; returns,
        in order, ``None`` for each message its peer took, else the error :meth:`send` would
        have raised. Bounded as :meth:`send` is."""
        timeout = self._bound(within)
        protocol = PARTS_PROTOCOL if parts else MSG_PROTOCOL
        deadline = trio.current_time() + timeout
        answers = await self.transport.request_each(frames, protocol, deadline=deadline)
        errors: list[Exception | None] = []
        for (peer, _), answer in zip(frames, answers, strict=True):
            if isinstance(answer, trio.TooSlowError):
                self._peer(peer).failures += 1
                errors.append(
                    RequestTimeout(f"{peer.short()} took no message within {timeout:g} s")
                )
            elif isinstance(answer, Exception):
                self._peer(peer).failures += 1
                errors.append(answer)
            elif answer:
                exc = RemoteProtocolError(
                    "a one-way message was answered", reason=RejectReason.MALFORMED
                )
                self.count_rejection(peer, exc)
                errors.append(exc)
            else:
                errors.append(None)
        return errors

    def _bound(self, within: float | None) -> float:
        """Seconds a request may take: ``within``, at most ``config.request_timeout_s``."""
        timeout = self.config.request_timeout_s
        return timeout if within is None else max(0.0, min(within, timeout))

    async def _transport_request(
        self, peer: PeerId, frame: bytes, what: str, seconds: float
    ) -> bytes:
        try:
            with trio.fail_after(seconds):
                return await self.transport.request(peer, RPC_PROTOCOL, frame)
        except trio.TooSlowError:
            self._peer(peer).failures += 1
            raise RequestTimeout(
                f"{peer.short()} did not answer {what} within {seconds:g} s"
            ) from None
        except MeshfedError:
            self._peer(peer).failures += 1
            raise

    async def ping(self, peer: PeerId, *, within: float | None = None) -> float:
        """Round-trip a signed :class:`~meshfed.control.Ping` (bounded as :meth:`request`);
        returns seconds."""
        started = trio.current_time()
        await self.request(peer, Ping(sent_ms=_now_ms()), within=within)
        return trio.current_time() - started

    async def _answer_ping(self, envelope: Envelope, ping: Ping) -> Pong:
        return Pong(echo_ms=ping.sent_ms, now_ms=_now_ms())

    def _open(self, frame: bytes, peer: PeerId) -> Envelope:
        """Verify one frame from ``peer``; the caller counts what fails (``count_rejection``)."""
        envelope = open_envelope(
            frame,
            peer=peer,
            now_ms=_now_ms(),
            replay=self._replay,
            max_bytes=self.config.max_message_bytes,
        )
        self.stats.accept(envelope.body.TYPE)
        self._peer(peer).last_seen = trio.current_time()
        return envelope

    def count_rejection(self, peer: PeerId, exc: RemoteProtocolError) -> None:
        """Count one rejection. Each path that receives from a peer calls this exactly once."""
        self.stats.reject(exc.reason)
        if exc.reason in AUDITED_REJECTIONS:
            self.audit_trail.rejected(peer, exc.reason, str(exc))
        log.info(
            "rejected", extra={"peer": peer.short(), "reason": str(exc.reason), "why": str(exc)}
        )

    async def _serve_request(self, peer: PeerId, frame: bytes) -> bytes:
        try:
            envelope = self._open(frame, peer)
            answer = await self._dispatch(envelope)
        except RemoteProtocolError as exc:
            self.count_rejection(peer, exc)
            raise
        reply, _ = seal(
            self.identity,
            Ack() if answer is None else answer,
            now_ms=_now_ms(),
            scope=envelope.scope,
            reply_to=envelope.nonce,
        )
        return reply

    async def _serve_message(self, peer: PeerId, frame: bytes) -> bytes:
        """A one-way message: verified, handed over, answered empty (see :meth:`send`)."""
        try:
            envelope = self._open(frame, peer)
            if isinstance(envelope.body, InlineArray):
                header = envelope.body.header
                self._check_array_size(header)
                await self._deliver_array(envelope, header, envelope.body.array())
            else:
                await self._dispatch(envelope)  # an answer has nowhere to go: dropped
        except RemoteProtocolError as exc:
            self.count_rejection(peer, exc)
            raise
        return b""

    async def _serve_parts(self, peer: PeerId, frame: bytes) -> bytes:
        """This node's part of an :class:`~meshfed.arrays.ArrayParts` message: verified,
        checked against its digest, handed to the array handlers, answered empty."""
        try:
            signed, data = split_parts_frame(frame)
            envelope = self._open(signed, peer)
            if not isinstance(envelope.body, ArrayParts):
                raise RemoteProtocolError(
                    f"a parts frame holds {envelope.body.TYPE}", reason=RejectReason.BAD_FIELD
                )
            header, array = envelope.body.take(self.peer_id, data, transfer_id=envelope.nonce)
            self._check_array_size(header)
            await self._deliver_array(envelope, header, array)
        except RemoteProtocolError as exc:
            self.count_rejection(peer, exc)
            raise
        return b""

    async def _dispatch(self, envelope: Envelope) -> Message | None:
        """The registered handler's answer to a verified envelope (counted as in flight)."""
        handlers, kind = self._handlers, type(envelope.body)
        handler = handlers.get((kind, envelope.scope.job)) or handlers.get((kind, None))
        if handler is None:
            raise RemoteProtocolError(
                f"no handler for {envelope.body.TYPE}", reason=RejectReason.UNKNOWN_TYPE
            )
        self._in_flight += 1
        try:
            answer: Message | None = await handler(envelope, envelope.body)
            return answer
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    # -- arrays --------------------------------------------------------------------------------

    def on_array(
        self,
        handler: ArrayHandler,
        *,
        prefix: str = "",
        job: bytes | None = None,
        replace: bool = False,
    ) -> None:
        """Deliver the arrays whose name starts with ``prefix`` to ``handler`` (the longest
        matching prefix wins). A handler that raises
        :class:`~meshfed.errors.RemoteProtocolError` rejects the array: it is counted and the
        sender gets no acknowledgement.

        Args:
            handler: ``handler(envelope, header, array)``.
            prefix: the names it takes.
            job: take only arrays sent in this job scope; ``None`` takes arrays of every scope
                that no handler registered for by job takes (as for :meth:`handle`).
            replace: replace the handler registered for ``(prefix, job)``.

        Raises:
            LocalProtocolError: a handler for ``(prefix, job)`` exists and ``replace`` is
                false.
        """
        _register(
            self._array_handlers, prefix, job, handler, replace=replace,
            what=f"arrays named {prefix!r}... are",
        )  # fmt: skip

    def off_array(
        self, handler: ArrayHandler, *, prefix: str = "", job: bytes | None = None
    ) -> None:
        """Stop delivering arrays named ``prefix...`` (of ``job``) to ``handler``, as
        :meth:`on_array` registered it; a handler registered in its place since stays."""
        _unregister(self._array_handlers, prefix, job, handler)

    def _array_handler_for(self, name: str, job: bytes) -> ArrayHandler | None:
        for wanted in (job, None):
            matching = [
                prefix
                for prefix, for_job in self._array_handlers
                if for_job == wanted and name.startswith(prefix)
            ]
            if matching:
                return self._array_handlers[max(matching, key=len), wanted]
        return None

    async def send_array(
        self,
        peer: PeerId,
        array: npt.NDArray[Any],
        *,
        name: str,
        scope: Scope = NO_SCOPE,
        within: float | None = None,
    ) -> None:
        """Send ``array`` to ``peer``: up to :data:`~meshfed.arrays.INLINE_ARRAY_BYTES` as one
        :class:`~meshfed.arrays.InlineArray` message (:meth:`send`), longer ones streamed in
        chunks; returns once the peer confirmed it whole.

        Args:
            peer: the receiver.
            array: any numeric numpy array (sent little-endian, C order).
            name: what the receiver's handler sees as the array's name.
            scope: the job and round it belongs to.
            within: seconds the whole transfer may take (``None``: an inline array is
                bounded by ``config.request_timeout_s``, a streamed one not at all).

        Raises:
            RequestTimeout: ``within`` passed.
            LocalProtocolError: the dtype cannot travel.
            PeerUnreachable, StreamClosed: the transfer broke off.
            RequestFailed: the receiver refused an inline array (``.reason`` says why).
            RemoteProtocolError: the receiver answered something else than the empty
                acknowledgement (counted).
        """
        if array.nbytes <= INLINE_ARRAY_BYTES:
            await self.send(peer, self.sealed_array(array, name=name, scope=scope), within=within)
            return
        header, contiguous = self._array_header(array, name)
        try:
            with trio.fail_after(math.inf if within is None else within):
                answer = await self._stream_array(peer, header, contiguous, scope)
        except trio.TooSlowError:
            raise RequestTimeout(
                f"{peer.short()} did not take array {name!r} within {within:g} s"
            ) from None
        if answer:
            exc = RemoteProtocolError(
                "an array was answered with more than an acknowledgement",
                reason=RejectReason.MALFORMED,
            )
            self.count_rejection(peer, exc)
            raise exc

    def sealed_array(self, array: npt.NDArray[Any], *, name: str, scope: Scope = NO_SCOPE) -> bytes:
        """``array`` signed as one :class:`~meshfed.arrays.InlineArray` message, for
        :meth:`send` (an array for several peers is sealed once); what :meth:`send_array` sends
        for an array of at most :data:`~meshfed.arrays.INLINE_ARRAY_BYTES`.

        Raises:
            LocalProtocolError: the array is longer (stream it with :meth:`send_array`), or
                its dtype cannot travel.
        """
        if array.nbytes > INLINE_ARRAY_BYTES:
            raise LocalProtocolError(
                f"an array of {array.nbytes} bytes is streamed, not sent inline"
            )
        header, contiguous = self._array_header(array, name)
        return self.sealed(InlineArray(header=header, data=contiguous.tobytes()), scope=scope)

    def sealed_parts(
        self,
        parts: Sequence[tuple[PeerId, npt.NDArray[Any]]],
        *,
        name: str,
        scope: Scope = NO_SCOPE,
    ) -> list[tuple[PeerId, bytes]]:
        """A different 1-D array for each peer, all named ``name``, under one signature (an
        :class:`~meshfed.arrays.ArrayParts` envelope): ``(peer, frame)`` for
        ``send_each(..., parts=True)``. Each receiver's handler gets its own array as if it
        came from :meth:`send_array`.

        Raises:
            LocalProtocolError: arrays of different dtypes, not 1-D, longer than
                :data:`~meshfed.arrays.INLINE_ARRAY_BYTES`, or of a dtype that cannot travel.
        """
        entries, datas, dtypes = [], [], set()
        for peer, array in parts:
            if array.ndim != 1 or array.nbytes > INLINE_ARRAY_BYTES:
                raise LocalProtocolError(
                    f"parts are 1-D arrays of at most {INLINE_ARRAY_BYTES} bytes, not "
                    f"{array.shape} of {array.nbytes}"
                )
            header, contiguous = header_for(array, name=name, transfer_id=bytes(16), chunk_bytes=1)
            data = contiguous.tobytes()
            dtypes.add(header.dtype)
            datas.append(data)
            entries.append(
                ArrayPart(to=peer, length=len(contiguous), digest=hashlib.sha256(data).digest())
            )
        if len(dtypes) != 1:
            raise LocalProtocolError(f"parts of one dtype, not {sorted(dtypes) or 'none'}")
        envelope = self.sealed(
            ArrayParts(name=name, dtype=dtypes.pop(), parts=entries), scope=scope
        )
        return [
            (entry.to, parts_frame(envelope, data))
            for entry, data in zip(entries, datas, strict=True)
        ]

    def _array_header(
        self, array: npt.NDArray[Any], name: str
    ) -> tuple[ArrayHeader, npt.NDArray[Any]]:
        return header_for(
            array, name=name, transfer_id=os.urandom(16), chunk_bytes=self.config.array_chunk_bytes
        )

    async def _stream_array(
        self, peer: PeerId, header: ArrayHeader, contiguous: npt.NDArray[Any], scope: Scope
    ) -> bytes:
        """Header and chunks on a new stream; returns the receiver's answer."""
        stream = await self.transport.open_stream(peer, ARRAY_PROTOCOL)
        async with stream:
            frame, _ = seal(self.identity, header, now_ms=_now_ms(), scope=scope)
            await stream.send(frame)
            for chunk in iter_chunks(contiguous, header.chunk_bytes):
                await stream.send(chunk)
            return await stream.receive()

    def _check_array_size(self, header: ArrayHeader) -> None:
        if header.nbytes > self.config.max_array_bytes:
            raise RemoteProtocolError(
                f"array {header.name!r} of {header.nbytes} bytes exceeds "
                f"{self.config.max_array_bytes}",
                reason=RejectReason.OVERSIZED,
            )

    async def _deliver_array(
        self, envelope: Envelope, header: ArrayHeader, array: npt.NDArray[Any]
    ) -> None:
        handler = self._array_handler_for(header.name, envelope.scope.job)
        if handler is None:
            raise RemoteProtocolError(
                f"no handler for array {header.name!r}", reason=RejectReason.UNKNOWN_TYPE
            )
        await handler(envelope, header, array)

    async def _serve_array(self, stream: Stream) -> None:
        peer = stream.remote_peer
        try:
            header_env = self._open(await stream.receive(), peer)
            header = header_env.body
            if not isinstance(header, ArrayHeader):
                raise RemoteProtocolError(
                    "an array stream starts with a header", reason=RejectReason.BAD_FIELD
                )
            assembler = ArrayAssembler(header, max_bytes=self.config.max_array_bytes)
            while not assembler.complete:
                length = await stream.receive_into(assembler.next_chunk_buffer())
                assembler.chunk_received(length)
            await self._deliver_array(header_env, header, assembler.finish())
        except RemoteProtocolError as exc:
            self.count_rejection(peer, exc)
            return
        except StreamClosed:
            reason = RejectReason.TRUNCATED
            early = RemoteProtocolError("array stream ended early", reason=reason)
            self.count_rejection(peer, early)
            return
        await stream.send(b"")  # the acknowledgement: the stream is authenticated

    # -- services ------------------------------------------------------------------------------

    async def _ping_loop(self) -> None:
        """Ping every connected peer each ``ping_interval_s`` to keep RTTs and liveness fresh."""
        interval = self.config.ping_interval_s
        while True:
            await trio.sleep(interval)
            async with trio.open_nursery() as nursery:
                for peer in self.transport.connected_peers():
                    nursery.start_soon(self._ping_quietly, peer, interval)

    async def _ping_quietly(self, peer: PeerId, within: float) -> None:
        try:
            await self.ping(peer, within=within)
        except MeshfedError as exc:
            log.debug("ping failed", extra={"peer": peer.short(), "error": repr(exc)})

    def audit(self, kind: AuditKind | str, **fields: Any) -> None:
        """Note a security-relevant event for the audit log (:mod:`meshfed.audit`): written
        within ``audit_trail.flush_every_s``; never blocks, never raises."""
        self.audit_trail.note(kind, **fields)

    async def _wait_idle(self) -> None:
        while self._in_flight:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot: identity, addresses, peers, counters."""
        now = trio.current_time()
        return {
            "peer_id": str(self.peer_id),
            "listen": self.listen_addrs,
            "uptime_s": self.uptime_s,
            "peers": [
                {
                    "peer_id": str(p.peer),
                    "rtt_ms": None if p.rtt_s is None else round(p.rtt_s * 1000, 3),
                    "seen_s_ago": round(now - p.last_seen, 3),
                    "failures": p.failures,
                }
                for p in self.links.values()
            ],
            "members": []
            if self.membership is None
            else [
                {
                    "peer_id": str(record.peer),
                    "addrs": list(record.addrs),
                    "roles": record.capabilities.roles,
                    "battery_pct": record.capabilities.battery_pct,
                }
                for record in self.membership.peers()
            ],
            "stats": self.stats.snapshot(),
        }

    async def onion_request(
        self, peer: PeerId, body: Message, *, privacy: str = "high", within: float | None = None
    ) -> Message:
        """Ask ``peer`` without telling it who asks: ``body`` travels at ``privacy`` (``low``,
        ``medium``, ``high``, ``ultra``) and the answer comes back on single-use reply blocks
        (:meth:`meshfed.onion.service.OnionService.request` says more, and what it raises)."""
        if self.onion is None:
            raise ConfigError("onion routing starts with the node (open_node)")
        return await self.onion.request(peer, body, privacy=privacy, within=within)

    def peers(
        self,
        *,
        role: Role | None = None,
        model: str | None = None,
        dataset: str | None = None,
        min_battery_pct: int | None = None,
    ) -> list[PeerRecord]:
        """Live peers matching every condition, answered from the local membership table.

        Raises:
            LocalProtocolError: if the node runs without membership (``membership = false``).
        """
        if self.membership is None:
            raise LocalProtocolError("this node runs without membership (config membership=false)")
        from .membership.records import PeerQuery

        query = PeerQuery(role=role, model=model, dataset=dataset, min_battery_pct=min_battery_pct)
        return self.membership.peers(query)

    # -- the market ----------------------------------------------------------------------------

    def _market(self) -> Market:
        if self.market is None:
            raise LocalProtocolError(
                "this node runs without the market (config market=false, or no store_file or "
                "membership)"
            )
        return self.market

    async def submit_training(
        self,
        job: Mapping[str, Any],
        *,
        budget: float,
        tier: str = "small",
        min_peers: int = 0,
        max_peers: int = 0,
        requirements: Requirements | None = None,
        bid_window_s: float = 10.0,
        verification: Verification | None = None,
    ) -> JobHandle:
        """Buy a training job: post it to the peers whose records match, award it by auction,
        and let the winners train it on their own data; returns the job's handle once the
        requests for quotes are out (``await handle.wait()`` for its end).

        Args:
            job: the job's fields as a job file holds them, without ``roster``.
            budget: the most to pay, in credits, all winners and rounds together.
            tier: ``small``, ``medium``, ``large`` or ``enterprise`` (scoring and defaults).
            min_peers, max_peers: how many winners (0: the tier's range).
            requirements: what a winner must offer (default: the job's data set).
            bid_window_s: how long bids are awaited at most.
            verification: how each round is checked before it is paid (replicas that must
                report the same model, spot checks); default: none.

        Raises:
            ConfigError: a job field or a term is wrong (named), or this install cannot
                train (checking the job builds its model: ``pip install 'meshfed[train]'``).
            NoMatchingPeers, BudgetTooLow, BudgetExceeded: see :mod:`meshfed.errors`.
        """
        from .market.messages import Verification
        from .market.order import TrainingOrder
        from .market.terms import MICRO, Requirements, Tier

        order = TrainingOrder(
            job=job,
            budget=round(budget * MICRO),
            tier=Tier(tier),
            min_peers=min_peers,
            max_peers=max_peers,
            requirements=requirements or Requirements(),
            bid_window_s=bid_window_s,
            verification=verification or Verification(),
        )
        return await self._market().submit_training(order)

    async def pricing_estimate(
        self, kind: str, tier: str, participants: int, rounds: int
    ) -> Estimate:
        """What a job of ``kind`` (``training`` or ``inference``) in ``tier`` with
        ``participants`` peers doing ``rounds`` units each is estimated to cost (micro-credits,
        ``.total``), with its breakdown (``.breakdown``: where the per-unit price came from,
        the tier's discount, units, participants). A budget below it is refused at submit
        (:class:`~meshfed.errors.BudgetTooLow` carries the estimate).

        Raises:
            LocalProtocolError: no market here.
            ValueError: an unknown kind or tier, or counts below 1.
        """
        from .market.terms import Tier, WorkKind

        market = self._market()
        return await market.pricing_estimate(WorkKind(kind), Tier(tier), participants, rounds)

    async def job_status(self, job_id: str) -> JobStatusReport:
        """How ``job_id`` is doing: this node's view if it takes part, else the first roster
        peer's that answers.

        Raises:
            LocalProtocolError: no market here, or no peer knows the job.
        """
        return await self._market().job_status(job_id)


def _republisher(membership: Membership, me: PeerId) -> Callable[[list[DatasetOffer]], None]:
    """A registry listener that re-signs this node's record with the new offers (from the
    registry's caller thread: a worker thread hands the change to the trio loop)."""
    token = trio.lowlevel.current_trio_token()

    def publish(offers: list[DatasetOffer]) -> None:
        own = membership.table.get(me)
        if own is not None:
            membership.update_capabilities(dataclasses.replace(own.capabilities, datasets=offers))

    def listener(offers: list[DatasetOffer]) -> None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # not on the loop
            trio.from_thread.run_sync(publish, offers, trio_token=token)
        else:
            publish(offers)

    return listener


def _offered_roles(configured: Sequence[str]) -> list[str]:
    """The roles a node advertises: ``configured`` without ``trainer`` where training is not
    installed (:mod:`meshfed.training.extra`; said once in the log, as a warning)."""
    from .training.extra import TRAIN_EXTRA, training_missing

    missing = training_missing() if "trainer" in configured else []
    if not missing:
        return list(configured)
    log.warning(
        "training is not installed: not offering the trainer role",
        extra={"missing": missing, "install": TRAIN_EXTRA},
    )
    return [role for role in configured if role != "trainer"]


@asynccontextmanager
async def open_node(
    config: NodeConfig,
    *,
    identity: Identity | None = None,
    network: MemoryNetwork | None = None,
    device: ReadingsSource | None = None,
) -> AsyncIterator[Node]:
    """Start a node, yield it while it serves, and stop it on exit.

    Args:
        config: the node's configuration (``NodeConfig.load`` merges file, env and flags).
        identity: use this identity instead of the one in ``config.data_dir``.
        network: the simulated network to join when ``config.transport == "memory"``.
        device: where the device's readings come from (default: this machine, by psutil;
            a :class:`~meshfed.device.simulator.SimulatedDevice` in simulations).

    Raises:
        ConfigError: the configuration cannot work (memory transport without a network), or
            another node holds ``config.data_dir`` (a node whose identity comes from there
            locks it while it runs).
        IdentityError: the identity file is unsafe or corrupt.
        StoreError: the store (``config.store_path``) cannot be opened.
    """
    owns_data_dir = identity is None  # one node per data directory (meshfed/datadir.py)
    created = identity is None and not (config.data_dir / _KEY_FILE).exists()
    identity = identity or load_or_create_identity(config.data_dir)
    stats = NodeStats()
    transport: Transport
    if config.transport == "memory":
        if network is None:
            raise ConfigError("transport: 'memory' needs open_node(..., network=MemoryNetwork())")
        transport = network.create_transport(
            identity, stats=stats, limits=config.limits, accepts_inbound=not config.client_only
        )
    else:
        from .transports.libp2p import Libp2pTransport  # lazy: importing libp2p is slow

        transport = Libp2pTransport(
            identity,
            stats=stats,
            limits=config.limits,
            listen_addrs=() if config.client_only else config.listen,
        )
    async with trio.open_nursery() as nursery:
        if owns_data_dir:
            await nursery.start(hold_data_dir, config.data_dir)
        node = Node(config, identity, transport, stats)  # handlers exist before we listen
        if created:
            node.audit(AuditKind.IDENTITY_CREATED, peer=str(identity.peer_id))
        await nursery.start(transport.run)
        if config.ping_interval_s > 0:
            nursery.start_soon(node._ping_loop)
        if config.bootstrap:  # dialled now, retried with backoff until reached (SPEC 7a)
            from .membership.bootstrap import Bootstrap

            await nursery.start(Bootstrap(node, config.bootstrap).run)
        if config.store_path is not None:
            key = identity.derive_key(STORE_KEY_PURPOSE)
            node.store = await trio.to_thread.run_sync(
                functools.partial(Store.open, config.store_path, key=key)
            )
            from .data.registry import DATASETS_DIR, DataRegistry

            node.datasets = DataRegistry(node.store, config.data_dir / DATASETS_DIR)
            node.audit_trail.attach(node.store)
            await nursery.start(node.audit_trail.run)
        from .device.service import DeviceService

        roles = _offered_roles(config.roles)
        node.device = DeviceService(node, config.device, device)
        await nursery.start(node.device.run)
        if config.membership:
            from .device.probe import probe_capabilities
            from .membership.service import Membership, MembershipConfig

            offers = None if node.datasets is None else node.datasets.offers()
            readings = node.device.readings
            node.membership = Membership(
                node,
                probe_capabilities(roles=roles, readings=readings, datasets=offers),
                config=MembershipConfig(
                    gossip_interval_s=config.gossip_interval_s, max_view=config.max_view or None
                ),
            )
            await nursery.start(node.membership.run)
            if node.datasets is not None:
                node.datasets.on_change(_republisher(node.membership, node.peer_id))
        from .onion.service import OnionService, OnionSettings

        node.onion = OnionService(node, OnionSettings.from_config(config))
        await nursery.start(node.onion.run)
        if config.mdns and config.transport == "libp2p":
            from .membership.mdns import MdnsDiscovery

            await nursery.start(MdnsDiscovery(node).run)
        if config.market and node.store is not None and node.membership is not None:
            from .market.driver import Market, MarketConfig
            from .market.pricing import DEFAULT_PRICES, AskPolicy
            from .market.terms import MICRO, WorkKind

            sells = {  # training only by a trainer: no ask, no RFQ (and a KIND decline)
                kind: price
                for kind, price in DEFAULT_PRICES.items()
                if kind != WorkKind.TRAINING or "trainer" in roles
            }
            market = MarketConfig(
                capacity=config.market_capacity,
                grant=round(config.market_grant * MICRO),
                asks=AskPolicy(base=sells),
            )
            node.market = Market(node, market)
            node.market.seller_observers.append(seller_auditor(node.audit_trail))
            await nursery.start(node.market.run)
        if config.api != "off" and config.transport == "libp2p":
            from .api.service import serve_api

            node.api_url = await nursery.start(serve_api, node)
        log.info("node started", extra={"peer": str(node.peer_id), "listen": node.listen_addrs})
        try:
            yield node
        finally:
            with trio.move_on_after(config.stop_timeout_s) as grace:
                grace.shield = True
                await node._wait_idle()
            nursery.cancel_scope.cancel(reason="node stopping")
            if node.store is not None:
                with trio.CancelScope(shield=True):
                    await node.audit_trail.flush()
                    await trio.to_thread.run_sync(node.store.close)
            log.info("node stopped", extra={"peer": str(node.peer_id)})
