"""LAN discovery by multicast DNS, as the libp2p mDNS spec says, so other libp2p
implementations see our nodes and we see theirs.

Service ``_p2p._udp.local.``; each node registers an instance with a random 32-character name
and one TXT string ``dnsaddr=<multiaddr ending in /p2p/<id>>`` per listen address, answers
queries for it, and withdraws it on a graceful stop. It announces and listens only on the
interfaces of the node's listen addresses (all of them for a wildcard), over IPv4, IPv6 or both
as the node listens. Interfaces come and go: every ``rescan_s`` it compares the node's dialable
addresses and the host's interface addresses with what it announced, and on a change withdraws
the announcement and starts again on the interfaces there are now (zeroconf binds its sockets
to interfaces when it starts). python-zeroconf runs its own threads; everything it does is
reached from trio through ``trio.to_thread`` (start, stop) and ``trio.from_thread``
(discoveries), so the trio loop never blocks (py-libp2p's own mDNS blocks it for seconds: it
is not used).

Discovery asks for exactly what the libp2p mDNS spec requires of an announcement: the PTR
record naming the instance and its TXT ``dnsaddr=`` records (js-libp2p sends nothing else: no
SRV, no A/AAAA). Anyone on the LAN can announce anything, so dialling is budgeted
(:class:`DialBudget`): a few addresses per announcement, one dial at a time per peer, a few
new peers per second and a few dials in flight at once; the rest waits for a later
announcement.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceListener,
    Zeroconf,
    current_time_millis,
)
from zeroconf._dns import DNSQuestion, DNSText  # not re-exported by name, stable since 0.32
from zeroconf._protocol.outgoing import DNSOutgoing

from ..errors import MeshfedError
from ..identity import PeerId
from ..interfaces import host_addresses
from ..ratelimit import TokenBuckets

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["SERVICE_TYPE", "DialBudget", "MdnsDiscovery", "parse_txt", "peer_of", "txt_for"]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2p._udp.local."
_RESOLVE_MS = 3000
RESCAN_S = 2.0
_TYPE_TXT, _CLASS_IN, _QUERY = 16, 1, 0x0000  # RFC 1035: TXT, class IN; a query's flags

#: addresses of one announcement we look at (the rest is ignored)
MAX_ADDRS_PER_ANNOUNCEMENT = 8
#: new peers we start dialling per second, and in a burst
DIALS_PER_S, DIAL_BURST = 2.0, 8
#: peers being dialled at once
MAX_PENDING_DIALS = 8
#: addresses remembered as answering (not dialled again while they are)
MAX_DIALLED = 1024


def txt_for(addrs: list[str]) -> bytes:
    """The raw TXT record: one length-prefixed ``dnsaddr=`` string per address."""
    strings = [f"dnsaddr={addr}".encode() for addr in addrs]
    return b"".join(bytes([len(s)]) + s for s in strings if len(s) < 256)


def parse_txt(text: bytes) -> list[str]:
    """The multiaddrs of the ``dnsaddr=`` strings in a raw TXT record (others are ignored)."""
    addrs, offset = [], 0
    while offset < len(text):
        length = text[offset]
        entry = text[offset + 1 : offset + 1 + length]
        offset += 1 + length
        if entry.startswith(b"dnsaddr="):
            value = entry[len(b"dnsaddr=") :].decode("utf-8", "replace")
            if value.startswith("/") and "/p2p/" in value:
                addrs.append(value)
    return addrs


def txt_of(zc: Zeroconf, name: str, *, timeout_ms: int = _RESOLVE_MS) -> list[str]:
    """The ``dnsaddr=`` addresses of instance ``name``'s TXT records: from zeroconf's cache
    (an announcement usually carries them beside its PTR record), else asked for once and
    awaited up to ``timeout_ms``. Blocks: call it from zeroconf's thread, never from trio."""
    deadline = time.monotonic() + timeout_ms / 1000
    asked = False
    while True:
        now = current_time_millis()
        texts = [
            record.text
            for record in zc.cache.get_all_by_details(name, _TYPE_TXT, _CLASS_IN)
            if isinstance(record, DNSText) and not record.is_expired(now)
        ]
        if texts or time.monotonic() >= deadline:
            return [addr for text in texts for addr in parse_txt(text)]
        if not asked:
            query = DNSOutgoing(_QUERY)
            query.add_question(DNSQuestion(name, _TYPE_TXT, _CLASS_IN))
            zc.send(query)
            asked = True
        time.sleep(0.05)


class _Listener(ServiceListener):
    """Runs in zeroconf's thread: read each instance's TXT records, hand them to trio."""

    def __init__(
        self, token: trio.lowlevel.TrioToken, found: trio.MemorySendChannel[list[str]]
    ) -> None:
        self._token = token
        self._found = found

    def _resolve(self, zc: Zeroconf, type_: str, name: str) -> None:
        addrs = txt_of(zc, name)
        if not addrs:
            return
        try:
            trio.from_thread.run_sync(self._found.send_nowait, addrs, trio_token=self._token)
        except (trio.WouldBlock, trio.RunFinishedError, trio.BrokenResourceError):
            return  # trio is busy or gone: the next announcement will do

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._resolve(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._resolve(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        pass  # departures are SWIM's business


def peer_of(addr: str) -> PeerId | None:
    """The peer an address names in its last ``/p2p/<id>`` (``None`` if none or not valid)."""
    _, _, text = addr.rpartition("/p2p/")
    try:
        return PeerId.from_string(text) if text and "/" not in text else None
    except ValueError:
        return None


@dataclass
class DialBudget:
    """Which announced peers to dial now (sans-IO; pass ``now``).

    At most ``MAX_ADDRS_PER_ANNOUNCEMENT`` addresses of an announcement are looked at; an
    address that answered before (until :meth:`forget`), and a peer already being dialled, are
    skipped; new dials start at ``DIALS_PER_S`` (burst ``DIAL_BURST``) with at most
    ``MAX_PENDING_DIALS`` in flight. What does not fit is dropped (``dropped`` counts it): the
    peer announces again.
    """

    me: PeerId
    max_pending: int = MAX_PENDING_DIALS
    pending: set[PeerId] = field(default_factory=set)
    dropped: int = 0
    #: addresses that answered (bounded: forgotten wholesale past ``MAX_DIALLED``)
    dialled: set[str] = field(default_factory=set)
    _rate: TokenBuckets[None] = field(default_factory=lambda: TokenBuckets(DIALS_PER_S, DIAL_BURST))

    def admit(self, addrs: list[str], now: float) -> dict[PeerId, list[str]]:
        """The peers to dial now, each with its announced addresses (to try in turn); each
        stays pending until :meth:`done`."""
        wanted: dict[PeerId, list[str]] = {}
        for addr in addrs[:MAX_ADDRS_PER_ANNOUNCEMENT]:
            peer = peer_of(addr)
            if peer is None or peer == self.me or peer in self.pending or addr in self.dialled:
                continue
            wanted.setdefault(peer, []).append(addr)
        admitted: dict[PeerId, list[str]] = {}
        for peer, peer_addrs in wanted.items():
            if len(self.pending) >= self.max_pending or not self._rate.take(None, now):
                self.dropped += 1
                continue
            self.pending.add(peer)
            admitted[peer] = peer_addrs
        return admitted

    def done(self, peer: PeerId, answered: str | None) -> None:
        """The dial of ``peer`` ended; ``answered`` is the address that connected, if any."""
        self.pending.discard(peer)
        if answered is not None:
            if len(self.dialled) >= MAX_DIALLED:
                self.dialled.clear()
            self.dialled.add(answered)

    def forget(self) -> None:
        """Our interfaces changed: what answered may sit behind a gone one; dial it again."""
        self.dialled.clear()


class MdnsDiscovery:
    """Announce this node on the LAN and dial the meshfed/libp2p peers announced there.

    Start it in the node's nursery: ``await nursery.start(MdnsDiscovery(node).run)``.
    """

    def __init__(self, node: Node, *, rescan_s: float = RESCAN_S) -> None:
        self.node = node
        self.rescan_s = rescan_s
        self.instance = secrets.token_hex(16)  # the spec's random 32-character peer name
        self.budget = DialBudget(node.peer_id)

    def _info(self) -> ServiceInfo:
        addrs = self.node.listen_addrs
        hosts = []
        port = 0
        for addr in addrs:
            parts = addr.split("/")
            if len(parts) > 4 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
                hosts.append(parts[2])
                port = int(parts[4])
        packed = [ipaddress.ip_address(h).packed for h in dict.fromkeys(hosts)]
        return ServiceInfo(
            SERVICE_TYPE,
            f"{self.instance}.{SERVICE_TYPE}",
            port=port,
            properties=txt_for(addrs),
            server=f"{self.instance}.local.",
            addresses=packed,
        )

    def _interfaces(self) -> tuple[list[str] | InterfaceChoice, IPVersion]:
        """Announce only where we listen: a node on 127.0.0.1 stays on loopback, a node on a
        wildcard announces on every interface; IPv4, IPv6 or both, as it listens."""
        listen = [addr.split("/") for addr in self.node.config.listen if addr.count("/") > 2]
        versions = {parts[1] for parts in listen}
        version = (
            IPVersion.All
            if versions >= {"ip4", "ip6"}
            else IPVersion.V6Only
            if versions == {"ip6"}
            else IPVersion.V4Only
        )
        hosts = {parts[2] for parts in listen}
        if hosts & {"0.0.0.0", "::"}:
            return InterfaceChoice.All, version
        return sorted(hosts), version

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce, listen and dial until cancelled; withdraw the announcement on the way out."""
        found_send, found_receive = trio.open_memory_channel[list[str]](64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dial_found, found_receive)
            await self._announce(found_send, task_status)

    async def _announce(
        self, found: trio.MemorySendChannel[list[str]], task_status: trio.TaskStatus[None]
    ) -> None:
        """Keep one zeroconf announcing what we are on the interfaces there are now."""
        token = trio.lowlevel.current_trio_token()
        running: tuple[Zeroconf, ServiceBrowser, ServiceInfo] | None = None
        announced: tuple[list[str], tuple[object, ...]] | None = None
        started = False
        try:
            while True:
                now = (self.node.listen_addrs, host_addresses())
                if now != announced:
                    if running is not None:
                        await trio.to_thread.run_sync(_stop, *running)
                        running = None
                    announced = now
                    self.budget.forget()
                    running = await self._start(token, found)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(self.rescan_s)
        finally:
            if running is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await trio.to_thread.run_sync(_stop, *running)

    async def _start(
        self, token: trio.lowlevel.TrioToken, found: trio.MemorySendChannel[list[str]]
    ) -> tuple[Zeroconf, ServiceBrowser, ServiceInfo] | None:
        info = self._info()
        interfaces, version = self._interfaces()

        def start() -> tuple[Zeroconf, ServiceBrowser, ServiceInfo]:
            zc = Zeroconf(interfaces=interfaces, ip_version=version)
            try:
                zc.register_service(info)
                return zc, ServiceBrowser(zc, SERVICE_TYPE, _Listener(token, found)), info
            except BaseException:
                zc.close()
                raise

        try:
            return await trio.to_thread.run_sync(start)
        except (OSError, RuntimeError) as exc:  # no usable interface (yet): retry on a change
            log.warning("mDNS unavailable for now", extra={"error": repr(exc)})
            return None

    async def _dial_found(self, found: trio.MemoryReceiveChannel[list[str]]) -> None:
        async with trio.open_nursery() as nursery:
            async for addrs in found:
                dropped = self.budget.dropped
                for peer, peer_addrs in self.budget.admit(addrs, trio.current_time()).items():
                    nursery.start_soon(self._dial, peer, peer_addrs)
                if self.budget.dropped > dropped:
                    log.debug("mDNS dial budget spent", extra={"dropped": self.budget.dropped})

    async def _dial(self, peer: PeerId, addrs: list[str]) -> None:
        """Dial ``peer`` at its announced addresses in turn, until one answers."""
        answered = None
        try:
            for addr in addrs:
                try:
                    with trio.fail_after(10):
                        await self.node.connect(addr)
                    log.info("found by mDNS", extra={"peer": peer.short(), "addr": addr})
                    answered = addr
                    return
                except (MeshfedError, trio.TooSlowError) as exc:
                    log.debug("mDNS peer unreachable", extra={"addr": addr, "error": repr(exc)})
        finally:
            self.budget.done(peer, answered)


def _stop(zc: Zeroconf, browser: ServiceBrowser, info: Any) -> None:
    browser.cancel()
    zc.unregister_service(info)
    zc.close()
