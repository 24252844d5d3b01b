"""The libp2p transport: peers authenticated by libp2p, data over sealed direct channels.

Theory of operation (SPEC.md, "libp2p transport"). A py-libp2p host (TCP + Noise only + yamux,
identify and ping) names and authenticates peers. Its yamux streams are slow for data (~100 MB/s
and ~0.5 ms per round trip here), so they carry only a one-round-trip key exchange on
``/meshfed/session/1``; requests and streams then travel over direct TCP connections to the
peer's *sealed port*, sealed with AES-256-GCM under keys derived from that exchange
(:mod:`meshfed.transports._sealed`). Each node dials its own *control* connection to a peer
for requests (multiplexed by request id) and one connection per stream, so bulk data never
queues behind requests.

Importing this module imports libp2p (seconds, tens of MiB): nothing else in meshfed imports it
unless a node uses this transport. libp2p's import detaches its loggers from the logging tree;
:func:`route_libp2p_logs` (run at import) reattaches them, so its records reach our handlers.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import libp2p
import msgpack
import multiaddr
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_noise_key_pair
from libp2p.custom_types import THandler, TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.ping import PingService
from libp2p.io.trio import TrioTCPStream
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.exceptions import PeerIDMismatchesPubkey
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP, TCPListener
from libp2p.utils.multiaddr_utils import extract_ip_from_multiaddr

from meshfed.errors import (
    PeerUnreachable,
    RemoteProtocolError,
    RequestFailed,
    RequestTimeout,
    StreamClosed,
    TransportError,
)
from meshfed.identity import Identity, PeerId
from meshfed.interfaces import dialable, host_addresses
from meshfed.stats import NodeStats, RejectReason
from meshfed.transport import (
    RequestHandler,
    Stream,
    StreamHandler,
    Transport,
    TransportLimits,
)

from ._cpu import UNAUTHENTICATED, CpuAccounting
from ._limits import PeerAdmission
from ._sealed import (
    NONCE_BYTES,
    SealedSocket,
    accept_sealed,
    derive_session,
    dial_sealed,
    fresh_nonce,
)

__all__ = ["Libp2pTransport", "route_libp2p_logs"]

log = logging.getLogger(__name__)

SESSION_PROTOCOL = TProtocol("/meshfed/session/1")
HANDSHAKE_TIMEOUT_S = 5.0
DIAL_TIMEOUT_S = 10.0
STALE_CHECK_S = 2.0  # a connected peer that does not answer a ping in this long is re-dialled
ADDRESS_TTL_S = 120  # how long the peerstore keeps an address we dialled (py-libp2p's own choice)
#: unauthenticated sealed connections at once; one more sheds the oldest [overloaded]
MAX_UNAUTHENTICATED = 64
#: authenticated sealed connections per peer beyond its streams (its control connections)
_CONTROL_SLACK = 4
#: sessions kept per peer, and in all, for inbound sealed handshakes (oldest dropped first)
SESSIONS_PER_PEER = 2
MAX_SESSIONS = 4096
ACCEPT_BACKOFF_S = (0.01, 1.0)  # first and longest pause when accept() finds no resources
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LISTENER_GONE_ERRNOS = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})

# connection kinds (the last byte of the hello)
CONTROL, STREAM = 0, 1
# frame types
REQUEST, RESPONSE, ERROR, DATA, END, ACCEPT = range(6)
_PROTOCOL_PREFIX = struct.Struct(">B")
_MAX_PROTOCOL_LEN = 255
_REQUEST_OVERHEAD = 1 + _MAX_PROTOCOL_LEN


def route_libp2p_logs() -> None:
    """Send libp2p's records through the normal logging tree.

    Its import detaches the ``libp2p`` logger (``propagate = False``) and some of its modules
    pin their own level to INFO. Here every ``libp2p.*`` logger inherits again, and ``libp2p``
    logs at DEBUG when meshfed does, else from WARNING up.
    """
    libp2p_logger = logging.getLogger("libp2p")
    libp2p_logger.propagate = True
    debug = logging.getLogger("meshfed").getEffectiveLevel() <= logging.DEBUG
    libp2p_logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    for name, logger in logging.Logger.manager.loggerDict.items():
        if name.startswith("libp2p.") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)
            logger.propagate = True


route_libp2p_logs()


#: What the exceptions of py-libp2p, trio and the OS mean in our tree, by type (first match
#: wins); :func:`_mapped` applies it, and also maps any other exception raised *inside*
#: py-libp2p's code (its bugs show up as ``TypeError`` and the like) to ``PeerUnreachable``.
#: Anything else is a bug of ours and propagates.
ERROR_TABLE: tuple[tuple[type[BaseException], type[TransportError]], ...] = (
    (trio.TooSlowError, RequestTimeout),
    (BaseLibp2pError, PeerUnreachable),
    (trio.BrokenResourceError, PeerUnreachable),
    (trio.ClosedResourceError, PeerUnreachable),
    (OSError, PeerUnreachable),
)
_FOREIGN = tuple(foreign for foreign, _ in ERROR_TABLE)


@contextlib.contextmanager
def _quietly(what: str) -> Iterator[None]:
    """Ignore a network's failure (after :func:`_mapped`): tidying up a connection."""
    with contextlib.suppress(TransportError), _mapped(what):
        yield


_LIBP2P_DIR = os.path.dirname(libp2p.__file__) + os.sep


def _raised_in_libp2p(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is py-libp2p's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_LIBP2P_DIR)


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Raise the exceptions of :data:`ERROR_TABLE`, and py-libp2p's own failures, as ours,
    saying what failed."""
    try:
        yield
    except _FOREIGN as exc:
        ours = next(mine for foreign, mine in ERROR_TABLE if isinstance(exc, foreign))
        raise ours(f"{what}: {exc or type(exc).__name__}") from exc
    except Exception as exc:
        if not _raised_in_libp2p(exc):
            raise
        log.debug("py-libp2p failed with %s: %s", type(exc).__name__, exc)
        raise PeerUnreachable(f"{what}: py-libp2p failed ({type(exc).__name__}: {exc})") from exc


_ANSWERING = re.compile(r"remote_peer_id_from_pubkey=(\w+)")


def _answering_peer(exc: BaseException) -> str | None:
    """The peer id an address proved it holds, where a dial failed because it was another
    than the one asked for (py-libp2p's Noise ``PeerIDMismatchesPubkey``, deep in the cause
    chain and its ``MultiError``)."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, PeerIDMismatchesPubkey):
            found = _ANSWERING.search(str(current))
            return found.group(1) if found else None
        pending.extend(getattr(current, "errors", ()))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


def _to_libp2p(peer: PeerId) -> ID:
    return ID(peer.raw)


def _from_libp2p(peer_id: ID) -> PeerId:
    return PeerId(peer_id.to_bytes())


@dataclass(slots=True)
class _Session:
    """What we share with one peer after the key exchange."""

    session_id: bytes
    key: bytes
    host: str
    sealed_port: int


@dataclass(slots=True)
class _InboundSessions:
    """The sessions peers opened with us, by session id, for their sealed handshakes.

    Bounded: a peer keeps its ``per_peer`` newest sessions, the table its ``total`` newest.
    A dialer whose session was dropped fails its handshake and exchanges keys again.
    """

    per_peer: int = SESSIONS_PER_PEER
    total: int = MAX_SESSIONS
    _by_id: dict[bytes, tuple[PeerId, bytes]] = field(default_factory=dict)
    _by_peer: dict[PeerId, collections.deque[bytes]] = field(default_factory=dict)

    def add(self, session_id: bytes, peer: PeerId, key: bytes) -> None:
        """Remember a session, dropping the oldest beyond the bounds."""
        ids = self._by_peer.setdefault(peer, collections.deque())
        ids.append(session_id)
        self._by_id[session_id] = (peer, key)
        if len(ids) > self.per_peer:
            self._drop(ids[0])
        while len(self._by_id) > self.total:
            self._drop(next(iter(self._by_id)))

    def get(self, session_id: bytes) -> tuple[PeerId, bytes] | None:
        """The peer and session key of ``session_id``, if we know it."""
        return self._by_id.get(session_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def _drop(self, session_id: bytes) -> None:
        peer, _ = self._by_id.pop(session_id)
        ids = self._by_peer[peer]
        ids.remove(session_id)
        if not ids:
            del self._by_peer[peer]


@dataclass(slots=True)
class _Unauthenticated:
    """A sealed connection whose dialer has not yet proved that it holds a session key."""

    sock: trio.socket.SocketType
    scope: trio.CancelScope
    shed: bool = False


@dataclass(slots=True)
class _Control:
    """A control connection with one peer: requests both ways, answers matched by id."""

    channel: SealedSocket
    waiters: dict[int, tuple[trio.Event, list[bytes | Exception]]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    failed: bool = False

    @property
    def usable(self) -> bool:
        """Whether new requests may go out on it."""
        return not self.failed and not self.channel.broken

    def deliver(self, peer: PeerId, failed: bool, request_id: int, body: bytes) -> None:
        """Hand an answer to the request waiting for it (if it has not given up)."""
        waiter = self.waiters.get(request_id)
        if waiter is None:
            return  # the requester's deadline passed
        if failed:
            reason = body.decode("utf-8", "replace")[:64]
            waiter[1].append(RequestFailed(f"{peer} refused: {reason}", reason=reason))
        else:
            waiter[1].append(body)
        waiter[0].set()

    def fail_all(self, error: Exception) -> None:
        self.failed = True
        for event, slot in self.waiters.values():
            slot.append(error)
            event.set()
        self.waiters.clear()


class SealedStream(Stream):
    """A framed stream over its own sealed TCP connection."""

    def __init__(self, channel: SealedSocket, remote_peer: PeerId, protocol: str) -> None:
        self.remote_peer = remote_peer
        self.protocol = protocol
        self._channel = channel
        self._closed = False
        self._ended = False

    async def send(self, frame: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise StreamClosed(f"stream to {self.remote_peer} is closed")
        await self._channel.send(DATA, 0, frame)

    async def _header(self) -> int:
        if self._ended:
            raise StreamClosed(f"stream from {self.remote_peer} ended")
        length, frame_type, _ = await self._channel.receive_header()
        if frame_type == END:
            await self._channel.receive_body(length)
            self._ended = True
            raise StreamClosed(f"stream from {self.remote_peer} ended")
        if frame_type != DATA:
            raise RemoteProtocolError(
                f"frame type {frame_type} on a stream", reason=RejectReason.MALFORMED
            )
        return length

    async def receive(self) -> bytes:
        length = await self._header()
        body = await self._channel.receive_body(length)
        assert isinstance(body, bytes)
        return body

    async def receive_into(self, buffer: memoryview) -> int:
        length = await self._header()
        received = await self._channel.receive_body(length, into=buffer)
        assert isinstance(received, int)
        return received

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as scope:
                scope.shield = True
                await self._channel.send(END, 0, b"")
        except StreamClosed:
            pass
        finally:
            self._channel.close()


def _remote_host(stream: object) -> str | None:
    """The IP address at the other end of a libp2p stream's TCP connection.

    py-libp2p's ``get_remote_address`` gives ``None`` for IPv6 (its peer name is a 4-tuple),
    so this reads the socket under the stream's connection layers itself.
    """
    layer = stream
    for _ in range(12):
        sock = getattr(layer, "socket", None)
        if isinstance(sock, trio.socket.SocketType):
            try:
                return str(sock.getpeername()[0])
            except OSError:
                return None
        for name in ("muxed_conn", "secured_conn", "conn", "stream"):
            if hasattr(layer, name):
                layer = getattr(layer, name)
                break
        else:
            return None
    return None


class _ExclusiveTCPListener(TCPListener):  # type: ignore[misc]  # libp2p is untyped
    """py-libp2p's TCP listener, bound without ``SO_REUSEPORT``.

    py-libp2p sets ``SO_REUSEPORT`` on its listening sockets (for hole punching, which we do
    not use), so a second node on a taken port "listens" too and the kernel splits incoming
    connections between them. This one fails with ``EADDRINUSE`` instead and records why.
    """

    def __init__(self, handler_function: THandler, failures: dict[str, str]) -> None:
        super().__init__(handler_function)
        self._failures = failures

    async def listen(self, maddr: multiaddr.Multiaddr) -> None:
        try:
            host = extract_ip_from_multiaddr(maddr) or "0.0.0.0"
            port = int(maddr.value_for_protocol("tcp"))
        except (ValueError, TypeError, multiaddr.exceptions.Error) as exc:
            self._failures[str(maddr)] = f"not a TCP address with a port ({exc})"
            raise OpenConnectionError(f"cannot listen on {maddr}: {exc}") from exc
        sock = trio.socket.socket(
            trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
            trio.socket.SOCK_STREAM,
        )
        try:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)  # TIME_WAIT
            await sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            self._failures[str(maddr)] = (
                "address in use" if exc.errno == errno.EADDRINUSE else str(exc.strerror or exc)
            )
            raise OpenConnectionError(f"cannot listen on {maddr}: {exc}") from exc
        listener = trio.SocketListener(sock)

        async def serve(stream: trio.SocketStream) -> None:
            with contextlib.suppress(Exception):  # as py-libp2p's: a failed upgrade is logged there
                await self.handler(TrioTCPStream(stream))

        if self._nursery is None:
            await self._spawn_background_task()
        assert self._nursery is not None
        await self._nursery.start(trio.serve_listeners, serve, [listener])
        self.listeners.append(listener)


class _ExclusiveTCP(TCP):  # type: ignore[misc]
    """py-libp2p's TCP transport with :class:`_ExclusiveTCPListener`."""

    def __init__(self) -> None:
        super().__init__()
        #: why listening on an address failed, by multiaddr (py-libp2p only logs it)
        self.failures: dict[str, str] = {}

    def create_listener(self, handler_function: THandler) -> TCPListener:
        return _ExclusiveTCPListener(handler_function, self.failures)


class Libp2pTransport(Transport):
    """A node's libp2p transport. See the module docstring.

    Args:
        identity: the node's identity (its Ed25519 key becomes the libp2p host key).
        stats: where rejections and byte counts go.
        limits: per-peer bounds on what we accept.
        listen_addrs: TCP multiaddrs to listen on.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        stats: NodeStats,
        limits: TransportLimits = TransportLimits(),  # noqa: B008 - frozen, immutable
        listen_addrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    ) -> None:
        self.identity = identity
        self.stats = stats
        self.limits = limits
        self._listen = [multiaddr.Multiaddr(a) for a in listen_addrs]
        secret = Ed25519PrivateKey.from_bytes(identity.ed25519_seed())
        key_pair = KeyPair(secret, secret.get_public_key())
        noise = NoiseTransport(key_pair, noise_privkey=new_noise_key_pair().private_key)
        self._tcp = _ExclusiveTCP()
        self.host = new_host(
            transports=[self._tcp],
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            # one connection per peer (else each dial waits 250 ms); no auto-dialling of the
            # peerstore to keep 50+ connections: membership decides whom we talk to.
            connection_config=ConnectionConfig(
                max_connections_per_peer=1,
                min_connections=0,
                low_watermark=0,
                auto_connect_interval=24 * 3600.0,
            ),
        )
        if _from_libp2p(self.host.get_id()) != identity.peer_id:
            raise AssertionError("libp2p derived another peer id from our key")
        self._ping = PingService(self.host)
        self._admission = PeerAdmission(limits)
        #: CPU time each peer's tasks used, and the fair turns it gives them
        self.cpu = CpuAccounting()
        self._request_handlers: dict[str, RequestHandler] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._sessions: dict[PeerId, _Session] = {}
        self._inbound_sessions = _InboundSessions()
        self._unauthenticated: dict[trio.socket.SocketType, _Unauthenticated] = {}
        self._sealed_per_peer: collections.Counter[PeerId] = collections.Counter()
        self._controls: dict[PeerId, _Control] = {}
        self._session_locks: dict[PeerId, trio.Lock] = {}
        self._control_locks: dict[PeerId, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._sealed_port = 0
        self._sockets: set[trio.socket.SocketType] = set()
        self.host.set_stream_handler(SESSION_PROTOCOL, self._serve_session)

    # -- identity and lifecycle ----------------------------------------------------------------

    @property
    def local_peer(self) -> PeerId:
        return self.identity.peer_id

    @property
    def listen_addrs(self) -> list[str]:
        if self._nursery is None:
            return []
        suffix = f"/p2p/{self.local_peer}"
        addrs = [a if a.endswith(suffix) else a + suffix for a in map(str, self.host.get_addrs())]
        if any(a.startswith(("/ip4/0.0.0.0/", "/ip6/::/")) for a in addrs):
            return dialable(addrs, host_addresses())  # the interfaces' addresses, as of now
        return addrs

    def connected_peers(self) -> list[PeerId]:
        return [_from_libp2p(p) for p in self.host.get_connected_peers()]

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        self._request_handlers[protocol] = handler

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._stream_handlers[protocol] = handler

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = await self._open_sealed_listener()
        trio.lowlevel.add_instrument(self.cpu)
        try:
            async with self.host.run(self._listen):
                failure = self._listen_failure()
                if failure is None:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        if listener is not None:
                            nursery.start_soon(self._accept_loop, listener)
                        task_status.started()
                        await trio.sleep_forever()
            raise failure  # outside libp2p's nurseries: one plain exception
        finally:
            trio.lowlevel.remove_instrument(self.cpu)
            self._nursery = None
            if listener is not None:
                listener.close()
            for sock in list(self._sockets):
                sock.close()
            for control in self._controls.values():
                control.fail_all(PeerUnreachable("the transport stopped"))
            self._controls.clear()

    def _listen_failure(self) -> TransportError | None:
        """py-libp2p skips an address it cannot listen on (and logs it at DEBUG): say which."""
        serving = self.host.get_network().listeners
        failed = [a for a in map(str, self._listen) if a not in serving]
        if not failed:
            return None
        reasons = [f"{a} ({self._tcp.failures.get(a, 'no transport for it')})" for a in failed]
        return TransportError(f"cannot listen on {', '.join(reasons)}")

    async def _open_sealed_listener(self) -> trio.socket.SocketType | None:
        """Listen for sealed connections on the IP of the first TCP listen address. With no
        listen address (client mode) there is none: peers reach us over what we dial."""
        for addr in self._listen:
            parts = str(addr).split("/")
            if len(parts) > 3 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
                family = trio.socket.AF_INET6 if parts[1] == "ip6" else trio.socket.AF_INET
                listener = trio.socket.socket(family, trio.socket.SOCK_STREAM)
                listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                await listener.bind((parts[2], 0))
                listener.listen(128)
                self._sealed_port = listener.getsockname()[1]
                return listener
        self._sealed_port = 0
        return None

    def _spawn(self, fn: object, *args: object) -> None:
        if self._nursery is None:
            raise PeerUnreachable("the transport is not running")
        self._nursery.start_soon(fn, *args)  # type: ignore[arg-type]

    # -- sessions over libp2p ------------------------------------------------------------------

    async def connect(self, addr: str) -> PeerId:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except ValueError as exc:  # multiaddr's and py-libp2p's parse errors
            raise PeerUnreachable(f"{addr!r} is not a multiaddr with /p2p/<id>: {exc}") from None
        peer = _from_libp2p(info.peer_id)
        if peer in self.connected_peers() and not await self._answers(peer):
            # A connection that no longer answers (its interface went away; TCP has not
            # noticed): close it, so that the dial below opens a fresh one.
            with trio.move_on_after(STALE_CHECK_S), _quietly("disconnecting"):
                await self.host.disconnect(info.peer_id)
            self._sessions.pop(peer, None)
            control = self._controls.pop(peer, None)
            if control is not None:  # its sealed connection went the same way
                control.fail_all(PeerUnreachable(f"the connection to {peer} went stale"))
                with contextlib.suppress(OSError):  # its reader sees the end and cleans up
                    control.channel.sock.shutdown(trio.socket.SHUT_RDWR)
        # The peerstore keeps the address asked for (later dials): it may hold others that no
        # longer work (from an interface that went, or a wildcard a peer's identify reported).
        peerstore = self.host.get_peerstore()
        peerstore.clear_addrs(info.peer_id)
        peerstore.add_addrs(info.peer_id, info.addrs, ADDRESS_TTL_S)
        if peer not in self.connected_peers():
            await self._dial(addr, info)
        await self._session(peer)
        return peer

    async def _dial(self, addr: str, info: PeerInfo) -> None:
        """Dial exactly ``addr``. Not ``host.connect``: that dials from the peerstore, where a
        concurrent connect to the same peer's older address (a bootstrap entry of a peer that
        restarted on a new port) may have put that one back, and it picks one TCP address."""
        network = self.host.get_network()
        # py-libp2p refuses for 60 s to dial a peer whose last dial failed (its negative
        # cache), so a peer that starts after us would stay unreachable.
        network.unblock_peer(info.peer_id)
        try:
            with _mapped(f"cannot reach {addr}"), trio.fail_after(DIAL_TIMEOUT_S):
                await network.dial_addr(info.addrs[0], info.peer_id)
        except PeerUnreachable as exc:
            answering = _answering_peer(exc)
            if answering is None:
                raise
            raise PeerUnreachable(
                f"{addr} answers as peer {answering}, not {info.peer_id}: check the /p2p/ part"
            ) from exc

    async def _session(self, peer: PeerId) -> _Session:
        session = self._sessions.get(peer)
        if session is not None:
            return session
        lock = self._session_locks.setdefault(peer, trio.Lock())
        async with lock:
            session = self._sessions.get(peer)
            if session is None:
                session = self._sessions[peer] = await self._exchange_keys(peer)
        return session

    async def _exchange_keys(self, peer: PeerId) -> _Session:
        ephemeral = X25519PrivateKey.generate()
        ours = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        nonce = fresh_nonce()
        with _mapped(f"key exchange with {peer} failed"), trio.fail_after(HANDSHAKE_TIMEOUT_S):
            stream = await self.host.new_stream(_to_libp2p(peer), [SESSION_PROTOCOL])
            try:
                await stream.write(msgpack.packb([1, ours, nonce, self._sealed_port]))
                answer = await stream.read(256)
                remote = _remote_host(stream)
            finally:
                await stream.close()
        if not answer:  # it hung up (its deadline, or it stopped): it refused nothing of ours
            raise PeerUnreachable(f"key exchange with {peer}: no answer")
        try:
            theirs, their_nonce, port = _parse_exchange(answer)
            shared = _agree(ephemeral, theirs)
        except RemoteProtocolError as exc:
            self.stats.reject(exc.reason)
            raise PeerUnreachable(f"key exchange with {peer} failed: {exc}") from exc
        session_id, key = derive_session(
            shared,
            dialer=self.local_peer.raw,
            listener=peer.raw,
            transcript=ours + theirs + nonce + their_nonce,
        )
        if remote is None:
            raise PeerUnreachable(f"the connection to {peer} has no remote address")
        return _Session(session_id, key, remote, port)

    async def _serve_session(self, stream: object) -> None:
        """The listener half of the key exchange (a libp2p stream handler)."""
        peer = _from_libp2p(stream.muxed_conn.peer_id)  # type: ignore[attr-defined]
        try:
            with _mapped(f"key exchange from {peer}"), trio.fail_after(HANDSHAKE_TIMEOUT_S):
                hello = await stream.read(256)  # type: ignore[attr-defined]
                if not hello:
                    raise StreamClosed("the dialer hung up")
                theirs, their_nonce, _port = _parse_exchange(hello)
                ephemeral = X25519PrivateKey.generate()
                ours = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
                nonce = fresh_nonce()
                shared = _agree(ephemeral, theirs)
                session_id, key = derive_session(
                    shared,
                    dialer=peer.raw,
                    listener=self.local_peer.raw,
                    transcript=theirs + ours + their_nonce + nonce,
                )
                # Known before the answer leaves: the dialer may open a sealed connection the
                # moment it reads it.
                self._inbound_sessions.add(session_id, peer, key)
                await stream.write(msgpack.packb([1, ours, nonce, self._sealed_port]))  # type: ignore[attr-defined]
                remote = _remote_host(stream)
        except RemoteProtocolError as exc:
            self.stats.reject(exc.reason)
            with _quietly("resetting the key exchange"):
                await stream.reset()  # type: ignore[attr-defined]
            return
        except RequestTimeout:  # a silent dialer
            self.stats.reject(RejectReason.HANDSHAKE_TIMEOUT)
            return
        except TransportError:  # the dialer hung up or reset: it sent nothing to refuse
            self.stats.abandoned += 1
            return
        finally:
            with _quietly("closing the key exchange"):
                await stream.close()  # type: ignore[attr-defined]
        # The dialer can now be reached back without a dial of its own.
        if peer not in self._sessions and remote:
            reverse = await self._exchange_keys_quietly(peer)
            if reverse is not None:
                self._sessions.setdefault(peer, reverse)

    async def _exchange_keys_quietly(self, peer: PeerId) -> _Session | None:
        try:
            return await self._exchange_keys(peer)
        except (TransportError, RemoteProtocolError):
            return None

    # -- sealed connections --------------------------------------------------------------------

    async def _dial_sealed(self, peer: PeerId, kind: int) -> SealedSocket:
        fresh = peer not in self._sessions
        for retry in (False, True):
            session = await self._session(peer)
            if session.sealed_port == 0:
                raise PeerUnreachable(f"{peer} accepts no inbound connections (client mode)")
            try:
                return await self._handshake(session, kind)
            except TransportError:
                self._sessions.pop(peer, None)  # the peer may have restarted: exchange anew
                if fresh or retry:
                    raise
        raise AssertionError("not reached")

    async def _handshake(self, session: _Session, kind: int) -> SealedSocket:
        """Open and key one sealed connection."""
        family = trio.socket.AF_INET6 if ":" in session.host else trio.socket.AF_INET
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
        try:
            what = f"sealed connection to {session.host}:{session.sealed_port} failed"
            with _mapped(what), trio.fail_after(HANDSHAKE_TIMEOUT_S):
                sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                await sock.connect((session.host, session.sealed_port))
                return await dial_sealed(
                    sock,
                    session_id=session.session_id,
                    session_key=session.key,
                    kind=kind,
                    max_frame_bytes=self.limits.max_frame_bytes + _REQUEST_OVERHEAD,
                    stats=self.stats,
                )
        except StreamClosed as exc:
            sock.close()
            raise PeerUnreachable(f"sealed connection failed: {exc}") from exc
        except BaseException:
            sock.close()
            raise

    async def _accept_loop(self, listener: trio.socket.SocketType) -> None:
        """Accept sealed connections until cancelled. Out of file descriptors or buffers, it
        sheds the oldest unauthenticated connection, backs off and goes on (as trio's
        ``serve_listeners`` backs off)."""
        pause = ACCEPT_BACKOFF_S[0]
        self.cpu.own(UNAUTHENTICATED)
        while True:
            await self.cpu.turn(UNAUTHENTICATED)  # all unauthenticated work: one fair share
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno in _LISTENER_GONE_ERRNOS:
                    raise
                if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                    shed = self._shed_oldest()
                    level = logging.WARNING if pause == ACCEPT_BACKOFF_S[0] else logging.DEBUG
                    log.log(
                        level,
                        "sealed port: %s; shed %d connection(s), pausing %.2f s",
                        exc.strerror,
                        int(shed),
                        pause,
                    )
                    await trio.sleep(pause)
                    pause = min(2 * pause, ACCEPT_BACKOFF_S[1])
                continue  # any other error is the failed connection's, not the listener's
            pause = ACCEPT_BACKOFF_S[0]
            self._spawn(self._serve_sealed, sock)

    def _shed_oldest(self) -> bool:
        """Close the oldest unauthenticated connection (its task counts it [overloaded])."""
        if not self._unauthenticated:
            return False
        pending = self._unauthenticated.pop(next(iter(self._unauthenticated)))
        pending.shed = True
        pending.scope.cancel()
        pending.sock.close()  # its descriptor is free at once
        return True

    async def _authenticate(
        self, sock: trio.socket.SocketType
    ) -> tuple[PeerId, int, SealedSocket] | None:
        """The listener's handshake under the limits for unauthenticated connections: at most
        ``MAX_UNAUTHENTICATED`` at once (one more sheds the oldest), each done in
        ``HANDSHAKE_TIMEOUT_S``. ``None`` (counted) if it failed."""
        if len(self._unauthenticated) >= MAX_UNAUTHENTICATED:
            self._shed_oldest()
        deadline = trio.current_time() + HANDSHAKE_TIMEOUT_S
        pending = self._unauthenticated[sock] = _Unauthenticated(
            sock, trio.CancelScope(deadline=deadline)
        )
        reason: RejectReason | None = RejectReason.HANDSHAKE_TIMEOUT
        try:
            with pending.scope:
                sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                return await accept_sealed(
                    sock,
                    lookup=self._inbound_sessions.get,
                    kinds=(CONTROL, STREAM),
                    max_frame_bytes=self.limits.max_frame_bytes + _REQUEST_OVERHEAD,
                    stats=self.stats,
                )
        except (OSError, StreamClosed):  # the dialer hung up (or reset) before it was done
            reason = None
        except (trio.ClosedResourceError, RemoteProtocolError):
            reason = RejectReason.HANDSHAKE_FAILED
        finally:
            self._unauthenticated.pop(sock, None)
        if pending.shed:
            self.stats.reject(RejectReason.OVERLOADED)
        elif reason is None:
            self.stats.abandoned += 1
        else:
            self.stats.reject(reason)
        return None

    async def _serve_sealed(self, sock: trio.socket.SocketType) -> None:
        self._sockets.add(sock)
        self.cpu.own(UNAUTHENTICATED)
        try:
            accepted = await self._authenticate(sock)
            if accepted is None:
                return
            peer, kind, channel = accepted
            self.cpu.own(peer)
            if self._sealed_per_peer[peer] >= self.limits.max_streams_per_peer + _CONTROL_SLACK:
                self.stats.reject(RejectReason.TOO_MANY_STREAMS)
                return
            self._sealed_per_peer[peer] += 1
            try:
                if kind == CONTROL:
                    control = _Control(channel)
                    current = self._controls.get(peer)
                    if current is None or not current.usable:
                        self._controls[peer] = control  # our requests may ride it back
                    await self._run_control(peer, control)
                else:
                    await self.cpu.turn(peer)
                    await self._serve_stream(peer, channel)
            finally:
                self._sealed_per_peer[peer] -= 1
                if not self._sealed_per_peer[peer]:
                    del self._sealed_per_peer[peer]
        finally:
            self._sockets.discard(sock)
            sock.close()

    # -- requests ------------------------------------------------------------------------------

    async def request(self, peer: PeerId, protocol: str, payload: bytes) -> bytes:
        if len(protocol.encode()) > _MAX_PROTOCOL_LEN:
            raise ValueError(f"protocol name {protocol!r} is longer than 255 bytes")
        control = await self._control(peer)
        request_id = next(control.ids)
        done, slot = trio.Event(), []  # type: tuple[trio.Event, list[bytes | Exception]]
        control.waiters[request_id] = (done, slot)
        name = protocol.encode()
        try:
            await control.channel.send(REQUEST, request_id, bytes([len(name)]) + name + payload)
            await done.wait()
        except StreamClosed as exc:
            control.fail_all(PeerUnreachable(f"connection to {peer} lost: {exc}"))
            self._controls.pop(peer, None)
        finally:
            control.waiters.pop(request_id, None)
        if not slot:
            raise PeerUnreachable(f"connection to {peer} lost")
        outcome = slot[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _control(self, peer: PeerId) -> _Control:
        control = self._controls.get(peer)
        if control is not None and control.usable:
            return control
        lock = self._control_locks.setdefault(peer, trio.Lock())
        async with lock:
            control = self._controls.get(peer)
            if control is None or not control.usable:
                channel = await self._dial_sealed(peer, CONTROL)
                control = self._controls[peer] = _Control(channel)
                self._spawn(self._run_control, peer, control)
        return control

    async def _run_control(self, peer: PeerId, control: _Control) -> None:
        """Serve one control connection, whichever side dialed it: requests from the peer are
        answered, answers to ours go to their waiters. So a peer that cannot accept connections
        (client mode) is still reached over the connection it dialed."""
        channel = control.channel
        self.cpu.own(peer)
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    length, frame_type, frame_id = await channel.receive_header()
                    if (
                        frame_type == REQUEST
                        and length > self.limits.max_frame_bytes + _REQUEST_OVERHEAD
                    ):
                        await channel.discard_body(length)  # authenticated before we answer
                        self.stats.reject(RejectReason.OVERSIZED)
                        nursery.start_soon(_send_quietly, channel, ERROR, frame_id, b"oversized")
                        continue
                    body = await channel.receive_body(length)
                    assert isinstance(body, bytes)
                    if frame_type == REQUEST:
                        nursery.start_soon(self._serve_request, peer, channel, frame_id, body)
                    elif frame_type in (RESPONSE, ERROR):
                        control.deliver(peer, frame_type == ERROR, frame_id, body)
                    else:
                        raise RemoteProtocolError(
                            f"frame type {frame_type} on a control connection",
                            reason=RejectReason.MALFORMED,
                        )
            except RemoteProtocolError as exc:
                self.stats.reject(exc.reason)
                control.fail_all(PeerUnreachable(f"{peer} broke the protocol: {exc}"))
            except StreamClosed as exc:
                control.fail_all(PeerUnreachable(f"connection to {peer} lost: {exc}"))
            finally:
                if self._controls.get(peer) is control:
                    del self._controls[peer]
                channel.close()
                nursery.cancel_scope.cancel()

    async def _serve_request(
        self, peer: PeerId, channel: SealedSocket, request_id: int, body: bytes
    ) -> None:
        self.cpu.own(peer)
        name_len = body[0] if body else 0
        protocol = body[1 : 1 + name_len].decode("utf-8", "replace")
        payload = body[1 + name_len :]
        reason: RejectReason | None
        handler = self._request_handlers.get(protocol)
        if not body or len(body) < 1 + name_len:
            reason = RejectReason.MALFORMED
        elif len(payload) > self.limits.max_frame_bytes:
            reason = RejectReason.OVERSIZED
        elif handler is None:
            reason = RejectReason.UNKNOWN_PROTOCOL
        else:
            reason = self._admission.admit(peer, trio.current_time(), is_request=True)
        if reason is not None:
            self.stats.reject(reason)
            await _send_quietly(channel, ERROR, request_id, reason.value.encode())
            return
        assert handler is not None
        try:
            await self.cpu.turn(peer)  # a peer in CPU debt is served later (in its slot)
            answer = await handler(peer, payload)
        except RemoteProtocolError as exc:
            await _send_quietly(channel, ERROR, request_id, str(exc.reason).encode())
            return
        except Exception:
            log.exception("request handler failed", extra={"peer": peer.short()})
            await _send_quietly(channel, ERROR, request_id, b"internal")
            return
        finally:
            self._admission.release(peer)
        await _send_quietly(channel, RESPONSE, request_id, answer)

    # -- streams -------------------------------------------------------------------------------

    async def open_stream(self, peer: PeerId, protocol: str) -> Stream:
        channel = await self._dial_sealed(peer, STREAM)
        try:
            await channel.send(DATA, 0, protocol.encode())
            length, frame_type, _ = await channel.receive_header()
            body = await channel.receive_body(length)
        except (StreamClosed, RemoteProtocolError) as exc:
            channel.close()
            raise PeerUnreachable(f"stream to {peer} failed: {exc}") from exc
        if frame_type == ERROR:
            channel.close()
            assert isinstance(body, bytes)
            reason = body.decode("utf-8", "replace")[:64]
            raise RequestFailed(f"{peer} refused the stream: {reason}", reason=reason)
        return SealedStream(channel, peer, protocol)

    async def _serve_stream(self, peer: PeerId, channel: SealedSocket) -> None:
        try:
            length, _, _ = await channel.receive_header()
            if length > _MAX_PROTOCOL_LEN:
                raise RemoteProtocolError("protocol name too long", reason=RejectReason.MALFORMED)
            name = await channel.receive_body(length)
        except RemoteProtocolError as exc:
            self.stats.reject(exc.reason)
            return
        except StreamClosed:
            return
        assert isinstance(name, bytes)
        protocol = name.decode("utf-8", "replace")
        handler = self._stream_handlers.get(protocol)
        reason = (
            RejectReason.UNKNOWN_PROTOCOL
            if handler is None
            else self._admission.admit(peer, trio.current_time(), is_request=False)
        )
        if reason is not None:
            self.stats.reject(reason)
            await _send_quietly(channel, ERROR, 0, reason.value.encode())
            return
        assert handler is not None
        stream = SealedStream(channel, peer, protocol)
        try:
            await channel.send(ACCEPT, 0, b"")
            await handler(stream)
        except StreamClosed:
            pass
        except RemoteProtocolError as exc:
            self.stats.reject(exc.reason)
        except Exception:
            log.exception("stream handler failed", extra={"peer": peer.short()})
        finally:
            self._admission.release(peer)
            await stream.aclose()

    # -- libp2p ping ---------------------------------------------------------------------------

    async def _answers(self, peer: PeerId) -> bool:
        """Whether our connection to ``peer`` still carries a libp2p ping."""
        with trio.move_on_after(STALE_CHECK_S):
            with contextlib.suppress(TransportError):
                await self.ping(peer)
                return True
        return False

    async def ping(self, peer: PeerId) -> float:
        """One libp2p ping (``/ipfs/ping/1.0.0``) round trip, in seconds.

        Raises:
            PeerUnreachable: no answer.
        """
        started = trio.current_time()  # libp2p reports whole milliseconds: time it ourselves
        with _mapped(f"libp2p ping to {peer} failed"), trio.fail_after(HANDSHAKE_TIMEOUT_S):
            await self._ping.ping(_to_libp2p(peer))
        return trio.current_time() - started


def _agree(ephemeral: X25519PrivateKey, theirs: bytes) -> bytes:
    """The X25519 secret; a low-order key (an all-zero result) is [handshake_failed]."""
    try:
        return ephemeral.exchange(X25519PublicKey.from_public_bytes(theirs))
    except ValueError:
        raise RemoteProtocolError(
            "low-order X25519 key in a key exchange", reason=RejectReason.HANDSHAKE_FAILED
        ) from None


def _parse_exchange(data: bytes) -> tuple[bytes, bytes, int]:
    try:
        version, key, nonce, port = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise RemoteProtocolError(
            f"bad key exchange: {exc}", reason=RejectReason.HANDSHAKE_FAILED
        ) from None
    if (
        version != 1
        or type(key) is not bytes
        or len(key) != 32
        or type(nonce) is not bytes
        or len(nonce) != NONCE_BYTES
        or type(port) is not int
        or not 0 <= port < 65536  # 0: the peer accepts no inbound connections
    ):
        raise RemoteProtocolError("bad key exchange fields", reason=RejectReason.HANDSHAKE_FAILED)
    return key, nonce, port


async def _send_quietly(channel: SealedSocket, frame_type: int, frame_id: int, data: bytes) -> None:
    """Answer if the connection still exists; a vanished peer is not our error."""
    with contextlib.suppress(StreamClosed):
        await channel.send(frame_type, frame_id, data)
