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
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from typing import TYPE_CHECKING, Any

import trio
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceListener,
    Zeroconf,
)

from ..errors import MeshfedError
from ..interfaces import host_addresses

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["SERVICE_TYPE", "MdnsDiscovery", "parse_txt", "txt_for"]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2p._udp.local."
_RESOLVE_MS = 3000
RESCAN_S = 2.0


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


class _Listener(ServiceListener):
    """Runs in zeroconf's thread: resolve each instance, hand its addresses to trio."""

    def __init__(self, token: trio.lowlevel.TrioToken, found: trio.MemorySendChannel[str]) -> None:
        self._token = token
        self._found = found

    def _resolve(self, zc: Zeroconf, type_: str, name: str) -> None:
        info = zc.get_service_info(type_, name, timeout=_RESOLVE_MS)
        if info is None or not info.text:
            return
        for addr in parse_txt(info.text):
            try:
                trio.from_thread.run_sync(self._found.send_nowait, addr, trio_token=self._token)
            except (trio.WouldBlock, trio.RunFinishedError, trio.BrokenResourceError):
                return  # trio is busy or gone: the next announcement will do

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._resolve(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._resolve(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        pass  # departures are SWIM's business


class MdnsDiscovery:
    """Announce this node on the LAN and dial the meshfed/libp2p peers announced there.

    Start it in the node's nursery: ``await nursery.start(MdnsDiscovery(node).run)``.
    """

    def __init__(self, node: Node, *, rescan_s: float = RESCAN_S) -> None:
        self.node = node
        self.rescan_s = rescan_s
        self.instance = secrets.token_hex(16)  # the spec's random 32-character peer name
        self.discovered: set[str] = set()

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
        found_send, found_receive = trio.open_memory_channel[str](256)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dial_found, found_receive)
            await self._announce(found_send, task_status)

    async def _announce(
        self, found: trio.MemorySendChannel[str], task_status: trio.TaskStatus[None]
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
                    self.discovered.clear()  # what we dialled may sit behind a gone interface
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
        self, token: trio.lowlevel.TrioToken, found: trio.MemorySendChannel[str]
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

    async def _dial_found(self, found: trio.MemoryReceiveChannel[str]) -> None:
        async with trio.open_nursery() as nursery:
            async for addr in found:
                if addr not in self.discovered and not addr.endswith(str(self.node.peer_id)):
                    self.discovered.add(addr)
                    nursery.start_soon(self._dial, addr)

    async def _dial(self, addr: str) -> None:
        try:
            with trio.fail_after(10):
                peer = await self.node.connect(addr)
            log.info("found by mDNS", extra={"peer": peer.short(), "addr": addr})
        except (MeshfedError, trio.TooSlowError) as exc:
            self.discovered.discard(addr)  # try again at the next announcement
            log.debug("mDNS peer unreachable", extra={"addr": addr, "error": repr(exc)})


def _stop(zc: Zeroconf, browser: ServiceBrowser, info: Any) -> None:
    browser.cancel()
    zc.unregister_service(info)
    zc.close()
