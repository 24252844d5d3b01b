"""Harness: the onion layer's network side (SPEC.md, "Onion routing") as a mesh of six nodes
sees it: :meth:`~meshfed.onion.relay.Relay.process` at every hop, then what the driver does
with the result (``OnionService._accept``): a delivered body into the node's
:class:`~meshfed.onion.fragments.Reassembler`, a whole request through ``decode``,
``Surb.from_bytes`` and ``decode_body`` and answered on its SURBs (``packet_from_surb``), a
reply opened by the maker's :class:`~meshfed.onion.surb.SurbBook` and reassembled and decoded.
The trio driver itself (sending, delays, stores) is not run.

Senders build real packets (paths of 1 to ``MAX_HOPS`` hops over the fixed nodes, requests
of one to three fragments with one or two SURBs, for the current epoch or with a mismatched
one); the attacker delivers what is in flight in any order, again (replay), altered (bits
flipped anywhere in header or payload, truncated, extended, the epoch rewritten, alpha made
a low-order point, header and payload of two packets spliced) or as junk, sends more replies
on a used SURB, feeds any bodies and messages to a node's reassemblers, restarts a node
without its replay cache, and moves the clock through epochs and their retirement.

Checked after every step:

- nothing but our own ``RemoteProtocolError`` leaves a decoder; the relay, the reassembler
  and the book never raise and return one documented action;
- an unaltered packet follows its path (each hop forwards it to the next hop it was built
  for, the last delivers the body it was built with), unless it is a replay, its epoch is not
  held or a cache is full;
- an altered packet never delivers: no body, no opened reply (header changes are dropped at
  the next hop, payload changes at the destination or the SURB's maker);
- a header a node peeled before is dropped there as a replay (until that node forgets its
  cache or the epoch retires): also a second reply on one SURB;
- a SURB opens at most one reply, ever, carrying a body its replier sent on it;
- a reassembled message with an honest id is the message sent, to that node, once within
  the reassembly timeout; every decoder accepts what honest nodes send;
- the reassemblers, replay caches and SURB books stay within their bounds.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from meshfed.control import Text
from meshfed.errors import RemoteProtocolError
from meshfed.identity import Identity
from meshfed.onion import (
    BODY_SIZE,
    MAX_HOPS,
    PACKET_SIZE,
    Deliver,
    DeliverReply,
    Drop,
    DropReason,
    EpochSchedule,
    Forward,
    Hop,
    KeyRing,
    Reassembled,
    Reassembler,
    Relay,
    ReplayCache,
    Surb,
    SurbBook,
    SurbSecrets,
    build_packet,
    build_surb,
    derive_epoch_secret,
    fragment,
    packet_from_surb,
)
from meshfed.onion.events import RelayAction
from meshfed.onion.fragments import FRAGMENT_CAPACITY, MESSAGE_ID_SIZE
from meshfed.onion.messages import (
    OnionPacket,
    OnionReply,
    OnionRequest,
    decode,
    decode_body,
    encode,
    encode_body,
)
from meshfed.onion.packet import HEADER_SIZE
from meshfed.onion.primitives import x25519_base

from ._common import Reader, Writer, through_wire

SCHEDULE = EpochSchedule(period=3600.0, grace=600.0)
#: the harness's start time: inside EPOCH, 1,000 s from its start
EPOCH = 486_000
T0 = EPOCH * SCHEDULE.period + 1000.0
#: the epochs every node holds a key for (the current and the next, as a node publishes)
HELD = (EPOCH, EPOCH + 1)
NODES = 6
IDENTITIES = tuple(
    Identity.from_seeds(bytes([41 + i]) * 32, bytes([141 + i]) * 32) for i in range(NODES)
)
PEERS = tuple(identity.peer_id for identity in IDENTITIES)
_INDEX = {peer: i for i, peer in enumerate(PEERS)}
#: each node's onion secret and public key by epoch (fixed, derived from a seed per node)
SECRETS = {(i, e): derive_epoch_secret(bytes([i + 1]) * 32, e) for i in range(NODES) for e in HELD}
PUBLIC = {key: x25519_base(secret) for key, secret in SECRETS.items()}

# Small bounds, so that a few steps reach them.
MAX_TAGS = 24
MAX_PENDING = 3
MAX_HELD = 4 * FRAGMENT_CAPACITY
MAX_SURBS = 4
TIMEOUT = 60.0
MAX_FLIGHT = 48
#: "for whom" of a reply message (its maker is whoever made the SURBs)
REPLY = -1

#: request body sizes (Text characters): one, two and three fragments of request
SIZES = (0, 40, 1200, 2600, 4000)
#: per-hop delays a sender may choose
DELAYS = (0, 50, 60_000)
#: epochs a sender may build for (the last held by nobody)
EPOCHS = (EPOCH, EPOCH + 1, EPOCH - 1, EPOCH + 7)
#: points of small order (alpha the attacker may write)
LOW_ORDER = (bytes(32), (1).to_bytes(32, "little"), bytes([0xE0, 0xEB, 0x7A, 0x7C]) + bytes(28))

SEND, DELIVER, REUSE_SURB, INJECT, TICK, FORGET, JUNK = range(7)
STEPS = 7
# How the attacker alters a packet on its way in.
AS_IS, FLIP_BIT, XOR_BYTE, TRUNCATE, EXTEND, EPOCH_FIELD, LOW_ALPHA, SPLICE = range(8)
ALTERATIONS = 8
#: drops that happen before a node records the packet's replay tag
_BEFORE_TAG = {
    DropReason.WRONG_SIZE,
    DropReason.BAD_VERSION,
    DropReason.UNKNOWN_EPOCH,
    DropReason.BAD_ELEMENT,
    DropReason.BAD_MAC,
    DropReason.REPLAY_CACHE_FULL,
}
#: why an unaltered packet may fail to go on: a replay, an epoch not held, a full cache
_EXCUSED = {DropReason.REPLAYED, DropReason.UNKNOWN_EPOCH, DropReason.REPLAY_CACHE_FULL}


def _random(salt: bytes) -> Callable[[int], bytes]:
    """A deterministic "random" source for one build (so builds can be cached and an input
    replays the same): each call gives the next bytes of a BLAKE2b stream keyed by ``salt``."""
    drawn = itertools.count()

    def random_bytes(n: int) -> bytes:
        out = b""
        while len(out) < n:
            block = next(drawn).to_bytes(8, "big")
            out += hashlib.blake2b(block, key=salt, digest_size=64).digest()
        return out[:n]

    return random_bytes


def _hops(route: tuple[int, ...], key_epoch: int, delay_ms: int) -> list[Hop]:
    return [Hop(PEERS[i], PUBLIC[(i, key_epoch)], delay_ms) for i in route]


@functools.lru_cache(maxsize=4096)
def _packet(
    route: tuple[int, ...], body: bytes, epoch: int, key_epoch: int, delay_ms: int, salt: bytes
) -> bytes:
    hops = _hops(route, key_epoch, delay_ms)
    return build_packet(hops, body, epoch=epoch, random_bytes=_random(salt)).packet


@functools.lru_cache(maxsize=1024)
def _surb(route: tuple[int, ...], delay_ms: int, salt: bytes) -> tuple[Surb, SurbSecrets]:
    hops = _hops(route, EPOCH, delay_ms)
    return build_surb(hops, epoch=EPOCH, random_bytes=_random(salt))


@dataclass(frozen=True)
class _InFlight:
    """A packet on its way into node ``to``. While it is as an honest sender built it, the
    hops still ahead (``to`` first), the body it carries (padded) and, for a reply, its
    SURB's id are known; an altered or forged packet has none of them."""

    to: int
    packet: bytes
    route: tuple[int, ...] | None = None
    body: bytes | None = None
    surb_id: bytes | None = None

    @property
    def honest(self) -> bool:
        return self.route is not None


@dataclass
class _Node:
    relay: Relay
    book: SurbBook
    inbox: Reassembler
    replies: Reassembler
    #: headers this node peeled (its replay cache holds their tags), with their epoch
    peeled: dict[bytes, int] = field(default_factory=dict)


def _node(index: int) -> _Node:
    ring = KeyRing(SCHEDULE)
    for epoch in HELD:
        ring.install(epoch, SECRETS[(index, epoch)])
    return _Node(
        Relay(ring, ReplayCache(max_tags_per_epoch=MAX_TAGS)),
        SurbBook(max_open=MAX_SURBS),
        Reassembler(timeout=TIMEOUT, max_messages=MAX_PENDING, max_bytes=MAX_HELD),
        Reassembler(timeout=TIMEOUT, max_messages=MAX_PENDING, max_bytes=MAX_HELD),
    )


class _Mesh:
    """Six nodes, the packets in flight, and what the honest senders sent (the oracle)."""

    def __init__(self) -> None:
        self.nodes = [_node(i) for i in range(NODES)]
        self.flight: list[_InFlight] = []
        self.now = T0
        self.built = 0
        #: honest message id -> (the node it is for, the message)
        self.messages: dict[bytes, tuple[int, bytes]] = {}
        #: (node, message id) -> when it was last reassembled there
        self.completed: dict[tuple[int, bytes], float] = {}
        #: honest SURBs (as bytes) -> (their id, the route back to their maker)
        self.surbs: dict[bytes, tuple[bytes, tuple[int, ...]]] = {}
        #: SURB id -> the bodies (padded) sent on it
        self.sent_on: dict[bytes, set[bytes]] = {}
        self.opened: set[bytes] = set()

    def fresh(self, n: int = MESSAGE_ID_SIZE) -> bytes:
        """A new honest id or salt: deterministic, so that builds repeat across inputs and
        their cache works (the first byte is zero: an attacker's ids never start so)."""
        self.built += 1
        return self.built.to_bytes(n, "big")

    def fly(self, entry: _InFlight) -> None:
        if len(self.flight) < MAX_FLIGHT:
            self.flight.append(entry)

    # -- senders -----------------------------------------------------------------------------

    def send_request(self, reader: Reader) -> None:
        """A node asks another over 0..4 relays (any nodes, repeats allowed), with 1 or 2
        SURBs, for a chosen epoch under keys of a chosen epoch (forged when they differ)."""
        sender, dest = reader.below(NODES), reader.below(NODES)
        route = (*(reader.below(NODES) for _ in range(reader.below(MAX_HOPS))), dest)
        epoch, key_epoch = EPOCHS[reader.below(len(EPOCHS))], HELD[reader.below(len(HELD))]
        delay = DELAYS[reader.below(len(DELAYS))]
        surbs = []
        for _ in range(1 + reader.below(2)):
            back = (*(reader.below(NODES) for _ in range(reader.below(MAX_HOPS))), sender)
            surb, secrets = _surb(back, delay, self.fresh(8))
            if len(self.nodes[sender].book) < MAX_SURBS:
                self.nodes[sender].book.add(secrets, expires_at=SCHEDULE.retires_at(EPOCH))
            self.surbs[surb.to_bytes()] = (secrets.surb_id, back)
            surbs.append(surb.to_bytes())
        text = Text(text="q" * SIZES[reader.below(len(SIZES))])
        message = encode(OnionRequest(self.fresh(), surbs, Text.TYPE, encode_body(text)))
        message_id = self.fresh()
        self.messages[message_id] = (dest, message)
        for body in fragment(message, message_id):
            packet = _packet(route, body, epoch, key_epoch, delay, self.fresh(8))
            if epoch == key_epoch:
                self.fly(_InFlight(route[0], packet, route, body))
            else:
                self.fly(_InFlight(route[0], packet))

    def answer(self, request: OnionRequest, surbs: list[Surb]) -> None:
        """What the destination's driver does with a request (``OnionService._serve`` and
        ``_answer``, with an echo handler): the reply, one fragment per SURB."""
        try:
            echo = decode_body(request.type, request.body)
            reply = OnionReply(request.request_id, echo.TYPE, encode_body(echo))
        except RemoteProtocolError as exc:
            reply = OnionReply(request.request_id, error=str(exc.reason))
        message_id = self.fresh()
        bodies = fragment(encode(reply), message_id)
        if len(bodies) > len(surbs):
            reply = OnionReply(request.request_id, error="reply_too_large")
            bodies = fragment(encode(reply), message_id)
        self.messages[message_id] = (REPLY, encode(reply))
        for body, surb in zip(bodies, surbs, strict=False):
            self.reply_on(surb, body)

    def reply_on(self, surb: Surb, body: bytes) -> None:
        out = packet_from_surb(surb, body)
        to = _INDEX.get(out.first_hop)
        known = self.surbs.get(surb.to_bytes())
        if known is None:  # a SURB an attacker made up: its packet is forged
            if to is not None:
                self.fly(_InFlight(to, out.packet))
            return
        surb_id, route = known
        padded = body.ljust(BODY_SIZE, b"\0")
        self.sent_on.setdefault(surb_id, set()).add(padded)
        self.fly(_InFlight(route[0], out.packet, route, padded, surb_id))

    # -- the attacker ------------------------------------------------------------------------

    def alter(self, reader: Reader, entry: _InFlight) -> _InFlight:
        """``entry`` as the attacker delivers it."""
        packet = entry.packet
        how = reader.below(ALTERATIONS)
        if how == FLIP_BIT and packet:
            at = reader.below(len(packet) * 8)
            packet = _xor_at(packet, at // 8, 1 << (at % 8))
        elif how == XOR_BYTE and packet:  # the header's bytes as likely as the payload's
            region = HEADER_SIZE if reader.flag() else len(packet)
            packet = _xor_at(packet, reader.below(min(region, len(packet))), 1 + reader.below(255))
        elif how == TRUNCATE:
            packet = packet[: reader.below(len(packet) + 1)]
        elif how == EXTEND:
            packet = packet + reader.sized(64)
        elif how == EPOCH_FIELD:
            packet = packet[:1] + EPOCHS[reader.below(len(EPOCHS))].to_bytes(4, "big") + packet[5:]
        elif how == LOW_ALPHA:
            packet = packet[:5] + LOW_ORDER[reader.below(len(LOW_ORDER))] + packet[37:]
        elif how == SPLICE:
            other = self.flight[reader.below(len(self.flight))].packet
            packet = packet[:HEADER_SIZE] + other[HEADER_SIZE:]
        same = [e for e in self.flight if e.packet == packet and e.to == entry.to]
        return same[0] if same else _InFlight(entry.to, packet)

    def reuse_surb(self, reader: Reader) -> None:
        """Whoever holds a SURB (its destination) sends another reply on it."""
        if self.surbs:
            surbs = list(self.surbs)
            surb = Surb.from_bytes(surbs[reader.below(len(surbs))])
            self.reply_on(surb, reader.sized(BODY_SIZE))

    def inject(self, reader: Reader) -> None:
        """Any body into a node's reassembler (anyone can build packets for a node; the
        holder of a SURB can put anything in the reply), or a whole message of any bytes."""
        index, replies = reader.below(NODES), reader.flag()
        if reader.flag():
            message_id = b"\xff" + reader.take(MESSAGE_ID_SIZE - 1).ljust(15, b"\0")
            bodies = fragment(reader.sized(2 * FRAGMENT_CAPACITY), message_id)
        else:
            raw = bytearray(reader.sized(BODY_SIZE + 8).ljust(BODY_SIZE, b"\0"))
            if raw[0] == 0:  # an honest message's id is the attacker's only by chance
                raw[0] = 0xFF
            bodies = [bytes(raw)]
        for body in bodies:
            self.reassemble(index, body, replies=replies)

    # -- a node's driver ---------------------------------------------------------------------

    def deliver(self, entry: _InFlight) -> None:
        """``OnionService._on_packet`` and ``_accept`` at node ``entry.to``."""
        node = self.nodes[entry.to]
        try:
            link = through_wire(OnionPacket, [entry.packet])
        except RemoteProtocolError:
            link = None
        if link is not None and len(link.packet) != PACKET_SIZE:
            raise AssertionError("the link message let a packet of the wrong size through")
        header = entry.packet[:HEADER_SIZE]
        peeled_before = header in node.peeled and len(entry.packet) == PACKET_SIZE
        action = node.relay.process(entry.packet, self.now)
        again = (DropReason.REPLAYED, DropReason.UNKNOWN_EPOCH)
        if peeled_before and not (isinstance(action, Drop) and action.reason in again):
            raise AssertionError(f"node {entry.to} peeled a header again: {_name(action)}")
        if not isinstance(action, Drop) or action.reason not in _BEFORE_TAG:
            node.peeled.setdefault(header, int.from_bytes(entry.packet[1:5], "big"))
        if isinstance(action, Drop):
            if entry.honest and action.reason not in _EXCUSED:
                raise AssertionError(f"an unaltered packet was dropped as {action.reason}")
        elif isinstance(action, Forward):
            self._forward(entry, action)
        elif isinstance(action, Deliver):
            if not entry.honest or entry.surb_id is not None or action.body != entry.body:
                raise AssertionError("a node was delivered a body it was not sent")
            if entry.route != (entry.to,):
                raise AssertionError("a packet was delivered before the end of its path")
            self.reassemble(entry.to, action.body, replies=False)
        else:
            if entry.honest and (entry.route != (entry.to,) or action.surb_id != entry.surb_id):
                raise AssertionError("a reply ended elsewhere than at its SURB's maker")
            self._open(entry, action)

    def _forward(self, entry: _InFlight, action: Forward) -> None:
        if len(action.packet) != PACKET_SIZE or not 0 <= action.delay <= 60:
            raise AssertionError("a relay forwards a packet of the wrong size or delay")
        to = _INDEX.get(action.next_hop)
        if entry.route is None:
            if to is not None:
                self.fly(_InFlight(to, action.packet))
            return
        if entry.route[1:2] != (to,):
            raise AssertionError("an unaltered packet left its path")
        self.fly(
            _InFlight(entry.route[1], action.packet, entry.route[1:], entry.body, entry.surb_id)
        )

    def _open(self, entry: _InFlight, action: DeliverReply) -> None:
        """``OnionService._reply_delivered``: the book opens it, then the reply reassembler."""
        opened = self.nodes[entry.to].book.open(action.surb_id, action.payload, self.now)
        if isinstance(opened, Drop):
            return
        if not entry.honest or opened.body != entry.body:
            raise AssertionError("a SURB opened a reply its replier did not send")
        if action.surb_id in self.opened:
            raise AssertionError("a SURB opened a second reply")
        self.opened.add(action.surb_id)
        self.reassemble(entry.to, opened.body, replies=True)

    def reassemble(self, index: int, body: bytes, *, replies: bool) -> None:
        """A delivered body into the node's reassembler; a whole message decoded (and a
        request answered) as the driver does."""
        node = self.nodes[index]
        whole = (node.replies if replies else node.inbox).add(body, self.now)
        if not isinstance(whole, Reassembled):
            return
        honest = self.messages.get(whole.message_id)
        if honest is not None:
            for_whom, message = honest
            if whole.message != message or for_whom not in (index, REPLY):
                raise AssertionError("an honest message id reassembled to another message")
            last = self.completed.get((index, whole.message_id))
            if last is not None and self.now - last < TIMEOUT:
                raise AssertionError("a message was reassembled twice within the timeout")
            self.completed[(index, whole.message_id)] = self.now
        try:
            if replies:
                decode(OnionReply, whole.message)
            else:
                request = decode(OnionRequest, whole.message)
                self.answer(request, [Surb.from_bytes(surb) for surb in request.surbs])
        except RemoteProtocolError:
            if honest is not None:
                raise AssertionError("an honest message did not decode") from None

    def tick(self, seconds: float) -> None:
        """The clock moves on: nodes retire epochs, books expire SURBs (as ``maintain``)."""
        self.now += seconds
        for node in self.nodes:
            gone = node.relay.retire(self.now)
            node.peeled = {h: e for h, e in node.peeled.items() if e not in gone}
            node.book.expire(self.now)

    def forget(self, index: int) -> None:
        """Node ``index`` restarts without a store: its replay cache is empty."""
        node = self.nodes[index]
        node.relay.replay = ReplayCache(max_tags_per_epoch=MAX_TAGS)
        node.peeled.clear()

    def check_bounds(self) -> None:
        for node in self.nodes:
            for held in (node.inbox, node.replies):
                if not (0 <= held.held_bytes <= MAX_HELD and held.pending <= MAX_PENDING):
                    raise AssertionError("a reassembler holds more than its bounds")
            if len(node.book) > MAX_SURBS:
                raise AssertionError("a SURB book holds more than its bound")
            replay = node.relay.replay
            if len(replay) > MAX_TAGS * len(replay.epochs):
                raise AssertionError("a replay cache holds more than its bound")


def _name(action: RelayAction) -> str:
    return f"Drop({action.reason})" if isinstance(action, Drop) else type(action).__name__


def _xor_at(data: bytes, at: int, mask: int) -> bytes:
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


def test_one_input(data: bytes) -> None:
    """A scenario: honest requests, what the attacker does with their packets, the clock."""
    reader = Reader(data)
    mesh = _Mesh()
    for _ in range(1 + reader.below(32)):
        step = reader.below(STEPS)
        if step == SEND:
            mesh.send_request(reader)
        elif step == DELIVER and mesh.flight:
            entry = mesh.flight[reader.below(len(mesh.flight))]
            mesh.deliver(mesh.alter(reader, entry))
        elif step == REUSE_SURB:
            mesh.reuse_surb(reader)
        elif step == INJECT:
            mesh.inject(reader)
        elif step == TICK:
            mesh.tick(reader.uint(2) * 0.5)
        elif step == FORGET:
            mesh.forget(reader.below(NODES))
        elif step == JUNK:  # the right size and version, any epoch, any bytes
            to, epoch = reader.below(NODES), EPOCHS[reader.below(len(EPOCHS))]
            junk = (b"\1" + epoch.to_bytes(4, "big") + reader.sized(PACKET_SIZE))[:PACKET_SIZE]
            mesh.deliver(_InFlight(to, junk.ljust(PACKET_SIZE, b"\0")))
        mesh.check_bounds()


def _send(
    w: Writer, sender: int, dest: int, relays: list[int], backs: list[list[int]], size: int
) -> Writer:
    """The choices of a SEND step (current epoch, no delay)."""
    w.below(STEPS, SEND).below(NODES, sender).below(NODES, dest).below(MAX_HOPS, len(relays))
    for relay in relays:
        w.below(NODES, relay)
    w.below(len(EPOCHS), 0).below(len(HELD), 0).below(len(DELAYS), 0).below(2, len(backs) - 1)
    for back in backs:
        w.below(MAX_HOPS, len(back))
        for relay in back:
            w.below(NODES, relay)
    return w.below(len(SIZES), size)


def _deliver(w: Writer, flight: int, index: int, how: int = AS_IS) -> Writer:
    return w.below(STEPS, DELIVER).below(flight, index).below(ALTERATIONS, how)


def seeds() -> Iterator[bytes]:
    """A request over three relays answered over two; a request of three fragments
    delivered out of order and answered with ``reply_too_large``; each attack once."""
    w = _send(Writer().below(32, 7), 0, 5, [1, 2, 3], [[4, 2]], 1)
    for i in range(7):  # four hops there, three back
        _deliver(w, i + 1, i)
    yield w.build()
    w = _send(Writer().below(32, 7), 1, 2, [3], [[], []], 4)
    for i in (2, 0, 1, 4, 3, 5, 6):
        _deliver(w, 7 if i == 6 else 6 if i > 2 else 3 + [2, 0, 1].index(i), i)
    yield w.build()
    w = _send(Writer().below(32, 17), 0, 2, [1], [[3]], 0)
    _deliver(w, 1, 0, FLIP_BIT).uint(2, 8 * 40 + 3)  # gamma: dropped
    _deliver(w, 1, 0, XOR_BYTE).uint(1, 1).uint(2, 200).uint(1, 7)  # beta: dropped
    _deliver(w, 1, 0)
    _deliver(w, 2, 0)  # a replay
    _deliver(w, 2, 1)  # delivered: the reply goes to node 3
    w.below(STEPS, REUSE_SURB).below(1, 0).sized(b"a second reply")
    _deliver(w, 4, 3)  # the second reply first: node 3 forwards it
    _deliver(w, 5, 2)  # the honest reply: a replay at node 3
    _deliver(w, 5, 4)  # the second reply opens at the maker
    w.below(STEPS, FORGET).below(NODES, 3)
    _deliver(w, 5, 2)  # node 3 forgot: forwarded again
    _deliver(w, 6, 5)  # a replay at the maker
    w.below(STEPS, FORGET).below(NODES, 0)
    _deliver(w, 6, 5)  # the maker forgot too: the book has used the SURB up
    w.below(STEPS, TICK).uint(2, 14_000)  # past the epoch's end and grace
    _deliver(w, 6, 1)  # an epoch retired
    w.below(STEPS, JUNK).below(NODES, 1).below(len(EPOCHS), 0).sized(bytes(range(200)))
    yield w.build()
    w = Writer().below(32, 2).below(STEPS, INJECT).below(NODES, 2).uint(1, 0).uint(1, 1)
    w.raw(bytes(15)).sized(b"\x93\xc4\x10" + bytes(16) + b"\x90\xa0")
    w.below(STEPS, INJECT).below(NODES, 2).uint(1, 1).uint(1, 0).sized(b"\x01" * 40)
    yield w.build()
