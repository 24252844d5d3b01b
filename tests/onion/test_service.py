"""The onion driver among real libp2p nodes on loopback: requests and replies over relays,
what the destination keeps, relays that die mid-flight, replays, caps."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
import trio

from meshfed import Node, PeerId
from meshfed.control import Text
from meshfed.errors import ConfigError
from meshfed.onion import EpochSchedule, Hop, build_packet, fragment
from meshfed.onion.keystore import OnionKeyStore
from meshfed.onion.messages import OnionPacket
from meshfed.onion.packet import PACKET_SIZE
from meshfed.onion.service import Privacy
from meshfed.stats import RejectReason

from .net import eventually, onion_mesh

pytestmark = pytest.mark.trio


async def test_a_request_and_its_reply_travel_over_three_relays_each_way(tmp_path: Path) -> None:
    async with onion_mesh(tmp_path, relays=4) as mesh:
        alice, dest = mesh.node("alice"), mesh.node("dest")
        paths: list[tuple[list, list]] = []
        assert alice.onion is not None
        alice.onion.path_observers.append(lambda f, b: paths.append((f, b)))
        answer = await alice.onion_request(dest.peer_id, Text(text="hi"), privacy="high")
        assert answer == Text(text="echo:hi")
        assert mesh.served == ["hi"]
        forward, back = paths[-1]  # the transport may lose a first attempt: it is retried
        assert len(forward) == len(back) == 3
        relays = {mesh.node(f"r{i}").peer_id for i in range(4)}
        for path in (forward, back):
            assert len(set(path)) == 3 and set(path) <= relays
        relayed = sum(mesh.node(f"r{i}").stats.onion["relayed"] for i in range(4))
        assert relayed >= 6  # three hops each way, one packet each
        assert dest.stats.onion["requests_served"] == 1


async def test_each_level_answers_and_a_wrong_level_is_refused(tmp_path: Path) -> None:
    ultra = {"onion_cover_per_s": 20.0, "onion_mean_delay_ms": 20.0}
    async with onion_mesh(tmp_path, relays=3, sender_overrides=ultra) as mesh:
        alice, dest = mesh.node("alice"), mesh.node("dest")
        for level in Privacy:
            answer = await alice.onion_request(dest.peer_id, Text(text=level), privacy=level)
            assert answer == Text(text=f"echo:{level}")
        assert mesh.served == [str(level) for level in Privacy]
        assert alice.stats.onion["replies"] == 3  # low is a plain request
        await eventually(  # ultra started loop cover traffic: packets back to alice
            lambda: alice.stats.onion["cover_returned"] >= 3, within=10, what="loops"
        )
        loops = alice.stats.onion["cover_packets"]
        assert alice.stats.onion["cover_bytes"] == loops * 4 * PACKET_SIZE  # 3 relays + alice
        with pytest.raises(ConfigError):
            await alice.onion_request(dest.peer_id, Text(text="x"), privacy="secret")


async def test_a_relay_stopped_mid_flight_makes_the_sender_retry_and_the_destination_act_once(
    tmp_path: Path,
) -> None:
    async with onion_mesh(tmp_path, relays=4) as mesh:
        alice, dest = mesh.node("alice"), mesh.node("dest")
        by_peer = {m.node.peer_id: m for m in mesh.members.values()}
        paths: list[tuple[list[PeerId], list[PeerId]]] = []
        assert alice.onion is not None and dest.onion is not None
        alice.onion.path_observers.append(lambda f, b: paths.append((f, b)))
        stopped: list[PeerId] = []

        async def echo_then_kill(text: Text) -> Text:
            mesh.served.append(text.text)
            (reply_relay,) = paths[-1][1]  # the relay the answer is about to go through
            by_peer[reply_relay].stop()
            await by_peer[reply_relay].stopped.wait()
            stopped.append(reply_relay)
            return Text(text=f"echo:{text.text}")

        dest.onion.handle(Text, echo_then_kill, direct=False)
        answer = await alice.onion_request(
            dest.peer_id, Text(text="once"), privacy="medium", within=3.0
        )
        assert answer == Text(text="echo:once")
        assert mesh.served == ["once"]  # acted on once, answered twice
        assert len(paths) >= 2 and stopped[0] not in paths[-1][0] + paths[-1][1]
        assert dest.stats.onion["requests_served"] == 1
        assert dest.stats.onion["requests_repeated"] == len(paths) - 1


async def _hand(sender: Node, to: Node, packet: OnionPacket) -> None:
    """Send ``packet`` to ``to`` as its previous hop would."""
    await sender.connect(to.listen_addrs[0])
    await sender.send(to.peer_id, packet)


async def _relayed(relay: Node, count: int) -> None:
    """Wait for the relay's forwarding tasks (they run after the packet was taken)."""
    await eventually(lambda: relay.stats.onion["relayed"] == count, within=5, what="relaying")
    await trio.sleep(0.2)
    assert relay.stats.onion["relayed"] == count


def _packet(path: list[Node], body: bytes = b"x") -> bytes:
    epoch = EpochSchedule().epoch_at(time.time())
    hops = []
    for node in path:
        assert node.onion is not None
        hops.append(Hop(node.peer_id, node.onion.ring.public_key(epoch)))
    return build_packet(
        hops, fragment(body, os.urandom(16))[0], epoch=epoch, random_bytes=os.urandom
    ).packet


async def test_a_replayed_packet_is_dropped_also_after_the_relay_restarts(tmp_path: Path) -> None:
    async with onion_mesh(tmp_path, relays=2) as mesh:
        alice, dest = mesh.node("alice"), mesh.node("dest")
        relay = mesh.members["r1"]
        packet = _packet([relay.node, dest])
        for _ in range(2):
            await _hand(alice, relay.node, OnionPacket(packet))
        await _relayed(relay.node, 1)
        assert relay.node.stats.onion["drop.replayed"] == 1
        assert relay.node.stats.rejected[RejectReason.REPLAYED] >= 1
        relay.stop()
        await relay.stopped.wait()
        restarted = await mesh.start(relay.config, "r1")
        await _hand(alice, restarted.node, OnionPacket(packet))
        assert restarted.node.stats.onion["drop.replayed"] == 1
        assert restarted.node.stats.onion["relayed"] == 0


async def test_a_relay_checkpoints_its_replay_tags_into_the_store_file(tmp_path: Path) -> None:
    async with onion_mesh(tmp_path, relays=1) as mesh:
        alice, dest, relay = mesh.node("alice"), mesh.node("dest"), mesh.node("r0")
        assert relay.onion is not None and relay.store is not None
        relay.onion.settings = dataclasses.replace(relay.onion.settings, checkpoint_every_tags=1)
        await _hand(alice, relay, OnionPacket(_packet([relay, dest])))
        copy = tmp_path / "file-alone.sqlite3"

        def tags_in_the_file_alone() -> int:
            shutil.copyfile(relay.store.path, copy)  # without its WAL: checkpointed rows only
            try:
                with closing(sqlite3.connect(copy)) as db:
                    count: int = db.execute("SELECT count(*) FROM onion_replay").fetchone()[0]
            except sqlite3.OperationalError:  # not even the schema was checkpointed yet
                count = 0
            copy.unlink()
            return count

        await eventually(lambda: tags_in_the_file_alone() == 1, within=5, what="a checkpoint")


async def test_a_replay_is_dropped_across_a_key_rotation_until_the_old_key_retires(
    tmp_path: Path,
) -> None:
    async with onion_mesh(tmp_path, relays=1) as mesh:
        alice, dest, relay = mesh.node("alice"), mesh.node("dest"), mesh.node("r0")
        assert relay.onion is not None and relay.store is not None
        schedule = relay.onion.schedule
        packet = _packet([relay, dest])
        epoch = schedule.epoch_at(time.time())
        await _hand(alice, relay, OnionPacket(packet))
        in_grace = schedule.starts_at(epoch + 1) + schedule.grace / 2
        relay.onion.clock = lambda: in_grace
        await relay.onion.maintain()
        assert {k.epoch for k in relay.onion.own_keys()} == {epoch + 1, epoch + 2}
        await _hand(alice, relay, OnionPacket(packet))
        assert relay.stats.onion["drop.replayed"] == 1
        retired = schedule.retires_at(epoch)
        relay.onion.clock = lambda: retired
        await relay.onion.maintain()
        await _hand(alice, relay, OnionPacket(packet))
        assert relay.stats.onion["drop.unknown_epoch"] == 1
        stored = OnionKeyStore(relay.store)
        assert epoch not in stored.secrets() and epoch not in stored.tags()


async def test_relay_caps_are_enforced_and_counted(tmp_path: Path) -> None:
    caps = {"relay_packets_per_s": 1.0, "relay_bytes_per_day": 3 * PACKET_SIZE}
    async with onion_mesh(tmp_path, relays=1, relay_overrides=caps) as mesh:
        alice, dest, relay = mesh.node("alice"), mesh.node("dest"), mesh.node("r0")
        for _ in range(3):  # the burst of one packet, then the rate
            await _hand(alice, relay, OnionPacket(_packet([relay, dest])))
        await _relayed(relay, 1)
        assert relay.stats.onion["drop.relay_cap"] == 2
        for _ in range(3):  # the rate allows one a second; the day allows three in all
            await trio.sleep(1.05)
            await _hand(alice, relay, OnionPacket(_packet([relay, dest])))
        await _relayed(relay, 3)
        assert relay.stats.onion["drop.relay_cap"] == 3
        assert relay.stats.rejected[RejectReason.OVERLOADED] >= 3


async def test_a_node_without_the_relay_role_forwards_nothing(tmp_path: Path) -> None:
    async with onion_mesh(tmp_path, relays=1) as mesh:
        alice, dest, relay = mesh.node("alice"), mesh.node("dest"), mesh.node("r0")
        await _hand(alice, dest, OnionPacket(_packet([dest, relay])))
        assert dest.stats.onion["drop.not_a_relay"] == 1
        assert relay.stats.onion["delivered"] == 0


async def test_repeats_of_a_request_in_progress_hold_at_most_one_requests_surbs(
    tmp_path: Path,
) -> None:
    """While the handler works on a request, repeats of its id (a sender's retries, or anyone
    who saw them) add their SURBs to those it will answer on: only the newest, as many as one
    request may carry (the list grew without bound)."""
    from meshfed.onion.messages import MAX_REPLY_PACKETS, OnionRequest, encode, encode_body
    from meshfed.onion.surb import build_surb

    async with onion_mesh(tmp_path, relays=1) as mesh:
        alice, dest = mesh.node("alice"), mesh.node("dest")
        assert alice.onion is not None and dest.onion is not None
        release = trio.Event()

        async def slow(text: Text) -> Text:
            await release.wait()
            return Text(text=f"late:{text.text}")

        dest.onion.handle(Text, slow, direct=False)
        epoch = EpochSchedule().epoch_at(time.time())
        back = [Hop(alice.peer_id, alice.onion.ring.public_key(epoch))]
        surbs = [
            build_surb(back, epoch=epoch, random_bytes=os.urandom)[0].to_bytes()
            for _ in range(MAX_REPLY_PACKETS)
        ]
        request = encode(
            OnionRequest(os.urandom(16), surbs, Text.TYPE, encode_body(Text(text="hi")))
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dest.onion._serve, request)  # the first: its handler waits
            await eventually(lambda: bool(dest.onion._served), within=5, what="serving")
            for _ in range(5):
                await dest.onion._serve(request)  # repeats while the handler works
            (served,) = dest.onion._served.values()
            assert len(served.waiting) == MAX_REPLY_PACKETS
            release.set()
        assert dest.stats.onion["requests_repeated"] == 5
