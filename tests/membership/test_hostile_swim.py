"""A hostile peer against SWIM over libp2p on 127.0.0.1 (issue 11, finding 1).

The attacker has a valid identity (it gets past Noise and the envelope checks) and sends
``meshfed.swim.ping`` requests whose updates it wrote itself, byte by byte: suspicion at
2^64-1 (the refutation used to overflow the codec and stop the victim), a dead claim about a
live peer (used to erase it everywhere for good), alive claims about a dead peer (used to keep
it alive) and about an identity nobody has a record of (used to add members).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import trio

from meshfed import Identity, Node, NodeConfig, PeerId, open_node
from meshfed.errors import RequestFailed
from meshfed.node import RPC_PROTOCOL
from meshfed.wire import SIGNATURE_DOMAIN

ALIVE, SUSPECT, DEAD = 0, 1, 2
TOP = 2**64 - 1


def ping_frame(attacker: Identity, updates: list[Any]) -> bytes:
    """A ``meshfed.swim.ping`` envelope carrying ``updates`` as given, signed by the attacker."""
    signed = msgpack.packb(
        [
            1,
            "meshfed.swim.ping",
            attacker.peer_id.raw,
            [b"", 0],
            os.urandom(16),
            time.time_ns() // 1_000_000,
            b"",
            [updates],
        ],
        use_bin_type=True,
    )
    return msgpack.packb([signed, attacker.sign(SIGNATURE_DOMAIN + signed)], use_bin_type=True)


async def send_ping(attacker: Node, target: PeerId, updates: list[Any]) -> list[Any] | str:
    """The updates of the target's ack, or the reason it rejected the ping."""
    try:
        with trio.fail_after(10):
            reply = await attacker.transport.request(
                target, RPC_PROTOCOL, ping_frame(attacker.identity, updates)
            )
    except RequestFailed as exc:
        return str(exc.reason)
    fields = msgpack.unpackb(msgpack.unpackb(reply)[0])
    body: list[Any] = fields[7]
    return body[1]


def statement_of(peer: PeerId, ack_updates: list[Any]) -> list[Any] | None:
    """The peer's own signed incarnation in an ack, as sent (``None`` if it sends none)."""
    for update in ack_updates:
        if isinstance(update[0], list) and update[0][0] == peer.raw:
            statement: list[Any] = update[0]
            return statement
    return None


def config(root: Path, name: str, *, membership: bool = True) -> NodeConfig:
    return NodeConfig(
        data_dir=root / name,
        listen=["/ip4/127.0.0.1/tcp/0"],
        mdns=False,
        ping_interval_s=0,
        membership=membership,
        gossip_interval_s=0.5,
    )


@asynccontextmanager
async def stoppable(
    nursery: trio.Nursery, cfg: NodeConfig
) -> AsyncIterator[tuple[Node, trio.CancelScope]]:
    """A node in its own task, and the scope that stops it."""
    ready: list[Node] = []
    scope = trio.CancelScope()
    started = trio.Event()

    async def run() -> None:
        with scope:
            async with open_node(cfg) as node:
                ready.append(node)
                started.set()
                await trio.sleep_forever()

    nursery.start_soon(run)
    await started.wait()
    yield ready[0], scope


async def until(predicate: Callable[[], bool], within: float) -> bool:
    """Poll ``predicate`` every 0.1 s for up to ``within`` seconds."""
    started = trio.current_time()
    while True:
        if predicate():
            return True
        if trio.current_time() - started > within:
            return False
        await trio.sleep(0.1)


@asynccontextmanager
async def mesh(root: Path) -> AsyncIterator[tuple[Node, Node, Node, trio.CancelScope]]:
    """A victim and a witness that see each other alive, an attacker connected to both, and
    the scope that stops the victim."""
    async with (
        trio.open_nursery() as nursery,
        stoppable(nursery, config(root, "victim")) as (victim, victim_scope),
        stoppable(nursery, config(root, "witness")) as (witness, _),
        stoppable(nursery, config(root, "mallory", membership=False)) as (mallory, _),
    ):
        await witness.connect(victim.listen_addrs[0])
        assert await until(lambda: victim.peer_id in live(witness), 20)
        await mallory.connect(victim.listen_addrs[0])
        await mallory.connect(witness.listen_addrs[0])
        yield victim, witness, mallory, victim_scope
        nursery.cancel_scope.cancel()


def live(node: Node) -> set[PeerId]:
    assert node.membership is not None
    return {record.peer for record in node.membership.peers()}


async def test_suspicion_at_the_top_of_the_range_is_refused_and_the_victim_lives_on(
    tmp_path: Path,
) -> None:
    async with mesh(tmp_path) as (victim, witness, mallory, _):
        v = victim.peer_id
        for updates in ([[v.raw, SUSPECT, TOP]], [[[v.raw, TOP, bytes(64)], SUSPECT]]):
            assert await send_ping(mallory, v, updates) == "bad_field"
        await trio.sleep(2)  # the victim probes the witness: it signs, seals and sends
        assert isinstance(await send_ping(mallory, v, []), list)  # still serving
        assert v in live(witness)


async def test_dead_claims_do_not_erase_a_live_peer(tmp_path: Path) -> None:
    async with mesh(tmp_path) as (victim, witness, mallory, _):
        v, w = victim.peer_id, witness.peer_id
        ack = await send_ping(mallory, v, [])
        assert isinstance(ack, list)
        own = statement_of(v, ack)
        # At 2^64-1, forged above the victim's incarnation, and at the one it really signed.
        attacks: list[list[Any]] = [
            [[v.raw, DEAD, TOP]],
            [[[v.raw, 2**50, mallory.identity.sign(b"forged")], DEAD]],
        ]
        if own is not None:
            attacks.append([[own, DEAD]])
        for updates in attacks:
            await send_ping(mallory, w, updates)
        assert witness.membership is not None
        await trio.sleep(witness.membership.swim.suspicion_s() + 3)  # refuted, or dead by now
        assert v in live(witness), "the victim was erased"
        rejected = witness.stats.snapshot()["rejected"]
        assert isinstance(rejected, dict) and rejected.get("bad_signature", 0) >= 1


async def test_no_one_keeps_a_dead_peer_alive_or_adds_a_member(tmp_path: Path) -> None:
    async with mesh(tmp_path) as (victim, witness, mallory, victim_scope):
        v, w = victim.peer_id, witness.peer_id
        ack = await send_ping(mallory, v, [])
        assert isinstance(ack, list)
        own = statement_of(v, ack)
        assert witness.membership is not None
        ghost = Identity.generate().peer_id
        await send_ping(mallory, w, [[ghost.raw, ALIVE, 5]])
        await send_ping(mallory, w, [[[ghost.raw, 5, Identity.generate().sign(b"x")], ALIVE]])
        assert witness.membership.swim.state(ghost) is None

        victim_scope.cancel()  # the victim stops for good
        assert await until(lambda: v not in live(witness), 30)
        keep_alive: list[list[Any]] = [[[v.raw, ALIVE, TOP]]]
        if own is not None:
            keep_alive.append([[own, ALIVE]])  # its last real statement, replayed
        for _ in range(3):
            for updates in keep_alive:
                await send_ping(mallory, w, updates)
            await trio.sleep(0.5)
        assert v not in live(witness), "a dead peer kept alive"
