"""The onion driver: relays packets on the node's transport, serves anonymous requests, and
sends requests at a privacy level (SPEC.md 12, "The driver").

Theory of operation. Every node runs one :class:`OnionService`. It keeps onion keys per epoch
(random, in the store, erased at retirement) and publishes the current and next epoch's public
keys, signed, in its peer record. A packet arrives as a signed :class:`OnionPacket` from the
previous hop; :meth:`Relay.process` says what to do; the replay tag is written to the store
before anything is done with it; then

- ``Forward``: (relays only, within the operator's caps) a task sleeps the hop's delay and
  sends the packet on; a packet whose next hop is this node is processed again;
- ``Deliver``: the body is a fragment; once a request is whole, its handler runs (once per
  request id, whatever the retries) and the answer goes back on the request's SURBs;
- ``DeliverReply``: the SURB book opens it; once the reply is whole, the waiting request
  returns it.

A sender (:meth:`OnionService.request`) picks relays from the membership table
(:mod:`.paths`), builds one SURB per reply packet on a second, independent path back to
itself, fragments the request into packets for the forward path and waits for the answer; a
path that is not answered in time is given up, and the request is sent again on new paths with
the same request id (the destination answers a repeated id from memory, without acting
again). Nothing the destination receives names the sender: the link message is signed by the
last relay, and the request holds the message, the request id and SURBs.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..errors import (
    ConfigError,
    MeshfedError,
    RemoteProtocolError,
    RequestFailed,
    RequestTimeout,
    StoreError,
)
from ..identity import PeerId
from ..membership.records import OnionKey, PeerQuery, PeerRecord, Role
from ..membership.swim import MemberState
from ..ratelimit import TokenBuckets
from ..stats import RejectReason
from ..wire import Envelope, Message
from .epochs import EpochSchedule, KeyRing, onion_key_statement, verify_onion_key
from .events import Deliver, DeliverReply, Drop, Forward
from .fragments import Reassembled, Reassembler, fragment
from .keystore import OnionKeyStore
from .messages import (
    MAX_REPLY_PACKETS,
    REQUEST_ID_SIZE,
    OnionPacket,
    OnionReply,
    OnionRequest,
    decode,
    decode_body,
    encode,
    encode_body,
)
from .packet import MAX_DELAY_MS, PACKET_SIZE, Hop, build_packet
from .paths import NoRelayPath, RelayCandidate, Reliability, address_prefixes, select_path
from .relay import Relay
from .replay import ReplayCache
from .surb import Surb, SurbBook, build_surb, packet_from_surb

if TYPE_CHECKING:
    from ..config import NodeConfig
    from ..node import Node

__all__ = ["OnionHandler", "OnionService", "OnionSettings", "Privacy"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
OnionHandler = Callable[[Any], Awaitable[Message]]
"""``handler(body) -> answer``: serves a request whose sender is unknown."""

_DAY_S = 86_400
_RESEND_AFTER_S = 0.1


class Privacy(enum.StrEnum):
    """How a request travels (SPEC 12, "Privacy levels")."""

    #: straight to the destination, signed by the sender
    LOW = "low"
    #: through one relay each way
    MEDIUM = "medium"
    #: through three relays each way
    HIGH = "high"
    #: three relays each way, random per-hop delays, loop cover traffic
    ULTRA = "ultra"

    @property
    def relays(self) -> int:
        """Relays on each path (forward and reply)."""
        return {Privacy.LOW: 0, Privacy.MEDIUM: 1}.get(self, 3)


@dataclass(frozen=True, kw_only=True)
class OnionSettings:
    """What the driver needs to know (most from :class:`~meshfed.config.NodeConfig`)."""

    schedule: EpochSchedule = field(default_factory=EpochSchedule)
    #: relays packets for others (the node has the relay role)
    relay: bool = False
    relay_packets_per_s: float = 200.0
    relay_bytes_per_day: int = 10 * 1024**3
    #: at most one relay per /24 (/48) on a path
    distinct_prefixes: bool = True
    mean_delay_ms: float = 50.0
    cover_per_s: float = 0.5
    #: packets waiting out their delay or being sent on, at once
    max_forwarding: int = 1024
    #: requests served whose answer is remembered (for a retry with the same request id)
    remember: int = 4096
    remember_s: float = 600.0
    #: how often keys are rotated, retired and published, and old state expired
    maintain_every_s: float = 30.0
    #: replay tags written between two checkpoints of the store's WAL (in a worker thread)
    checkpoint_every_tags: int = 1000

    @classmethod
    def from_config(cls, config: NodeConfig) -> OnionSettings:
        """The settings of a node configured by ``config``."""
        return cls(
            relay=Role.RELAY.value in config.roles,
            relay_packets_per_s=config.relay_packets_per_s,
            relay_bytes_per_day=config.relay_bytes_per_day,
            distinct_prefixes=config.onion_distinct_prefixes,
            mean_delay_ms=config.onion_mean_delay_ms,
            cover_per_s=config.onion_cover_per_s,
        )


@dataclass(slots=True)
class _Waiting:
    """A request of ours awaiting its reply."""

    surb_ids: set[bytes] = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)
    reply: OnionReply | None = None


@dataclass(slots=True)
class _Served:
    """A request this node served (or is serving): its encoded reply once known, and the SURBs
    of retries that arrived meanwhile."""

    at: float
    reply: bytes | None = None
    waiting: list[Surb] = field(default_factory=list)


class OnionService:
    """A node's onion routing: relay, destination and sender (see the module docstring).

    Args:
        node: the node whose transport, membership and store it uses.
        settings: keys, caps, delays.
    """

    def __init__(self, node: Node, settings: OnionSettings) -> None:
        self.node = node
        self.settings = settings
        #: the wall clock epochs and expiries are read from (a test may move it)
        self.clock: Callable[[], float] = time.time
        self.schedule = settings.schedule
        self.ring = KeyRing(self.schedule)
        self.replay = ReplayCache()
        self.relay = Relay(self.ring, self.replay)
        self.surbs = SurbBook()
        self.reliability = Reliability()
        #: callbacks told of each attempt: ``(forward relays, reply relays)``, in path order
        self.path_observers: list[Callable[[list[PeerId], list[PeerId]], None]] = []
        self._keystore = None if node.store is None else OnionKeyStore(node.store)
        self._inbox = Reassembler()
        self._replies = Reassembler()
        self._handlers: dict[type[Message], OnionHandler] = {}
        self._waiting: dict[bytes, _Waiting] = {}
        self._surb_request: dict[bytes, bytes] = {}
        self._served: OrderedDict[bytes, _Served] = OrderedDict()
        self._loops: dict[bytes, tuple[float, list[PeerId]]] = {}
        self._verified: dict[tuple[PeerId, int, bytes, bytes], bool] = {}
        self._rate = TokenBuckets[str](
            rate=settings.relay_packets_per_s, burst=max(1.0, settings.relay_packets_per_s)
        )
        self._day = -1
        self._day_bytes = 0
        self._forwarding = 0
        self._rng = random.SystemRandom()
        self._nursery: trio.Nursery | None = None
        self._covering = False
        self._tags_since_checkpoint = 0
        node.handle(OnionPacket, self._on_packet)

    # -- running ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Restore keys and replay tags from the store, make the keys still missing, publish
        them, and serve until cancelled."""
        if self._keystore is not None:
            await trio.to_thread.run_sync(self._keystore.open)
        try:
            await self._restore()
            await self.maintain()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._maintain_loop)
                task_status.started()
        finally:
            if self._keystore is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._keystore.close)

    async def _restore(self) -> None:
        if self._keystore is None:
            return
        now = self.clock()
        secrets = await trio.to_thread.run_sync(self._keystore.secrets)
        retired = [e for e in secrets if now >= self.schedule.retires_at(e)]
        for epoch, secret in secrets.items():
            if epoch not in retired:
                self.ring.install(epoch, secret)
        tags = await trio.to_thread.run_sync(self._keystore.tags)
        for epoch, epoch_tags in tags.items():
            if epoch in self.ring.epochs:
                self.replay.restore(epoch, epoch_tags)
            else:
                retired.append(epoch)
        await trio.to_thread.run_sync(self._keystore.retire, sorted(set(retired)))

    async def _maintain_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.maintain_every_s)
            await self.maintain()

    async def maintain(self) -> None:
        """Make the keys wanted now, retire old epochs (their keys and tags erased from the
        store), publish the keys, expire old state. Runs every ``maintain_every_s``."""
        now = self.clock()
        wanted = self.ring.wanted(now)
        for epoch in wanted:
            secret = os.urandom(32)
            if self._keystore is not None:  # stored before use: a restart keeps the key
                await trio.to_thread.run_sync(self._keystore.add_secret, epoch, secret)
            self.ring.install(epoch, secret)
        gone = self.relay.retire(now)
        if gone and self._keystore is not None:
            await trio.to_thread.run_sync(self._keystore.retire, gone)
        if wanted or gone:
            self.publish()
        self.surbs.expire(now)
        self._inbox.expire(now)
        self._replies.expire(now)
        for request_id, served in list(self._served.items()):
            if now - served.at < self.settings.remember_s:
                break
            del self._served[request_id]
        for loop_id, (sent, relays) in list(self._loops.items()):
            if now >= self.schedule.retires_at(self.schedule.epoch_at(sent)):
                del self._loops[loop_id]
                self.reliability.record(relays, answered=False)
        self._verified.clear()

    def own_keys(self) -> list[OnionKey]:
        """This node's signed onion keys of the current and later epochs (for its record)."""
        current = self.schedule.epoch_at(self.clock())
        identity = self.node.identity
        keys = []
        for epoch in self.ring.epochs:
            if epoch >= current:
                public = self.ring.public_key(epoch)
                statement = onion_key_statement(identity.peer_id, epoch, public)
                keys.append(OnionKey(epoch, public, identity.sign(statement)))
        return keys[:2]

    def publish(self) -> None:
        """Put this node's onion keys in its signed record (gossip spreads it)."""
        membership = self.node.membership
        if membership is None:
            return
        own = membership.table.get(self.node.peer_id)
        if own is not None:
            capabilities = dataclasses.replace(own.capabilities, onion_keys=self.own_keys())
            membership.update_capabilities(capabilities)

    # -- destination handlers --------------------------------------------------------------------

    def handle(
        self, message_type: type[M], handler: Callable[[M], Awaitable[Message]], *, direct: bool
    ) -> None:
        """Answer onion requests whose body is a ``message_type`` with ``handler`` (which
        never learns who asked). With ``direct``, also answer ``privacy="low"`` requests of
        that type (registers a node handler for it)."""
        self._handlers[message_type] = handler
        if direct:

            async def serve(envelope: Envelope, body: M) -> Message:
                return await handler(body)

            self.node.handle(message_type, serve)

    # -- packets in ------------------------------------------------------------------------------

    async def _on_packet(self, envelope: Envelope, body: OnionPacket) -> None:
        await self._accept(body.packet)

    async def _accept(self, packet: bytes) -> None:
        now = self.clock()
        action = self.relay.process(packet, now)
        if isinstance(action, Drop):
            self._drop(action.reason.value, action.reason.counted_as)
            return
        forward_elsewhere = isinstance(action, Forward) and action.next_hop != self.node.peer_id
        if forward_elsewhere and not self._may_relay(now):
            return
        if self._keystore is not None and not await self._store_tag(
            action.epoch, action.replay_tag
        ):
            return
        if isinstance(action, Forward):
            self._forward(action)
        elif isinstance(action, Deliver):
            self._delivered(action, now)
        else:
            self._reply_delivered(action, now)

    async def _store_tag(self, epoch: int, tag: bytes) -> bool:
        """Write-ahead: the tag is kept (through ``kill -9``) before the packet is acted on, so
        a restarted node still drops the replay. On the loop when the file is free (no fsync:
        tens of microseconds), else in a worker thread; False (the packet dropped) if the
        store failed."""
        assert self._keystore is not None
        tags = [(epoch, tag)]
        try:
            if not self._keystore.add_tags(tags, block=False):
                await trio.to_thread.run_sync(self._keystore.add_tags, tags)
        except StoreError:
            log.exception("onion replay tag not stored; packet dropped")
            self._drop("store_failed", RejectReason.OVERLOADED)
            return False
        self._tags_since_checkpoint += 1
        if self._tags_since_checkpoint >= self.settings.checkpoint_every_tags:
            self._tags_since_checkpoint = 0
            assert self._nursery is not None
            self._nursery.start_soon(self._checkpoint)
        return True

    async def _checkpoint(self) -> None:
        assert self._keystore is not None
        try:
            await trio.to_thread.run_sync(self._keystore.checkpoint)
        except StoreError:
            log.exception("onion replay tags not checkpointed (the WAL grows until next time)")

    def _drop(self, reason: str, counted_as: RejectReason) -> None:
        self.node.stats.onion[f"drop.{reason}"] += 1
        self.node.stats.reject(counted_as)

    def _may_relay(self, now: float) -> bool:
        if not self.settings.relay:
            self._drop("not_a_relay", RejectReason.BAD_FIELD)
            return False
        day = int(now // _DAY_S)
        if day != self._day:
            self._day, self._day_bytes = day, 0
        over_bytes = self._day_bytes + PACKET_SIZE > self.settings.relay_bytes_per_day
        if over_bytes or not self._rate.take("relay", trio.current_time()):
            self._drop("relay_cap", RejectReason.OVERLOADED)
            return False
        if self._forwarding >= self.settings.max_forwarding:
            self._drop("busy", RejectReason.OVERLOADED)
            return False
        self._day_bytes += PACKET_SIZE
        return True

    def _forward(self, action: Forward) -> None:
        assert self._nursery is not None, "packets arrive only while the service runs"
        self._forwarding += 1
        self._nursery.start_soon(self._forward_later, action)

    async def _forward_later(self, action: Forward) -> None:
        try:
            if action.delay > 0:  # a zero sleep would only cost the loop a turn
                await trio.sleep(action.delay)
            if action.next_hop == self.node.peer_id:  # a path may pass through us twice
                await self._accept(action.packet)
                return
            self.node.stats.onion["relayed"] += 1
            self.node.stats.onion["relayed_bytes"] += PACKET_SIZE
            await self._send(action.next_hop, action.packet, "forward_failed")
        finally:
            self._forwarding -= 1

    async def _send(self, peer: PeerId, packet: bytes, failure: str) -> bool:
        """Hand ``packet`` to ``peer``, trying twice (a second copy that arrives is dropped
        there as a replay, so a retry never duplicates)."""
        for retry in (False, True):
            try:
                await self._reach(peer)
                await self.node.send(peer, OnionPacket(packet))
                return True
            except MeshfedError as exc:
                log.debug("onion packet not sent", extra={"why": str(exc), "retry": retry})
                await trio.sleep(_RESEND_AFTER_S)
        self.node.stats.onion[failure] += 1
        return False

    async def _reach(self, peer: PeerId) -> None:
        """Dial ``peer`` at the addresses of its record unless connected already."""
        membership = self.node.membership
        if membership is None or peer in self.node.transport.connected_peers():
            return
        record = membership.table.get(peer)
        for addr in [] if record is None else record.addrs:
            try:
                await self.node.connect(addr)
                return
            except MeshfedError:
                continue

    def _delivered(self, action: Deliver, now: float) -> None:
        self.node.stats.onion["delivered"] += 1
        whole = self._inbox.add(action.body, now)
        if isinstance(whole, Drop):
            self._drop(whole.reason.value, whole.reason.counted_as)
        elif isinstance(whole, Reassembled):
            loop = self._loops.pop(whole.message_id, None)
            if loop is not None:
                self.node.stats.onion["cover_returned"] += 1
                self.reliability.record(loop[1], answered=True)
                return
            assert self._nursery is not None
            self._nursery.start_soon(self._serve, whole.message)

    def _reply_delivered(self, action: DeliverReply, now: float) -> None:
        opened = self.surbs.open(action.surb_id, action.payload, now)
        if isinstance(opened, Drop):
            self._drop(opened.reason.value, opened.reason.counted_as)
            return
        request_id = self._surb_request.pop(action.surb_id, None)
        whole = self._replies.add(opened.body, now)
        if isinstance(whole, Drop):
            self._drop(whole.reason.value, whole.reason.counted_as)
            return
        if whole is None or request_id is None:
            return
        try:
            reply = decode(OnionReply, whole.message)
        except RemoteProtocolError as exc:
            self._drop("bad_reply", exc.reason)
            return
        waiting = self._waiting.get(request_id)
        if reply.request_id != request_id or waiting is None or waiting.done.is_set():
            self._drop("unexpected_reply", RejectReason.DUPLICATE)
            return
        self.node.stats.onion["replies"] += 1
        waiting.reply = reply
        waiting.done.set()

    # -- serving requests ------------------------------------------------------------------------

    async def _serve(self, message: bytes) -> None:
        try:
            request = decode(OnionRequest, message)
            surbs = [Surb.from_bytes(surb) for surb in request.surbs]
        except RemoteProtocolError as exc:
            self._drop("bad_request", exc.reason)
            return
        served = self._served.get(request.request_id)
        if served is not None:  # a retry: answer from memory, never act twice
            self.node.stats.onion["requests_repeated"] += 1
            if served.reply is None:  # the newest SURBs, as many as one request may carry
                served.waiting = [*served.waiting, *surbs][-MAX_REPLY_PACKETS:]
            else:
                await self._answer(served.reply, surbs)
            return
        served = self._served[request.request_id] = _Served(self.clock())
        while len(self._served) > self.settings.remember:
            self._served.popitem(last=False)
        self.node.stats.onion["requests_served"] += 1
        reply = encode(await self._run_handler(request))
        served.reply = reply
        await self._answer(reply, surbs + served.waiting)
        served.waiting.clear()

    async def _run_handler(self, request: OnionRequest) -> OnionReply:
        try:
            body = decode_body(request.type, request.body)
            handler = self._handlers.get(type(body))
            if handler is None:
                raise RemoteProtocolError(
                    f"no onion handler for {request.type}", reason=RejectReason.UNKNOWN_TYPE
                )
            answer = await handler(body)
        except RemoteProtocolError as exc:
            return OnionReply(request.request_id, error=str(exc.reason), detail=str(exc)[:256])
        except Exception as exc:  # a handler's bug must not stop the node; the sender is told
            log.exception("onion request handler failed")
            return OnionReply(request.request_id, error="failed", detail=type(exc).__name__)
        return OnionReply(request.request_id, answer.TYPE, encode_body(answer))

    async def _answer(self, reply: bytes, surbs: list[Surb]) -> None:
        """Send ``reply`` on ``surbs``: one fragment a SURB (each SURB used once); a reply that
        needs more packets than the request brought SURBs is replaced by an error."""
        bodies = fragment(reply, os.urandom(16))
        if len(bodies) > len(surbs):
            request_id = decode(OnionReply, reply).request_id
            error = OnionReply(request_id, error="reply_too_large", detail=f"{len(bodies)} packets")
            bodies = fragment(encode(error), os.urandom(16))
        for body, surb in zip(bodies, surbs, strict=False):
            out = packet_from_surb(surb, body)
            await self._send(out.first_hop, out.packet, "reply_failed")

    # -- sending requests ------------------------------------------------------------------------

    async def request(
        self,
        peer: PeerId,
        message: Message,
        *,
        privacy: Privacy | str = Privacy.HIGH,
        within: float | None = None,
        attempts: int = 3,
        reply_packets: int = 1,
    ) -> Message:
        """Send ``message`` to ``peer`` at ``privacy`` and return its answer.

        ``low`` is a plain signed request (:meth:`Node.request`). The other levels go through
        relays; each attempt waits ``within`` seconds (default ``config.request_timeout_s``)
        for the answer, then tries new paths, ``attempts`` times in all, under one request id
        (the destination acts once). The answer may fill ``reply_packets`` packets (2,010
        bytes each).

        Raises:
            RequestTimeout: no attempt was answered.
            RequestFailed: the destination answered with an error (``.reason``).
            NoRelayPath: too few relays with onion keys (or the destination has none).
            ConfigError: ``privacy`` is not a level, or ``reply_packets`` out of range.
        """
        try:
            level = Privacy(privacy)
        except ValueError:
            raise ConfigError(
                f"privacy: {privacy!r} is not one of low, medium, high, ultra"
            ) from None
        if not 1 <= reply_packets <= MAX_REPLY_PACKETS:
            raise ConfigError(f"reply_packets: 1..{MAX_REPLY_PACKETS}, got {reply_packets}")
        timeout = self.node.config.request_timeout_s if within is None else within
        if level is Privacy.LOW:
            await self._reach(peer)
            return (await self.node.request(peer, message, within=timeout)).body
        if level is Privacy.ULTRA:
            self._start_cover()
        request_id = os.urandom(REQUEST_ID_SIZE)
        waiting = self._waiting[request_id] = _Waiting()
        avoid: set[PeerId] = set()
        try:
            for _ in range(attempts):
                relays, sent = await self._attempt(
                    peer, message, level, request_id, reply_packets, avoid
                )
                if sent:
                    with trio.move_on_after(timeout):
                        await waiting.done.wait()
                self.reliability.record(relays, answered=waiting.reply is not None)
                if waiting.reply is not None:
                    return _answer_of(waiting.reply)
                avoid |= set(relays)
            raise RequestTimeout(
                f"no answer from {peer.short()} on {attempts} onion paths, {timeout:g} s each"
            )
        finally:
            del self._waiting[request_id]
            for surb_id in waiting.surb_ids:
                self._surb_request.pop(surb_id, None)

    async def _attempt(
        self,
        peer: PeerId,
        message: Message,
        level: Privacy,
        request_id: bytes,
        reply_packets: int,
        avoid: set[PeerId] | None = None,
    ) -> tuple[list[PeerId], bool]:
        """Build fresh paths and send the request once; returns the relays used and whether
        the first hop took every packet."""
        now = self.clock()
        epoch = self.schedule.epoch_at(now)
        destination = self._onion_key(peer, epoch)
        if destination is None:
            raise NoRelayPath(f"{peer.short()} publishes no valid onion key for epoch {epoch}")
        candidates = self._candidates(epoch)
        exclude = {self.node.peer_id, peer}
        forward = self._pick(candidates, level, exclude, avoid)
        own = Hop(self.node.peer_id, self.ring.public_key(epoch))
        surbs, used = [], [c.peer for c in forward]
        waiting = self._waiting[request_id]
        for _ in range(reply_packets):
            back = self._pick(candidates, level, exclude, avoid)
            used += [c.peer for c in back]
            surb, secrets = build_surb(
                [*self._hops(back, level), own], epoch=epoch, random_bytes=os.urandom
            )
            self.surbs.add(secrets, expires_at=self.schedule.retires_at(epoch))
            waiting.surb_ids.add(secrets.surb_id)
            self._surb_request[secrets.surb_id] = request_id
            surbs.append(surb.to_bytes())
            for observer in self.path_observers:
                observer([c.peer for c in forward], [c.peer for c in back])
        request = OnionRequest(request_id, surbs, message.TYPE, encode_body(message))
        path = [*self._hops(forward, level), Hop(peer, destination)]
        for body in fragment(encode(request), os.urandom(16)):
            out = build_packet(path, body, epoch=epoch, random_bytes=os.urandom)
            if not await self._send(out.first_hop, out.packet, "send_failed"):
                return used, False
        return used, True

    def _pick(
        self,
        candidates: list[RelayCandidate],
        level: Privacy,
        exclude: set[PeerId],
        avoid: set[PeerId] | None,
    ) -> list[RelayCandidate]:
        return select_path(
            candidates,
            level.relays,
            exclude=exclude,
            avoid=avoid or (),
            weight=self.reliability.weight,
            rng=self._rng,
        )

    def _hops(self, relays: list[RelayCandidate], level: Privacy) -> list[Hop]:
        return [Hop(c.peer, c.onion_key, self._delay_ms(level)) for c in relays]

    def _delay_ms(self, level: Privacy) -> int:
        mean = self.settings.mean_delay_ms
        if level is not Privacy.ULTRA or mean <= 0:
            return 0
        return min(MAX_DELAY_MS, round(self._rng.expovariate(1 / mean)))

    def _candidates(self, epoch: int) -> list[RelayCandidate]:
        membership = self.node.membership
        if membership is None:
            return []
        found = []
        for record in membership.peers(PeerQuery(role=Role.RELAY)):
            if membership.swim.state(record.peer) is not MemberState.ALIVE:
                continue  # a suspect relay may be down: a path through it would be lost
            key = self._record_key(record, epoch)
            if key is not None:
                prefixes = (
                    address_prefixes(record.addrs)
                    if self.settings.distinct_prefixes
                    else frozenset()
                )
                found.append(RelayCandidate(record.peer, key, prefixes))
        return found

    def _onion_key(self, peer: PeerId, epoch: int) -> bytes | None:
        membership = self.node.membership
        record = None if membership is None else membership.table.get(peer)
        return None if record is None else self._record_key(record, epoch)

    def _record_key(self, record: PeerRecord, epoch: int) -> bytes | None:
        """``record``'s onion key of ``epoch`` if its signature verifies (results cached)."""
        for key in record.capabilities.onion_keys:
            if key.epoch == epoch:
                cache_key = (record.peer, epoch, key.public_key, key.signature)
                ok = self._verified.get(cache_key)
                if ok is None:
                    ok = verify_onion_key(record.peer, epoch, key.public_key, key.signature)
                    self._verified[cache_key] = ok
                return key.public_key if ok else None
        return None

    # -- cover traffic ---------------------------------------------------------------------------

    def _start_cover(self) -> None:
        if self._covering or self.settings.cover_per_s <= 0 or self._nursery is None:
            return
        self._covering = True
        self._nursery.start_soon(self._cover_loop)

    async def _cover_loop(self) -> None:
        """Loop packets (through three relays back to this node) as a Poisson process; each
        one that returns also tells path selection its relays work."""
        while True:
            await trio.sleep(self._rng.expovariate(self.settings.cover_per_s))
            now = self.clock()
            epoch = self.schedule.epoch_at(now)
            try:
                relays = self._pick(
                    self._candidates(epoch), Privacy.ULTRA, {self.node.peer_id}, None
                )
            except MeshfedError:
                continue
            loop_id = os.urandom(16)
            own = Hop(self.node.peer_id, self.ring.public_key(epoch))
            path = [*self._hops(relays, Privacy.ULTRA), own]
            (body,) = fragment(b"", loop_id)
            out = build_packet(path, body, epoch=epoch, random_bytes=os.urandom)
            self._loops[loop_id] = (now, [c.peer for c in relays])
            self.node.stats.onion["cover_packets"] += 1
            self.node.stats.onion["cover_bytes"] += PACKET_SIZE * len(path)
            await self._send(out.first_hop, out.packet, "send_failed")


def _answer_of(reply: OnionReply) -> Message:
    if reply.error:
        raise RequestFailed(reply.detail or reply.error, reason=reply.error)
    return decode_body(reply.type, reply.body)
