"""The node over the memory transport: signed requests, arrays, rejections, lifecycle."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from meshfed import Envelope, Node, NodeConfig, open_node
from meshfed.arrays import (
    INLINE_ARRAY_BYTES,
    ArrayHeader,
    ArrayParts,
    InlineArray,
    parts_frame,
    split_parts_frame,
)
from meshfed.control import Ping, Text
from meshfed.errors import (
    ConfigError,
    LocalProtocolError,
    MeshfedError,
    PeerUnreachable,
    RequestFailed,
    RequestTimeout,
)
from meshfed.identity import Identity
from meshfed.stats import RejectReason
from meshfed.transports.memory import MemoryNetwork
from meshfed.wire import Scope, seal


@asynccontextmanager
async def mesh(tmp_path: Path, n: int, **config: object) -> AsyncIterator[list[Node]]:
    network = MemoryNetwork(seed=1, latency=0.001)
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(n):
            cfg = NodeConfig(data_dir=tmp_path / f"n{i}", transport="memory", **config)  # type: ignore[arg-type]
            nodes.append(await stack.enter_async_context(open_node(cfg, network=network)))
        yield nodes


async def echo(envelope: Envelope, text: Text) -> Text:
    return Text(text=f"{text.text} from {envelope.sender.short()} in round {envelope.scope.round}")


async def test_signed_request_and_answer(tmp_path: Path) -> None:
    async with mesh(tmp_path, 2, ping_interval_s=0) as (a, b):
        b.handle(Text, echo)
        answer = await a.request(b.peer_id, Text(text="hi"), scope=Scope(job=b"j", round=3))
        assert answer.sender == b.peer_id
        assert answer.body == Text(text=f"hi from {a.peer_id.short()} in round 3")
        assert answer.scope == Scope(job=b"j", round=3)
        assert b.stats.accepted["meshfed.text"] == 1
        assert a.stats.accepted["meshfed.text"] == 1


async def test_unhandled_type_is_rejected_and_counted(tmp_path: Path) -> None:
    async with mesh(tmp_path, 2, ping_interval_s=0) as (a, b):
        with pytest.raises(RequestFailed) as info:
            await a.request(b.peer_id, Text(text="nobody listens"))
        assert info.value.reason == "unknown_type"
        assert b.stats.rejected[RejectReason.UNKNOWN_TYPE] == 1


async def test_replayed_request_is_rejected_and_the_node_keeps_serving(tmp_path: Path) -> None:
    async with mesh(tmp_path, 2, ping_interval_s=0) as (a, b):
        b.handle(Text, echo)
        frame, _ = seal(a.identity, Text(text="once"), now_ms=trio_wall_ms())
        await a.transport.request(b.peer_id, "/meshfed/rpc/1", frame)
        with pytest.raises(RequestFailed) as info:
            await a.transport.request(b.peer_id, "/meshfed/rpc/1", frame)
        assert info.value.reason == "replayed"
        assert b.stats.rejected[RejectReason.REPLAYED] == 1
        assert (await a.request(b.peer_id, Text(text="again"))).body.text.startswith("again")


def trio_wall_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


async def test_forged_envelope_is_rejected(tmp_path: Path) -> None:
    async with mesh(tmp_path, 3, ping_interval_s=0) as (a, b, c):
        b.handle(Text, echo)
        # c signs as itself but the envelope arrives over a's authenticated connection.
        frame, _ = seal(c.identity, Text(text="i am c"), now_ms=trio_wall_ms())
        with pytest.raises(RequestFailed) as info:
            await a.transport.request(b.peer_id, "/meshfed/rpc/1", frame)
        assert info.value.reason == "sender_mismatch"
        mallory = Identity.generate()
        frame, _ = seal(mallory, Text(text="who am i"), now_ms=trio_wall_ms())
        with pytest.raises(RequestFailed):
            await a.transport.request(b.peer_id, "/meshfed/rpc/1", frame)
        assert b.stats.rejected[RejectReason.SENDER_MISMATCH] == 2


async def test_arrays_arrive_whole_with_name_and_scope(tmp_path: Path) -> None:
    async with mesh(tmp_path, 2, ping_interval_s=0, array_chunk_bytes=64 * 1024) as (a, b):
        got: list[tuple[str, Scope, np.ndarray]] = []

        async def store(envelope: Envelope, header: ArrayHeader, array: np.ndarray) -> None:
            got.append((header.name, envelope.scope, array))

        b.on_array(store)
        weights = np.random.default_rng(0).standard_normal((300, 1000)).astype(np.float32)
        await a.send_array(b.peer_id, weights, name="w", scope=Scope(job=b"job", round=1))
        [(name, scope, array)] = got
        assert (name, scope) == ("w", Scope(job=b"job", round=1))
        np.testing.assert_array_equal(array, weights)
        assert b.stats.bytes_in >= weights.nbytes


async def test_oversized_array_is_refused(tmp_path: Path) -> None:
    async with mesh(tmp_path, 2, ping_interval_s=0, max_array_bytes=1000) as (a, b):
        with pytest.raises(Exception):  # noqa: B017 - the stream is reset; which error is transport-specific
            await a.send_array(b.peer_id, np.zeros(1000, np.float32), name="big")
        assert b.stats.rejected[RejectReason.OVERSIZED] == 1


async def test_pings_measure_round_trips(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mesh(tmp_path, 3, ping_interval_s=1.0) as nodes:
        for node in nodes[1:]:
            await nodes[0].connect(node.listen_addrs[0])
        await trio.sleep(3.5)
        status = nodes[0].status()
        assert len(status["peers"]) == 2
        assert all(p["rtt_ms"] is not None for p in status["peers"])
        assert nodes[1].stats.accepted[Ping.TYPE] >= 2


async def test_stop_waits_for_handlers_in_flight(tmp_path: Path) -> None:
    finished = []

    async def slow(envelope: Envelope, text: Text) -> Text:
        await trio.sleep(0.2)
        finished.append(text.text)
        return text

    network = MemoryNetwork(seed=2)
    cfg_a = NodeConfig(data_dir=tmp_path / "a", transport="memory", ping_interval_s=0)
    cfg_b = NodeConfig(data_dir=tmp_path / "b", transport="memory", ping_interval_s=0)
    async with open_node(cfg_a, network=network) as a:
        async with trio.open_nursery() as nursery, open_node(cfg_b, network=network) as b:
            b.handle(Text, slow)
            nursery.start_soon(a.request, b.peer_id, Text(text="slow"))
            await trio.sleep(0.05)
        assert finished == ["slow"]


async def test_stop_is_bounded_by_its_deadline(tmp_path: Path) -> None:
    async def stuck(envelope: Envelope, text: Text) -> Text:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    outcome: list[BaseException] = []

    async def ask(a: Node, b: Node) -> None:
        try:
            await a.request(b.peer_id, Text(text="never answered"))
        except PeerUnreachable as exc:
            outcome.append(exc)

    network = MemoryNetwork(seed=3)
    cfg = {"transport": "memory", "ping_interval_s": 0, "stop_timeout_s": 0.3}
    a_cfg = NodeConfig(data_dir=tmp_path / "a", **cfg)  # type: ignore[arg-type]
    b_cfg = NodeConfig(data_dir=tmp_path / "b", **cfg)  # type: ignore[arg-type]
    async with open_node(a_cfg, network=network) as a, trio.open_nursery() as nursery:
        async with open_node(b_cfg, network=network) as b:
            b.handle(Text, stuck)
            nursery.start_soon(ask, a, b)
            await trio.sleep(0.05)
            started = trio.current_time()
        stopped = trio.current_time() - started
    assert 0.3 <= stopped < 1.0
    assert len(outcome) == 1  # the requester learns at once, it does not hang


async def test_memory_transport_needs_a_network(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="network"):
        async with open_node(NodeConfig(data_dir=tmp_path, transport="memory")):
            pass


async def test_node_peers_answers_from_membership(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from meshfed.membership.records import Role

    async with mesh(tmp_path, 4, ping_interval_s=0, gossip_interval_s=0.5) as nodes:
        for node in nodes[1:]:
            await node.connect(nodes[0].listen_addrs[0])
        await trio.sleep(10)
        others = {n.peer_id for n in nodes[1:]}
        assert {r.peer for r in nodes[0].peers(role=Role.TRAINER)} == others
        assert nodes[0].peers(role=Role.RELAY) == []
        assert {m["peer_id"] for m in nodes[0].status()["members"]} == {str(p) for p in others}


async def test_one_way_messages_are_signed_checked_and_acknowledged_by_the_transport(
    tmp_path: Path,
) -> None:
    async with mesh(tmp_path, 3, ping_interval_s=0) as (a, b, c):
        got: list[tuple[str, Scope]] = []

        async def note(envelope: Envelope, text: Text) -> None:
            got.append((text.text, envelope.scope))

        b.handle(Text, note)
        c.handle(Text, note)
        # One seal for many receivers: each receiver's replay guard sees the nonce once.
        frame = a.sealed(Text(text="to all"), scope=Scope(job=b"j", round=2))
        await a.send(b.peer_id, frame)
        await a.send(c.peer_id, frame)
        assert got == [("to all", Scope(job=b"j", round=2))] * 2
        with pytest.raises(RequestFailed) as info:
            await a.send(b.peer_id, frame)
        assert info.value.reason == "replayed"
        assert b.stats.rejected[RejectReason.REPLAYED] == 1
        # Signed by c, carried by a: refused like a request.
        with pytest.raises(RequestFailed) as info:
            await a.send(b.peer_id, c.sealed(Text(text="i am c")))
        assert info.value.reason == "sender_mismatch"
        with pytest.raises(RequestFailed) as info:
            await b.send(a.peer_id, Text(text="nobody listens"))
        assert info.value.reason == "unknown_type"
        assert a.stats.rejected[RejectReason.UNKNOWN_TYPE] == 1


async def test_one_message_sealed_once_goes_to_many_at_once(tmp_path: Path) -> None:
    async with mesh(tmp_path, 3, ping_interval_s=0) as (a, b, c):
        got: list[tuple[Node, str]] = []
        arrays: list[tuple[Node, np.ndarray]] = []
        for node in (b, c):

            async def note(envelope: Envelope, text: Text, node: Node = node) -> None:
                got.append((node, text.text))

            async def keep(
                envelope: Envelope, header: ArrayHeader, array: np.ndarray, node: Node = node
            ) -> None:
                arrays.append((node, array))

            node.handle(Text, note)
            node.on_array(keep, prefix="sum")
        frame = a.sealed(Text(text="to all"))
        errors = await a.send_each([(b.peer_id, frame), (c.peer_id, frame), (b.peer_id, frame)])
        assert errors[1] is None
        first, second = errors[0], errors[2]  # served at once: either one is the replay
        replay = first or second
        assert (first is None or second is None) and isinstance(replay, RequestFailed)
        assert replay.reason == "replayed"
        assert sorted(got, key=lambda item: item[0] is c) == [(b, "to all"), (c, "to all")]
        total = np.arange(10, dtype=np.uint32)
        frame = a.sealed_array(total, name="sum:1")
        assert await a.send_each([(b.peer_id, frame), (c.peer_id, frame)]) == [None, None]
        assert sorted(node is c for node, _ in arrays) == [False, True]
        for _, array in arrays:
            np.testing.assert_array_equal(array, total)
        with pytest.raises(LocalProtocolError, match="streamed"):
            a.sealed_array(np.zeros(INLINE_ARRAY_BYTES + 1, np.uint8), name="sum:2")


async def test_different_arrays_for_several_peers_share_one_signature(tmp_path: Path) -> None:
    async with mesh(tmp_path, 4, ping_interval_s=0) as (a, b, c, d):
        got: dict[Node, tuple[ArrayHeader, np.ndarray]] = {}
        for node in (b, c, d):

            async def keep(
                envelope: Envelope, header: ArrayHeader, array: np.ndarray, node: Node = node
            ) -> None:
                assert envelope.sender == a.peer_id and envelope.scope == Scope(b"j", 2)
                got[node] = (header, array)

            node.on_array(keep, prefix="input")
        mine = {b: np.arange(5, dtype=np.uint32), c: np.arange(3, dtype=np.uint32) + 7}
        frames = a.sealed_parts(
            [(node.peer_id, array) for node, array in mine.items()],
            name="input:1",
            scope=Scope(b"j", 2),
        )
        envelopes = {split_parts_frame(frame)[0] for _, frame in frames}
        assert len(envelopes) == 1  # one signed envelope, the same for every receiver
        assert await a.send_each(frames, parts=True) == [None, None]
        for node, array in mine.items():
            header, received = got[node]
            assert header.name == "input:1" and header.shape == [len(array)]
            np.testing.assert_array_equal(received, array)
            received += 1  # the handler owns what it gets
        assert b.stats.accepted[ArrayParts.TYPE] == 1
        # d has no part; other bytes of the right length fail the digest; a short frame is
        # malformed; a frame seen before is a replay
        fresh = a.sealed_parts(
            [(node.peer_id, array) for node, array in mine.items()], name="input:1"
        )
        envelope = split_parts_frame(fresh[0][1])[0]
        forged = [
            (d.peer_id, parts_frame(envelope, mine[b].tobytes())),
            (c.peer_id, parts_frame(envelope, bytes(3 * 4))),
            (b.peer_id, fresh[0][1][:3]),
            (b.peer_id, frames[0][1]),
        ]
        errors = await a.send_each(forged, parts=True)
        assert [e.reason for e in errors if isinstance(e, RequestFailed)] == [
            "bad_field",
            "bad_array",
            "malformed",
            "replayed",
        ]
        assert d not in got and c.stats.rejected[RejectReason.BAD_ARRAY] == 1
        with pytest.raises(LocalProtocolError, match="one dtype"):
            a.sealed_parts(
                [(b.peer_id, np.zeros(2, np.uint32)), (c.peer_id, np.zeros(2, np.int32))],
                name="input:2",
            )
        with pytest.raises(LocalProtocolError, match="1-D"):
            a.sealed_parts([(b.peer_id, np.zeros(INLINE_ARRAY_BYTES + 1, np.uint8))], name="x")


async def test_small_arrays_travel_in_one_message_and_large_ones_on_a_stream(
    tmp_path: Path,
) -> None:
    async with mesh(tmp_path, 2, ping_interval_s=0, array_chunk_bytes=64 * 1024) as (a, b):
        got: list[np.ndarray] = []

        async def store(envelope: Envelope, header: ArrayHeader, array: np.ndarray) -> None:
            array += 1  # the handler owns what it gets
            got.append(array)

        b.on_array(store)
        small = np.arange(INLINE_ARRAY_BYTES // 4, dtype=np.int32).reshape(64, -1)
        large = np.zeros(INLINE_ARRAY_BYTES // 4 + 1, np.int32)
        await a.send_array(b.peer_id, small, name="small")
        await a.send_array(b.peer_id, large, name="large")
        np.testing.assert_array_equal(got[0], small + 1)
        np.testing.assert_array_equal(got[1], large + 1)
        assert b.stats.accepted[InlineArray.TYPE] == 1
        assert b.stats.accepted[ArrayHeader.TYPE] == 1
        # Bytes that do not fill the header's shape are refused.
        header = ArrayHeader(
            transfer_id=bytes(16), name="x", dtype="<i4", shape=[4], chunk_bytes=16, crc32=0
        )
        forged = InlineArray.__new__(InlineArray)
        object.__setattr__(forged, "header", header)
        object.__setattr__(forged, "data", bytes(12))
        with pytest.raises(RequestFailed) as info:
            await a.send(b.peer_id, forged)
        assert info.value.reason == "bad_field"
        assert len(got) == 2


@asynccontextmanager
async def libp2p_pair(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """Two nodes over libp2p on 127.0.0.1, ``a`` connected to ``b``."""
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                open_node(
                    NodeConfig(
                        data_dir=tmp_path / name,
                        transport="libp2p",
                        listen=["/ip4/127.0.0.1/tcp/0"],
                        membership=False,
                        mdns=False,
                        ping_interval_s=0,
                    )
                )
            )
            for name in ("a", "b")
        ]
        await a.connect(b.listen_addrs[0])
        yield a, b


async def test_nested_array_floods_are_rejected_early_and_counted_over_libp2p(
    tmp_path: Path,
) -> None:
    async with libp2p_pair(tmp_path) as (a, b):
        b.handle(Text, echo)
        bulk = b"\xdd" + (100_000).to_bytes(4, "big") + b"\x90" * 100_000
        flood = b"\xdc\x00\x0a" + bulk * 10  # 1 MB of nested empty arrays
        started = time.process_time()
        for protocol in ("/meshfed/rpc/1", "/meshfed/msg/1"):
            for _ in range(5):
                with pytest.raises(RequestFailed) as info:
                    await a.transport.request(b.peer_id, protocol, flood)
                assert info.value.reason == "malformed"
        # both ends of ten 1 MB requests in this process, sealed and unsealed: well under the
        # 0.36 s of CPU each one cost when the whole document was unpacked first
        assert time.process_time() - started < 2.0
        assert b.stats.rejected[RejectReason.MALFORMED] == 10
        answer = await a.request(b.peer_id, Text(text="still there?"))
        assert answer.body.text.startswith("still there?")


async def test_a_second_handler_for_a_type_is_refused_unless_it_replaces(tmp_path: Path) -> None:
    async with mesh(tmp_path, 2, ping_interval_s=0) as (a, b):
        b.handle(Text, echo)

        async def thief(envelope: Envelope, text: Text) -> Text:
            return Text(text="stolen")

        with pytest.raises(LocalProtocolError, match="handled already"):
            b.handle(Text, thief)
        with pytest.raises(LocalProtocolError, match="handled already"):
            b.handle(Ping, thief)  # the node's own
        assert (await a.request(b.peer_id, Text(text="hi"))).body.text.startswith("hi from")
        b.handle(Text, thief, job=b"other")  # another job's: beside, not instead
        assert (await a.request(b.peer_id, Text(text="hi"))).body.text.startswith("hi from")
        assert (await a.request(b.peer_id, Text(text="hi"), scope=Scope(job=b"other"))).body == (
            Text(text="stolen")
        )
        with pytest.raises(LocalProtocolError, match="at most 64 bytes"):
            b.handle(Text, thief, job=b"j" * 65)  # no envelope could ever reach it
        b.handle(Text, thief, replace=True)
        assert (await a.request(b.peer_id, Text(text="hi"))).body == Text(text="stolen")

        async def keep(envelope: Envelope, header: ArrayHeader, array: np.ndarray) -> None:
            pass

        b.on_array(keep, prefix="w")
        with pytest.raises(LocalProtocolError, match="handled already"):
            b.on_array(keep, prefix="w")
        b.on_array(keep, prefix="w", job=b"other")
        b.on_array(keep, prefix="w", replace=True)


async def test_two_jobs_on_the_same_nodes_each_get_their_own_secure_mean(tmp_path: Path) -> None:
    from meshfed.secagg.driver import Aggregator, DeadlinePolicy
    from meshfed.secagg.protocol import GroupSpec
    from meshfed.secagg.ring import Quantizer

    quantizer = Quantizer(clip=4.0, levels_bits=16, ring_bits=32)
    async with mesh(tmp_path, 5, ping_interval_s=0, membership=False) as nodes:
        rosters = {b"job-a": nodes[:4], b"job-b": nodes[1:]}  # three nodes in both
        rng = np.random.default_rng(3)
        values = {
            (job, i): rng.uniform(-1, 1, 1000).astype(np.float32)
            for job, members in rosters.items()
            for i in range(len(members))
        }
        results: dict[tuple[bytes, int], np.ndarray] = {}

        async def one(job: bytes, i: int, aggregator: Aggregator, spec: GroupSpec) -> None:
            rng = np.random.default_rng(i)
            result = await aggregator.secure_mean(spec, values[job, i], quantizer, rng=rng)
            results[job, i] = result.value

        async with trio.open_nursery() as nursery:
            for job, members in rosters.items():
                spec = GroupSpec(
                    job=job,
                    round=0,
                    group=0,
                    roster=tuple(node.peer_id for node in members),
                    threshold=3,
                    ring_bits=32,
                )
                for i, node in enumerate(members):
                    aggregator = Aggregator(
                        node, job=job, deadlines=DeadlinePolicy(join_s=0.5, phase_max_s=10.0)
                    )
                    nursery.start_soon(one, job, i, aggregator, spec)
        step = 2 * quantizer.clip / (2**quantizer.levels_bits - 1)
        for job, members in rosters.items():
            mean = np.mean([values[job, i] for i in range(len(members))], axis=0)
            for i in range(len(members)):
                np.testing.assert_allclose(results[job, i], mean, atol=step)


async def test_an_unanswered_request_raises_request_timeout_within_the_node_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mesh(tmp_path, 2, ping_interval_s=0, request_timeout_s=3.0) as (a, b):

        async def stuck(envelope: Envelope, text: Text) -> None:
            await trio.sleep_forever()

        b.handle(Text, stuck)
        for within, waited in ((None, 3.0), (0.5, 0.5), (60.0, 3.0)):  # a peer's 60 s: capped
            started = trio.current_time()
            with pytest.raises(RequestTimeout, match=f"{b.peer_id.short()} .* within {waited:g} s"):
                await a.request(b.peer_id, Text(text="anyone?"), within=within)
            assert trio.current_time() - started == pytest.approx(waited, abs=0.05)
        with pytest.raises(MeshfedError):  # in the tree: `except MeshfedError` is enough
            await a.send(b.peer_id, Text(text="one way"), within=1.0)
        assert a.links[b.peer_id].failures == 4
