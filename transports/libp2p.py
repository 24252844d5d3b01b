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

import contextlib
import itertools
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
import multiaddr
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_noise_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import PingService
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from meshfed.errors import (
    PeerUnreachable,
    RemoteProtocolError,
    RequestFailed,
    StreamClosed,
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

from ._limits import PeerAdmission
from ._sealed import (
    HELLO_BYTES,
    NONCE_BYTES,
    SESSION_ID_BYTES,
    SealedSocket,
    derive_connection_keys,
    derive_session,
    fresh_nonce,
)

__all__ = ["Libp2pTransport", "route_libp2p_logs"]

log = logging.getLogger(__name__)

SESSION_PROTOCOL = TProtocol("/meshfed/session/1")
HANDSHAKE_TIMEOUT_S = 5.0
DIAL_TIMEOUT_S = 10.0
STALE_CHECK_S = 2.0  # a connected peer that does not answer a ping in this long is re-dialled

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
class _Control:
    """A control connection with one peer: requests both ways, answers matched by id."""

    channel: SealedSocket
    waiters: dict[int, tuple[trio.Event, list[bytes | Exception]]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    broken: bool = False

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
        self.broken = True
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
        self.host = new_host(
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
        self._request_handlers: dict[str, RequestHandler] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._sessions: dict[PeerId, _Session] = {}
        self._inbound_sessions: dict[bytes, tuple[PeerId, bytes]] = {}
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
        try:
            async with self.host.run(self._listen), trio.open_nursery() as nursery:
                self._nursery = nursery
                if listener is not None:
                    nursery.start_soon(self._accept_loop, listener)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            if listener is not None:
                listener.close()
            for sock in list(self._sockets):
                sock.close()
            for control in self._controls.values():
                control.fail_all(PeerUnreachable("the transport stopped"))
            self._controls.clear()

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
        except Exception as exc:
            raise PeerUnreachable(f"{addr!r} is not a multiaddr with /p2p/<id>: {exc}") from None
        peer = _from_libp2p(info.peer_id)
        if peer in self.connected_peers() and not await self._answers(peer):
            # A connection that no longer answers (its interface went away; TCP has not
            # noticed): close it, so that the dial below opens a fresh one.
            with trio.move_on_after(STALE_CHECK_S):
                await self.host.disconnect(info.peer_id)
            self._sessions.pop(peer, None)
            control = self._controls.pop(peer, None)
            if control is not None:  # its sealed connection went the same way
                control.fail_all(PeerUnreachable(f"the connection to {peer} went stale"))
                with contextlib.suppress(OSError):  # its reader sees the end and cleans up
                    control.channel.sock.shutdown(trio.socket.SHUT_RDWR)
        # Dial the address asked for: the peerstore may hold others that no longer work (from
        # an interface that went, or a wildcard a peer's identify message reported).
        self.host.get_peerstore().clear_addrs(info.peer_id)
        # ... and now: py-libp2p refuses for 60 s to dial a peer whose last dial failed (its
        # negative cache), so a peer that starts after us would stay unreachable.
        self.host.get_network().unblock_peer(info.peer_id)
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                await self.host.connect(info)
        except (Exception, trio.TooSlowError) as exc:
            raise PeerUnreachable(f"cannot reach {addr}: {exc}") from exc
        await self._session(peer)
        return peer

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
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                stream = await self.host.new_stream(_to_libp2p(peer), [SESSION_PROTOCOL])
                try:
                    await stream.write(msgpack.packb([1, ours, nonce, self._sealed_port]))
                    answer = await stream.read(256)
                    remote = _remote_host(stream)
                finally:
                    await stream.close()
        except (Exception, trio.TooSlowError) as exc:
            raise PeerUnreachable(f"key exchange with {peer} failed: {exc}") from exc
        theirs, their_nonce, port = _parse_exchange(answer)
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(theirs))
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
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                theirs, their_nonce, _port = _parse_exchange(await stream.read(256))  # type: ignore[attr-defined]
                ephemeral = X25519PrivateKey.generate()
                ours = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
                nonce = fresh_nonce()
                shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(theirs))
                session_id, key = derive_session(
                    shared,
                    dialer=peer.raw,
                    listener=self.local_peer.raw,
                    transcript=theirs + ours + their_nonce + nonce,
                )
                # Known before the answer leaves: the dialer may open a sealed connection the
                # moment it reads it.
                self._inbound_sessions[session_id] = (peer, key)
                await stream.write(msgpack.packb([1, ours, nonce, self._sealed_port]))  # type: ignore[attr-defined]
                remote = _remote_host(stream)
        except RemoteProtocolError as exc:
            self.stats.reject(exc.reason)
            await stream.reset()  # type: ignore[attr-defined]
            return
        except (Exception, trio.TooSlowError):  # libp2p raises many types on a broken stream
            self.stats.reject(RejectReason.HANDSHAKE_FAILED)
            return
        finally:
            await stream.close()  # type: ignore[attr-defined]
        # The dialer can now be reached back without a dial of its own.
        if peer not in self._sessions and remote:
            reverse = await self._exchange_keys_quietly(peer)
            if reverse is not None:
                self._sessions.setdefault(peer, reverse)

    async def _exchange_keys_quietly(self, peer: PeerId) -> _Session | None:
        try:
            return await self._exchange_keys(peer)
        except PeerUnreachable:
            return None

    # -- sealed connections --------------------------------------------------------------------

    async def _dial_sealed(self, peer: PeerId, kind: int) -> SealedSocket:
        fresh = peer not in self._sessions
        session = await self._session(peer)
        if session.sealed_port == 0:
            raise PeerUnreachable(f"{peer} accepts no inbound connections (client mode)")
        try:
            return await self._handshake(session, kind)
        except (OSError, trio.TooSlowError) as exc:
            self._sessions.pop(peer, None)  # the peer may have restarted: exchange keys anew
            if fresh:
                raise PeerUnreachable(f"sealed connection to {peer} failed: {exc}") from exc
        try:  # once more, with a session made just now
            return await self._handshake(await self._session(peer), kind)
        except (OSError, trio.TooSlowError) as exc:
            self._sessions.pop(peer, None)
            raise PeerUnreachable(f"sealed connection to {peer} failed: {exc}") from exc

    async def _handshake(self, session: _Session, kind: int) -> SealedSocket:
        """Open and key one sealed connection (raises ``OSError`` or ``TooSlowError``)."""
        family = trio.socket.AF_INET6 if ":" in session.host else trio.socket.AF_INET
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
        sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        client_nonce = fresh_nonce()
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await sock.connect((session.host, session.sealed_port))
                await sock.send(session.session_id + client_nonce + bytes([kind]))
                server_nonce = await _receive_exactly(sock, NONCE_BYTES)
        except BaseException:
            sock.close()
            raise
        dialer_key, listener_key = derive_connection_keys(
            session.key,
            session_id=session.session_id,
            client_nonce=client_nonce,
            server_nonce=server_nonce,
            kind=kind,
        )
        max_frame = self.limits.max_frame_bytes + _REQUEST_OVERHEAD
        return SealedSocket(sock, dialer_key, listener_key, max_frame, self.stats)

    async def _accept_loop(self, listener: trio.socket.SocketType) -> None:
        while True:
            sock, _ = await listener.accept()
            sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            self._spawn(self._serve_sealed, sock)

    async def _serve_sealed(self, sock: trio.socket.SocketType) -> None:
        self._sockets.add(sock)
        try:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    hello = await _receive_exactly(sock, HELLO_BYTES)
                    known = self._inbound_sessions.get(hello[:SESSION_ID_BYTES])
                    kind = hello[-1]
                    if known is None or kind not in (CONTROL, STREAM):
                        raise RemoteProtocolError(
                            "unknown session", reason=RejectReason.HANDSHAKE_FAILED
                        )
                    server_nonce = fresh_nonce()
                    await sock.send(server_nonce)
            except (OSError, trio.TooSlowError, RemoteProtocolError):
                self.stats.reject(RejectReason.HANDSHAKE_FAILED)
                return
            peer, key = known
            dialer_key, listener_key = derive_connection_keys(
                key,
                session_id=hello[:SESSION_ID_BYTES],
                client_nonce=hello[SESSION_ID_BYTES : SESSION_ID_BYTES + NONCE_BYTES],
                server_nonce=server_nonce,
                kind=kind,
            )
            channel = SealedSocket(
                sock,
                listener_key,
                dialer_key,
                self.limits.max_frame_bytes + _REQUEST_OVERHEAD,
                self.stats,
            )
            if kind == CONTROL:
                control = _Control(channel)
                if self._controls.get(peer) is None:
                    self._controls[peer] = control  # our requests may ride it back
                await self._run_control(peer, control)
            else:
                await self._serve_stream(peer, channel)
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
        if control is not None and not control.broken:
            return control
        lock = self._control_locks.setdefault(peer, trio.Lock())
        async with lock:
            control = self._controls.get(peer)
            if control is None or control.broken:
                channel = await self._dial_sealed(peer, CONTROL)
                control = self._controls[peer] = _Control(channel)
                self._spawn(self._run_control, peer, control)
        return control

    async def _run_control(self, peer: PeerId, control: _Control) -> None:
        """Serve one control connection, whichever side dialed it: requests from the peer are
        answered, answers to ours go to their waiters. So a peer that cannot accept connections
        (client mode) is still reached over the connection it dialed."""
        channel = control.channel
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    length, frame_type, frame_id = await channel.receive_header()
                    if (
                        frame_type == REQUEST
                        and length > self.limits.max_frame_bytes + _REQUEST_OVERHEAD
                    ):
                        self.stats.reject(RejectReason.OVERSIZED)
                        await channel.skip_body(length)
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
            with contextlib.suppress(PeerUnreachable):
                await self.ping(peer)
                return True
        return False

    async def ping(self, peer: PeerId) -> float:
        """One libp2p ping (``/ipfs/ping/1.0.0``) round trip, in seconds.

        Raises:
            PeerUnreachable: no answer.
        """
        started = trio.current_time()  # libp2p reports whole milliseconds: time it ourselves
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await self._ping.ping(_to_libp2p(peer))
        except (Exception, trio.TooSlowError) as exc:
            raise PeerUnreachable(f"libp2p ping to {peer} failed: {exc}") from exc
        return trio.current_time() - started


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


async def _receive_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        received = await sock.recv_into(view[got:], n - got)
        if received == 0:
            raise OSError("connection closed during the handshake")
        got += received
    return bytes(buffer)


async def _send_quietly(channel: SealedSocket, frame_type: int, frame_id: int, data: bytes) -> None:
    """Answer if the connection still exists; a vanished peer is not our error."""
    with contextlib.suppress(StreamClosed):
        await channel.send(frame_type, frame_id, data)
