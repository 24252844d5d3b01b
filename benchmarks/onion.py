"""What Sphinx packets cost, next to a plain one-shot X25519 + ChaCha20-Poly1305 seal of the
same body measured in the same run (no network: the cores alone, on one core).

Prints one JSON line:

- ``packet_size``, ``body_size``, ``overhead_bytes`` (packet minus body) and
  ``seal_overhead_bytes`` (ephemeral key + tag), ``size_ratio`` (packet / sealed body);
- ``build_per_s`` and ``build_ms``: packets built for a path of ``--hops`` (4: three relays
  and the destination, the ``high`` level); ``seal_per_s``: plain seals of one body;
  ``build_ratio``: seal rate / build rate;
- ``relay_packets_per_s`` and ``relay_overhead_ms``: packets one relay core peels and
  forwards (an intermediate hop: MAC, replay check, routing, Lioness, blinding);
  ``deliver_per_s``: peels at the destination; ``open_per_s``: plain opens of one body;
  ``relay_ratio``: open rate / relay rate;
- ``surb_reply_per_s``: replies built on a SURB and opened by its maker (the relays' work not
  included).

Then, over the network (libp2p on 127.0.0.1, real nodes with their stores, mixing delays
off), the median round trip of a one-packet request and its answer from a sender to a
destination through ``--relays`` relays: ``direct_ms`` (``privacy="low"``: a signed request
straight to the destination), ``hop1_ms`` (``medium``: one relay each way), ``hop3_ms``
(``high``: three relays each way), and the ratios ``hop1_ratio`` and ``hop3_ratio`` to the
direct request; ``hop3_extra_ms`` is ``hop3_ms - direct_ms``. Every node runs on this
process's one trio thread, so ``direct_cpu_ms``, ``hop1_cpu_ms`` and ``hop3_cpu_ms`` (the
median CPU time of that thread per request: every node's work for it) are the cost itself,
which a shared machine's load does not stretch as it stretches the wall clock. Every hop
writes the packet's replay tag to its store before it acts (kept through ``kill -9``, no
fsync): ``--no-store`` measures without stores.

Usage: python benchmarks/onion.py [--packets 2000] [--hops 4] [--quick] [--rounds 30]
       [--no-network] [--no-store]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshfed import Node, NodeConfig, open_node
from meshfed.control import Text
from meshfed.identity import Identity
from meshfed.onion import (
    BODY_SIZE,
    PACKET_SIZE,
    Deliver,
    DeliverReply,
    EpochSchedule,
    Forward,
    Hop,
    KeyRing,
    OpenedReply,
    Relay,
    ReplayCache,
    SurbBook,
    build_packet,
    build_surb,
    packet_from_surb,
)

NOW = 1_765_000_000.0
SCHEDULE = EpochSchedule()
EPOCH = SCHEDULE.epoch_at(NOW)
_RAW = (Encoding.Raw, PublicFormat.Raw)
T = TypeVar("T")


def _rate(count: int, action: Callable[[int], T]) -> tuple[float, list[T]]:
    """Calls per second of ``action(0) ... action(count - 1)``, and what they returned."""
    results = []
    start = time.perf_counter()
    for i in range(count):
        results.append(action(i))
    return count / (time.perf_counter() - start), results


def _node() -> tuple[Identity, KeyRing]:
    ring = KeyRing(SCHEDULE)
    ring.install(EPOCH, os.urandom(32))
    return Identity.generate(), ring


def _seal(recipient: bytes, body: bytes) -> bytes:
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    key = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"bench").derive(shared)
    public = ephemeral.public_key().public_bytes(*_RAW)
    return public + ChaCha20Poly1305(key).encrypt(bytes(12), body, None)


def _open(secret: X25519PrivateKey, sealed: bytes) -> bytes:
    shared = secret.exchange(X25519PublicKey.from_public_bytes(sealed[:32]))
    key = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"bench").derive(shared)
    return ChaCha20Poly1305(key).decrypt(bytes(12), sealed[32:], None)


async def _network(rounds: int, relays: int, store: bool) -> dict[str, Any]:
    """Median request round trips per privacy level among real nodes (see the docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            nodes: list[Node] = []

            async def run(config: NodeConfig, task_status: Any) -> None:
                async with open_node(config) as node:
                    task_status.started(node)
                    await trio.sleep_forever()

            for i in range(relays + 2):
                config = NodeConfig(
                    data_dir=Path(tmp) / str(i),
                    store_file="store.sqlite3" if store else "",
                    roles=["relay"] if i < relays else ["trainer"],
                    bootstrap=nodes[0].listen_addrs[:1] if nodes else [],
                    mdns=False,
                    market=False,
                    api="off",
                    ping_interval_s=0,
                    gossip_interval_s=0.5,
                    onion_distinct_prefixes=False,  # one host: one /24
                )
                nodes.append(await nursery.start(run, config))
            dest, sender = nodes[-2], nodes[-1]
            assert dest.onion is not None and sender.onion is not None and sender.membership

            async def echo(text: Text) -> Text:
                return text

            dest.onion.handle(Text, echo, direct=True)
            while not all(  # noqa: ASYNC110 - gossip has no event to wait on
                (record := sender.membership.table.get(node.peer_id)) is not None
                and record.capabilities.onion_keys
                for node in nodes[:-1]
            ):
                await trio.sleep(0.1)
            figures = {}
            for key, level in (("direct", "low"), ("hop1", "medium"), ("hop3", "high")):
                times, cpu = [], []
                for i in range(rounds + 3):  # the first three open connections: not counted
                    started, cpu_started = time.perf_counter(), time.thread_time()
                    await sender.onion.request(dest.peer_id, Text(text=str(i)), privacy=level)
                    if i >= 3:
                        times.append((time.perf_counter() - started) * 1000)
                        cpu.append((time.thread_time() - cpu_started) * 1000)
                figures[f"{key}_ms"] = round(statistics.median(times), 3)
                figures[f"{key}_cpu_ms"] = round(statistics.median(cpu), 3)
            nursery.cancel_scope.cancel()
    direct = figures["direct_ms"]
    return {
        **figures,
        "hop1_ratio": round(figures["hop1_ms"] / direct, 2),
        "hop3_ratio": round(figures["hop3_ms"] / direct, 2),
        "hop3_extra_ms": round(figures["hop3_ms"] - direct, 3),
        "hop3_extra_cpu_ms": round(figures["hop3_cpu_ms"] - figures["direct_cpu_ms"], 3),
        "network_rounds": rounds,
        "stores": store,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=2000)
    parser.add_argument("--hops", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="200 packets, 10 rounds")
    parser.add_argument("--rounds", type=int, default=30, help="requests per privacy level")
    parser.add_argument("--relays", type=int, default=3)
    parser.add_argument("--no-network", action="store_true", help="the cores only")
    parser.add_argument("--no-store", action="store_true", help="nodes without stores")
    args = parser.parse_args()
    count = 200 if args.quick else args.packets
    rounds = 10 if args.quick else args.rounds

    nodes = [_node() for _ in range(max(args.hops, 2))]
    path = [Hop(ident.peer_id, ring.public_key(EPOCH)) for ident, ring in nodes[: args.hops]]
    body = os.urandom(BODY_SIZE)

    build_rate, built = _rate(
        count, lambda _: build_packet(path, body, epoch=EPOCH, random_bytes=os.urandom).packet
    )
    relay = Relay(nodes[0][1], ReplayCache())
    relay_rate, forwards = _rate(count, lambda i: relay.process(built[i], NOW))
    assert all(isinstance(action, Forward) for action in forwards)

    one_hop = [Hop(nodes[1][0].peer_id, nodes[1][1].public_key(EPOCH))]
    final = [
        build_packet(one_hop, body, epoch=EPOCH, random_bytes=os.urandom).packet
        for _ in range(count)
    ]
    destination = Relay(nodes[1][1], ReplayCache())
    deliver_rate, delivered = _rate(count, lambda i: destination.process(final[i], NOW))
    assert all(isinstance(action, Deliver) for action in delivered)

    secret = X25519PrivateKey.generate()
    recipient = secret.public_key().public_bytes(*_RAW)
    seal_rate, sealed = _rate(count, lambda _: _seal(recipient, body))
    open_rate, opened = _rate(count, lambda i: _open(secret, sealed[i]))
    assert opened == [body] * count

    maker = Relay(nodes[0][1], ReplayCache())
    back = [Hop(nodes[0][0].peer_id, nodes[0][1].public_key(EPOCH))]
    book = SurbBook(max_open=count)
    surbs = []
    for _ in range(count):
        surb, secrets = build_surb(back, epoch=EPOCH, random_bytes=os.urandom)
        book.add(secrets, expires_at=SCHEDULE.retires_at(EPOCH))
        surbs.append(surb)

    def reply(i: int) -> None:
        action = maker.process(packet_from_surb(surbs[i], body).packet, NOW)
        assert isinstance(action, DeliverReply)
        assert isinstance(book.open(action.surb_id, action.payload, NOW), OpenedReply)

    surb_rate, _ = _rate(count, reply)

    sealed_size = len(sealed[0])
    network = (
        {}
        if args.no_network
        else trio.run(_network, rounds, max(args.relays, 3), not args.no_store)
    )
    print(
        json.dumps(
            {
                "packets": count,
                "hops": args.hops,
                "packet_size": PACKET_SIZE,
                "body_size": BODY_SIZE,
                "overhead_bytes": PACKET_SIZE - BODY_SIZE,
                "seal_overhead_bytes": sealed_size - BODY_SIZE,
                "size_ratio": round(PACKET_SIZE / sealed_size, 3),
                "build_per_s": round(build_rate),
                "build_ms": round(1000 / build_rate, 3),
                "seal_per_s": round(seal_rate),
                "build_ratio": round(seal_rate / build_rate, 2),
                "relay_packets_per_s": round(relay_rate),
                "relay_overhead_ms": round(1000 / relay_rate, 3),
                "deliver_per_s": round(deliver_rate),
                "open_per_s": round(open_rate),
                "relay_ratio": round(open_rate / relay_rate, 2),
                "surb_reply_per_s": round(surb_rate),
                **network,
            }
        )
    )


if __name__ == "__main__":
    main()
