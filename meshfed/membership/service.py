"""The membership service: gossip of signed records and SWIM failure detection on a node.

A thin trio driver (SPEC.md, "Membership") over three sans-IO parts: the
:class:`~meshfed.membership.records.PeerTable`, :class:`~meshfed.membership.gossip.AntiEntropy`
and :class:`~meshfed.membership.swim.Swim`. It signs and refreshes this node's own record,
gossips every ``gossip_interval_s`` with ``fanout`` random live members, probes members as SWIM
says, and answers queries like ``membership.peers(PeerQuery(role=Role.TRAINER))`` from memory.

Start it in the node's nursery: ``await nursery.start(Membership(node, capabilities).run)``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..codec import bounded
from ..control import Ack
from ..errors import MeshfedError, RemoteProtocolError
from ..identity import PeerId
from ..node import MessageHandler, Node
from ..ratelimit import TokenBuckets
from ..stats import RejectReason
from ..wire import Envelope, Message, message
from .cyclon import Cyclon, Shuffle, ShuffleReply
from .gossip import MAX_DELTA, AntiEntropy, Delta, Digest
from .records import (
    Capabilities,
    PeerQuery,
    PeerRecord,
    PeerTable,
    Role,
    SignedPeerRecord,
    sign_record,
    signed_subject,
)
from .swim import (
    Action,
    IndirectProbe,
    MemberDead,
    MemberState,
    Probe,
    Swim,
    SwimConfig,
    Update,
    UpdateRejected,
)

__all__ = ["Membership", "MembershipConfig", "SwimAck", "SwimPing", "SwimPingReq"]

log = logging.getLogger(__name__)

#: addresses a ping request may carry for its target (a helper dials the first one)
MAX_PING_REQ_ADDRS = 4
#: updates one SWIM message carries at most
MAX_UPDATES = 64
#: dead members one source's records may make us recheck at once (then one per SWIM period)
RECHECK_BURST = 4


@message("meshfed.swim.ping")
@dataclass(frozen=True, slots=True)
class SwimPing(Message):
    """A direct probe, carrying membership updates."""

    updates: list[Update] = bounded(max_len=MAX_UPDATES)


@message("meshfed.swim.ping_req")
@dataclass(frozen=True, slots=True)
class SwimPingReq(Message):
    """Probe ``target`` for me within ``timeout_ms`` and tell me whether it answered.
    ``addrs`` are where the target's record says it listens (a helper may not know it)."""

    target: PeerId
    timeout_ms: int = bounded(ge=1, le=60_000)
    updates: list[Update] = bounded(max_len=MAX_UPDATES)
    addrs: list[str] = bounded(max_len=MAX_PING_REQ_ADDRS, default_factory=list)


@message("meshfed.swim.ack")
@dataclass(frozen=True, slots=True)
class SwimAck(Message):
    """The answer to a probe: ``ok`` is false when an indirect probe got no answer."""

    ok: bool
    updates: list[Update] = bounded(max_len=MAX_UPDATES)


@dataclass(frozen=True, kw_only=True)
class MembershipConfig:
    """Timers of gossip and record refresh; SWIM's are in ``swim``.

    ``max_view=None`` keeps a full view, spread by push-pull anti-entropy; a number keeps a
    Cyclon partial view of that many peers, so state and traffic do not grow with the mesh.
    """

    gossip_interval_s: float = 1.0
    fanout: int = 2
    record_ttl_s: float = 600.0
    max_view: int | None = None
    swim: SwimConfig = field(default_factory=SwimConfig)

    def __post_init__(self) -> None:
        if self.gossip_interval_s <= 0 or self.fanout < 1 or self.record_ttl_s <= 0:
            raise ValueError("gossip_interval_s and record_ttl_s must be > 0, fanout >= 1")
        if self.max_view is not None and self.max_view < 2:
            raise ValueError("max_view must be at least 2 peers (or None for a full view)")


#: lifetime of a client-only peer's record: it cannot be probed, so a stale record means gone
CLIENT_RECORD_TTL_S = 60.0


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _serving(handler: MessageHandler) -> MessageHandler:
    """``handler``, with any error but our own turned into a counted rejection of the input
    (logged with its traceback: it is a bug), so that no message stops the node."""

    async def serve(envelope: Envelope, body: Any) -> Message | None:
        try:
            return await handler(envelope, body)
        except MeshfedError:
            raise
        except Exception as exc:
            log.exception("membership handler failed", extra={"type": body.TYPE})
            raise RemoteProtocolError(
                f"{body.TYPE} could not be handled: {exc!r}", reason=RejectReason.MALFORMED
            ) from exc

    return serve


class Membership:
    """Who is out there and what they can do. See the module docstring.

    Args:
        node: the node to run on.
        capabilities: what this node offers (announced in its signed record).
        config: timers.
        rng: the service's randomness (gossip targets, probe order); seeded in tests.
    """

    def __init__(
        self,
        node: Node,
        capabilities: Capabilities,
        *,
        config: MembershipConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.config = config or MembershipConfig()
        self._rng = rng or random.Random()
        view = self.config.max_view
        self.table = PeerTable(
            max_size=None if view is None else view + 1, rng=self._rng, pinned=node.peer_id
        )
        self.cyclon = (
            None
            if view is None
            else Cyclon(node.peer_id, self.table, length=max(3, min(view // 4, 16)), rng=self._rng)
        )
        # An exchange ships at most a quarter of a view (and at least 8 records).
        per_exchange = MAX_DELTA if view is None else min(MAX_DELTA, max(8, view // 4))
        self._gossip = AntiEntropy(self.table, self._rng, max_records=per_exchange)
        # Newcomers one source may introduce: a delta's worth per interval, twice that in a burst.
        self._newcomers: TokenBuckets[PeerId] = TokenBuckets(
            per_exchange / self.config.gossip_interval_s, 2 * per_exchange
        )
        # Signatures one source may make us check (a record costs 2, a SWIM update 1): twice
        # what an honest partner needs at most (a full delta per gossip interval and a full
        # ping per SWIM period), so a flood of validly signed news costs bounded CPU.
        checks = 2 * (2 * per_exchange / self.config.gossip_interval_s)
        checks += 2 * MAX_UPDATES / self.config.swim.period_s
        self._checks: TokenBuckets[PeerId] = TokenBuckets(checks, 2 * checks)
        # Dead members one source's records may make us ping again (each a dial, perhaps to
        # an address the source chose): one per SWIM period, a few at once.
        self._rechecks: TokenBuckets[PeerId] = TokenBuckets(
            1 / self.config.swim.period_s, RECHECK_BURST
        )
        started = _wall_ms()
        self._seq = started
        self.swim = Swim(node.identity, self.config.swim, self._rng, incarnation=started)
        self._capabilities = capabilities
        self._refresh_at_ms = 0
        self._own_addrs: list[str] = []
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        node.handle(Digest, _serving(self._on_digest))
        node.handle(Delta, _serving(self._on_delta))
        node.handle(Shuffle, _serving(self._on_shuffle))
        node.handle(SwimPing, _serving(self._on_ping))
        node.handle(SwimPingReq, _serving(self._on_ping_req))

    # -- queries -------------------------------------------------------------------------------

    def peers(self, query: PeerQuery | None = None) -> list[PeerRecord]:
        """Live peers (not us) matching ``query``, from the local table: no network."""
        return [
            record
            for record in self.table.peers(query)
            if record.peer != self.node.peer_id
            and (
                record.has_role(Role.CLIENT_ONLY)  # alive while its short-lived record is fresh
                or self.swim.state(record.peer) in (MemberState.ALIVE, MemberState.SUSPECT)
            )
        ]

    def introduce(self, peer: PeerId) -> None:
        """A peer we just connected to (bootstrap, mDNS, the app): gossip and probe it too.
        One we had declared dead is pinged at once, told of its death, and asked for its
        current record: it may have been cut off or restarted, not dead, and comes back with
        a signed incarnation above the one it died at."""
        if peer == self.node.peer_id:
            return
        if self.swim.state(peer) == MemberState.DEAD and self._nursery is not None:
            self._nursery.start_soon(self._guarded, self._exchange, peer)
            self._act_all(self.swim.recheck(peer, trio.current_time()))
        self.swim.add(peer)
        self._wake.set()

    def update_capabilities(self, capabilities: Capabilities) -> None:
        """Announce new capabilities (battery, prices ...): a newer record spreads by gossip."""
        self._capabilities = capabilities
        self._sign_own()

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Gossip and probe until cancelled."""
        self._sign_own()
        for peer in self.node.transport.connected_peers():
            self.introduce(peer)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._gossip_loop)
            nursery.start_soon(self._swim_loop)
            task_status.started()

    def _sign_own(self) -> None:
        now_ms = _wall_ms()
        ttl_s = self.config.record_ttl_s
        if Role.CLIENT_ONLY.value in self._capabilities.roles:
            ttl_s = min(ttl_s, CLIENT_RECORD_TTL_S)  # nobody can probe us: freshness is liveness
        ttl_ms = int(ttl_s * 1000)
        self._seq = max(self._seq + 1, now_ms)
        self._own_addrs = self.node.listen_addrs
        own = sign_record(
            self.node.identity,
            seq=self._seq,
            expires_ms=now_ms + ttl_ms,
            addrs=self._own_addrs,
            capabilities=self._capabilities,
        )
        self.table.apply(own, now_ms=now_ms)
        self._refresh_at_ms = now_ms + ttl_ms // 2  # re-sign at half-life

    async def _gossip_loop(self) -> None:
        while True:
            if _wall_ms() >= self._refresh_at_ms or self.node.listen_addrs != self._own_addrs:
                self._sign_own()  # half-life, or an interface came or went
            self.table.expire(now_ms=_wall_ms())
            if self.cyclon is not None:
                if len(self.cyclon.view()) < self.cyclon.length and (targets := self._live()):
                    # joining (or left with too few entries): fill up by one anti-entropy
                    # exchange with a peer we can reach, then shuffle as usual
                    await self._guarded(self._exchange, self._rng.choice(targets))
                    self._sync_swim()
                await self._guarded(self._shuffle, self.cyclon)
            else:
                targets = self._live()
                async with trio.open_nursery() as nursery:
                    for peer in self._rng.sample(targets, min(self.config.fanout, len(targets))):
                        nursery.start_soon(self._guarded, self._exchange, peer)
            await trio.sleep(self.config.gossip_interval_s * (0.5 + self._rng.random()))

    def _live(self) -> list[PeerId]:
        connected = set(self.node.transport.connected_peers())
        members = {
            r.peer
            for r in self.table.records()
            if not r.has_role(Role.CLIENT_ONLY) or r.peer in connected
        } | set(self.swim.live_members())
        members.discard(self.node.peer_id)
        return sorted(
            (p for p in members if self.swim.state(p) != MemberState.DEAD), key=lambda p: p.raw
        )

    async def _reach(self, peer: PeerId) -> None:
        """Make sure the transport can talk to ``peer`` (dial a recorded address if needed)."""
        if peer in self.node.transport.connected_peers():
            return
        record = self.table.get(peer)
        if record is None or not record.addrs:
            return  # bootstrap peers are connected already; others without addresses wait
        await self.node.connect(record.addrs[0])

    async def _exchange(self, peer: PeerId) -> None:
        try:
            with trio.fail_after(self.config.gossip_interval_s * 2):
                await self._reach(peer)
                answer = await self.node.request(peer, self._gossip.digest())
                if not isinstance(answer.body, Delta):
                    raise RemoteProtocolError(
                        "a digest is answered by a delta", reason=RejectReason.BAD_FIELD
                    )
                self._take(answer.body, peer)
                if answer.body.wants:
                    await self.node.request(peer, self._gossip.push(answer.body.wants))
        except (MeshfedError, trio.TooSlowError) as exc:
            log.debug("gossip exchange failed", extra={"peer": peer.short(), "error": repr(exc)})

    def _take(self, delta: Delta, source: PeerId) -> None:
        if not self._affordable(source, 2 * len(delta.records)):
            return
        delta = Delta(records=self._limit_newcomers(delta.records, source), wants=delta.wants)
        changed, rejected, evicted = self._gossip.apply(delta, _wall_ms())
        for peer in evicted:
            self.swim.forget(peer)
        self._count(rejected, source)
        for record in changed:
            if record.peer == self.node.peer_id:
                continue
            if record.has_role(Role.CLIENT_ONLY):
                self.swim.forget(record.peer)  # cannot be probed; its record's expiry decides
                continue
            if self.swim.state(record.peer) == MemberState.DEAD:
                if self._rechecks.take(source, trio.current_time()):
                    self._act_all(self.swim.recheck(record.peer, trio.current_time()))
                else:
                    self.node.stats.reject(RejectReason.RATE_LIMITED)
            else:
                self.swim.add(record.peer)
        if changed:
            self._wake.set()

    async def _shuffle(self, cyclon: Cyclon) -> None:
        own = self.table.signed(self.node.peer_id)
        assert own is not None
        started = cyclon.start(own)
        if started is None:
            return
        record, shuffle, sent = started
        partner = record.peer
        try:
            with trio.fail_after(self.config.gossip_interval_s * 2):
                if partner not in self.node.transport.connected_peers() and record.addrs:
                    await self.node.connect(record.addrs[0])
                answer = await self.node.request(partner, shuffle)
            if not isinstance(answer.body, ShuffleReply):
                raise RemoteProtocolError(
                    "a shuffle is answered by a shuffle reply", reason=RejectReason.BAD_FIELD
                )
            records = self._limit_newcomers(answer.body.records, partner)
            self._count(cyclon.merge(records, sent, _wall_ms(), partner), partner)
        except (MeshfedError, trio.TooSlowError) as exc:
            log.debug("shuffle failed", extra={"peer": partner.short(), "error": repr(exc)})
        self._sync_swim()

    async def _on_shuffle(self, envelope: Envelope, shuffle: Shuffle) -> ShuffleReply:
        cyclon, sender = self.cyclon, envelope.sender
        if cyclon is None:  # a full view takes no shuffles
            raise RemoteProtocolError(
                "this node keeps a full view", reason=RejectReason.UNKNOWN_TYPE
            )
        records = shuffle.records if self._affordable(sender, 2 * len(shuffle.records)) else []
        shuffle = Shuffle(records=self._limit_newcomers(records, sender))
        reply, rejected = cyclon.answer(shuffle, sender, _wall_ms())
        self._count(rejected, envelope.sender)
        self._sync_swim()
        return reply

    def _count(self, rejected: list[RemoteProtocolError], source: PeerId | None) -> None:
        for exc in rejected:
            self.node.stats.reject(exc.reason)
            origin = "-" if source is None else source.short()
            log.info("rejected membership news", extra={"from": origin, "why": str(exc)})

    def _sync_swim(self) -> None:
        """Probe exactly the (non client-only) peers in the view."""
        in_view = {r.peer for r in self.table.records() if not r.has_role(Role.CLIENT_ONLY)}
        in_view.discard(self.node.peer_id)
        for peer in set(self.swim.live_members()) - in_view:
            self.swim.forget(peer)
        for peer in in_view:
            self.swim.add(peer)
        self._wake.set()

    def _affordable(self, source: PeerId, signatures: int) -> bool:
        """Whether ``source`` may still make us check ``signatures`` signatures now (else the
        news is dropped and counted [rate_limited]; gossip brings honest news again)."""
        if self._checks.take(source, trio.current_time(), signatures):
            return True
        self.node.stats.reject(RejectReason.RATE_LIMITED)
        return False

    def _limit_newcomers(
        self, records: list[SignedPeerRecord], source: PeerId
    ) -> list[SignedPeerRecord]:
        """Let one source introduce only so many peers we never heard of per gossip interval
        (by anti-entropy or Cyclon shuffles alike), so a peer minting identities cannot flood
        the table or eclipse the honest view."""
        kept = []
        for signed in records:
            subject = signed_subject(signed)
            known = subject is not None and self.table.get(subject) is not None
            if known or self._newcomers.take(source, trio.current_time()):
                kept.append(signed)
            else:
                self.node.stats.reject(RejectReason.RATE_LIMITED)
        return kept

    async def _on_digest(self, envelope: Envelope, digest: Digest) -> Delta:
        record = self.table.get(envelope.sender)
        if record is None or not record.has_role(Role.CLIENT_ONLY):
            self.swim.add(envelope.sender)
        return self._gossip.answer(digest)

    async def _on_delta(self, envelope: Envelope, delta: Delta) -> Ack:
        self._take(delta, envelope.sender)
        return Ack()

    # -- SWIM ----------------------------------------------------------------------------------

    async def _swim_loop(self) -> None:
        while True:
            now = trio.current_time()
            self._act_all(self.swim.tick(now))
            self._wake = trio.Event()
            with trio.move_on_at(max(self.swim.wake_at(), now + 0.001)):
                await self._wake.wait()

    def _act_all(self, actions: list[Action], source: PeerId | None = None) -> None:
        for action in actions:
            self._act(action, source)

    def _act(self, action: Action, source: PeerId | None = None) -> None:
        nursery = self._nursery
        if nursery is None:
            return  # not running yet: SWIM starts probing with run()
        if isinstance(action, Probe):
            nursery.start_soon(self._guarded, self._probe, action.target, action.deadline)
        elif isinstance(action, IndirectProbe):
            for helper in action.via:
                nursery.start_soon(
                    self._guarded, self._probe_via, helper, action.target, action.deadline
                )
        elif isinstance(action, MemberDead):
            log.info("peer declared dead", extra={"peer": action.peer.short()})
        elif isinstance(action, UpdateRejected):
            self._count([action.error], source)

    async def _guarded(self, task: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run one task that handles what peers sent: whatever goes wrong is logged and
        counted, and the service goes on (a node never stops on input)."""
        try:
            await task(*args)
        except Exception:
            self.node.stats.reject(RejectReason.MALFORMED)
            log.exception("membership task failed on peer input", extra={"task": task.__name__})

    async def _probe(self, target: PeerId, deadline: float) -> None:
        ok = False
        with trio.move_on_at(deadline):
            try:
                await self._reach(target)
                ping = SwimPing(updates=self.swim.piggyback(to=target))
                answer = await self.node.request(target, ping)
                ok = isinstance(answer.body, SwimAck) and answer.body.ok
                if isinstance(answer.body, SwimAck):
                    self._receive(answer.body.updates, target)
            except (MeshfedError, trio.TooSlowError):
                ok = False
        self._act_all(self.swim.probe_result(target, ok, trio.current_time()))

    async def _probe_via(self, helper: PeerId, target: PeerId, deadline: float) -> None:
        timeout_ms = max(1, int((deadline - trio.current_time()) * 1000))
        record = self.table.get(target)
        ok = False
        with trio.move_on_at(deadline):
            try:
                await self._reach(helper)
                answer = await self.node.request(
                    helper,
                    SwimPingReq(
                        target=target,
                        timeout_ms=timeout_ms,
                        updates=self.swim.piggyback(to=helper),
                        addrs=[] if record is None else record.addrs[:MAX_PING_REQ_ADDRS],
                    ),
                )
                ok = isinstance(answer.body, SwimAck) and answer.body.ok
                if isinstance(answer.body, SwimAck):
                    self._receive(answer.body.updates, helper)
            except (MeshfedError, trio.TooSlowError):
                ok = False
        if ok:
            self._act_all(self.swim.probe_result(target, True, trio.current_time()))

    def _receive(self, updates: list[Update], source: PeerId) -> None:
        if updates and self._affordable(source, len(updates)):
            self._act_all(self.swim.receive(updates, trio.current_time()), source)

    async def _on_ping(self, envelope: Envelope, ping: SwimPing) -> SwimAck:
        self._receive(ping.updates, envelope.sender)
        return SwimAck(ok=True, updates=self.swim.piggyback(to=envelope.sender))

    async def _on_ping_req(self, envelope: Envelope, request: SwimPingReq) -> SwimAck:
        self._receive(request.updates, envelope.sender)
        ok = False
        with trio.move_on_after(min(request.timeout_ms / 1000, self.config.swim.period_s)):
            try:
                target = request.target
                if target not in self.node.transport.connected_peers() and request.addrs:
                    if await self.node.connect(request.addrs[0]) != target:
                        raise RemoteProtocolError(
                            f"ping request's address does not answer as {target.short()}",
                            reason=RejectReason.BAD_FIELD,
                        )
                else:
                    await self._reach(target)
                answer = await self.node.request(target, SwimPing(updates=[]))
                ok = isinstance(answer.body, SwimAck)
            except (MeshfedError, trio.TooSlowError):
                ok = False
        return SwimAck(ok=ok, updates=self.swim.piggyback(to=envelope.sender))
