"""Envelopes: every message signed, every bad frame rejected with its counted reason."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.codec import bounded
from meshfed.control import Ping, Text
from meshfed.errors import RemoteProtocolError
from meshfed.identity import Identity, PeerId
from meshfed.stats import RejectReason
from meshfed.wire import (
    SIGNATURE_DOMAIN,
    VERIFIED,
    Message,
    ReplayGuard,
    Scope,
    VerifiedFrames,
    message,
    open_envelope,
    seal,
)

ALICE, MALLORY = Identity.generate(), Identity.generate()
NOW = 1_800_000_000_000
MAX = 1 << 20


@message("test.wire.sample")
@dataclass(frozen=True, slots=True)
class Sample(Message):
    count: int = bounded(ge=0, le=1000)
    ratio: float = bounded()
    flag: bool = bounded()
    label: str = bounded(max_len=32)
    blob: bytes = bounded(max_len=64)
    peers: list[PeerId] = bounded(max_len=4)
    maybe: int | None = bounded()


@message("test.wire.blob")
@dataclass(frozen=True, slots=True)
class Blob(Message):
    data: bytes = bounded(max_len=MAX)


def guard() -> ReplayGuard:
    return ReplayGuard(window_ms=60_000, max_skew_ms=5_000, started_ms=NOW - 60_000)


def open_(
    frame: bytes, *, peer: PeerId = ALICE.peer_id, replay: ReplayGuard | None = None, now: int = NOW
):
    return open_envelope(frame, peer=peer, now_ms=now, replay=replay or guard(), max_bytes=MAX)


def reason_of(frame: bytes, **kwargs) -> RejectReason:
    with pytest.raises(RemoteProtocolError) as info:
        open_(frame, **kwargs)
    return info.value.reason


samples = st.builds(
    Sample,
    count=st.integers(0, 1000),
    ratio=st.floats(allow_nan=False),
    flag=st.booleans(),
    label=st.text(max_size=32),
    blob=st.binary(max_size=64),
    peers=st.lists(st.just(ALICE.peer_id), max_size=4),
    maybe=st.none() | st.integers(-(2**63), 2**63 - 1),
)


@given(samples, st.binary(max_size=64), st.integers(0, 2**40))
def test_seal_then_open_is_identity(body: Sample, job: bytes, round_: int) -> None:
    frame, nonce = seal(ALICE, body, now_ms=NOW, scope=Scope(job=job, round=round_))
    envelope = open_(frame)
    assert envelope.body == body
    assert envelope.sender == ALICE.peer_id
    assert envelope.scope == Scope(job=job, round=round_)
    assert envelope.nonce == nonce


def test_peer_ids_travel_as_38_raw_bytes() -> None:
    body = Sample(
        count=1, ratio=0.5, flag=True, label="", blob=b"", peers=[ALICE.peer_id], maybe=None
    )
    frame, _ = seal(ALICE, body, now_ms=NOW)
    fields = msgpack.unpackb(msgpack.unpackb(frame)[0])
    assert fields[2] == ALICE.peer_id.raw and len(fields[2]) == 38
    assert fields[7][5] == [ALICE.peer_id.raw]


def test_garbage_is_malformed() -> None:
    assert reason_of(b"\xc1\xff garbage") == RejectReason.MALFORMED
    assert reason_of(msgpack.packb({"a": 1})) == RejectReason.MALFORMED
    assert reason_of(msgpack.packb([b"x"])) == RejectReason.MALFORMED


def test_truncated_frame_is_malformed() -> None:
    frame, _ = seal(ALICE, Text(text="hello"), now_ms=NOW)
    for cut in (1, len(frame) // 2, len(frame) - 1):
        assert reason_of(frame[:cut]) == RejectReason.MALFORMED


def test_oversized_frame() -> None:
    frame, _ = seal(ALICE, Text(text="x" * 4000), now_ms=NOW)
    with pytest.raises(RemoteProtocolError) as info:
        open_envelope(frame, peer=ALICE.peer_id, now_ms=NOW, replay=guard(), max_bytes=1024)
    assert info.value.reason == RejectReason.OVERSIZED


def resign(identity: Identity, fields: list[object]) -> bytes:
    signed = msgpack.packb(fields, use_bin_type=True)
    return msgpack.packb([signed, identity.sign(SIGNATURE_DOMAIN + signed)], use_bin_type=True)


def fields_of(frame: bytes) -> list[object]:
    return msgpack.unpackb(msgpack.unpackb(frame)[0])


def test_wrong_field_types_are_rejected() -> None:
    frame, _ = seal(ALICE, Ping(sent_ms=5), now_ms=NOW)
    good = fields_of(frame)
    cases = {
        "body int as str": (7, ["5"]),
        "body bool as int": (7, [True]),
        "body missing field": (7, []),
        "nonce too short": (4, b"short"),
        "timestamp as float": (5, float(NOW)),
        "scope round negative": (3, [b"", -1]),
    }
    for name, (index, value) in cases.items():
        fields = list(good)
        fields[index] = value
        assert reason_of(resign(ALICE, fields)) == RejectReason.BAD_FIELD, name


def test_unknown_type_and_version() -> None:
    frame, _ = seal(ALICE, Ping(sent_ms=5), now_ms=NOW)
    fields = fields_of(frame)
    assert reason_of(resign(ALICE, [*fields[:1], "no.such.type", *fields[2:]])) == (
        RejectReason.UNKNOWN_TYPE
    )
    assert reason_of(resign(ALICE, [2, *fields[1:]])) == RejectReason.BAD_VERSION


def test_forged_signature() -> None:
    frame, _ = seal(ALICE, Text(text="pay mallory"), now_ms=NOW)
    signed, signature = msgpack.unpackb(frame)
    forged = bytearray(signature)
    forged[0] ^= 1
    assert reason_of(msgpack.packb([signed, bytes(forged)])) == RejectReason.BAD_SIGNATURE
    # Mallory signs a message that claims Alice as sender, and sends it herself.
    fields = fields_of(frame)
    assert reason_of(resign(MALLORY, fields), peer=MALLORY.peer_id) == (
        RejectReason.SENDER_MISMATCH
    )
    # ... or relays it as if from Alice's connection: the signature does not verify.
    assert reason_of(resign(MALLORY, fields)) == RejectReason.BAD_SIGNATURE


def test_replay_stale_and_future() -> None:
    replay = guard()
    frame, _ = seal(ALICE, Text(text="once"), now_ms=NOW)
    open_(frame, replay=replay)
    assert reason_of(frame, replay=replay) == RejectReason.REPLAYED
    old, _ = seal(ALICE, Text(text="old"), now_ms=NOW - 61_000)
    assert reason_of(old) == RejectReason.STALE
    future, _ = seal(ALICE, Text(text="later"), now_ms=NOW + 6_000)
    assert reason_of(future) == RejectReason.FUTURE


def test_rejected_frames_do_not_poison_the_replay_cache() -> None:
    replay = guard()
    frame, _ = seal(ALICE, Text(text="x"), now_ms=NOW)
    signed, _ = msgpack.unpackb(frame)
    bad = msgpack.packb([signed, bytes(64)])
    assert reason_of(bad, replay=replay) == RejectReason.BAD_SIGNATURE
    open_(frame, replay=replay)  # the genuine one is still accepted


def test_replay_memory_is_bounded_and_never_readmits() -> None:
    replay = ReplayGuard(window_ms=60_000, max_skew_ms=0, started_ms=0, max_per_peer=100)
    frames = [seal(ALICE, Text(text=str(i)), now_ms=NOW + i)[0] for i in range(300)]
    for i, frame in enumerate(frames):
        open_(frame, replay=replay, now=NOW + i)
    assert len(replay._seen[ALICE.peer_id].nonces) <= 100
    for frame in frames:
        assert reason_of(frame, replay=replay, now=NOW + 300) in (
            RejectReason.REPLAYED,
            RejectReason.STALE,
        )


def test_messages_from_before_a_restart_are_stale() -> None:
    before, _ = seal(ALICE, Text(text="captured"), now_ms=NOW - 1_000)
    restarted = ReplayGuard(window_ms=60_000, max_skew_ms=0, started_ms=NOW)
    assert reason_of(before, replay=restarted) == RejectReason.STALE


@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        open_(data)
    except RemoteProtocolError as exc:
        assert isinstance(exc.reason, RejectReason)


@given(st.data())
def test_mutated_frames_are_rejected_or_identical(data: st.DataObject) -> None:
    frame, _ = seal(ALICE, Text(text="mutate me"), now_ms=NOW)
    index = data.draw(st.integers(0, len(frame) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = frame[:index] + bytes([value]) + frame[index + 1 :]
    try:
        envelope = open_(mutated)
    except RemoteProtocolError:
        return
    assert mutated == frame or envelope.body == Text(text="mutate me")


def test_a_frame_verified_once_is_still_checked_for_each_receiver() -> None:
    frame, _ = seal(ALICE, Text(text="to the group"), now_ms=NOW)
    first, second = guard(), guard()
    assert open_(frame, replay=first).body == Text(text="to the group")
    assert VERIFIED.get(frame, MAX) is not None  # the next receiver in this process skips work
    assert open_(frame, replay=second).body == Text(text="to the group")
    assert reason_of(frame, replay=first) == RejectReason.REPLAYED
    assert reason_of(frame, peer=MALLORY.peer_id) == RejectReason.SENDER_MISMATCH


def test_a_tampered_copy_of_a_verified_frame_is_rejected() -> None:
    frame, _ = seal(ALICE, Text(text="pay bob 1"), now_ms=NOW)
    open_(frame)
    assert VERIFIED.get(frame, MAX) is not None
    signed, signature = msgpack.unpackb(frame)
    altered = signed.replace(b"pay bob 1", b"pay bob 9")
    forged = bytearray(signature)
    forged[-1] ^= 1
    for copy in (
        msgpack.packb([altered, signature]),
        msgpack.packb([signed, bytes(forged)]),
    ):
        assert VERIFIED.get(copy, MAX) is None
        assert reason_of(copy) == RejectReason.BAD_SIGNATURE
        assert VERIFIED.get(copy, MAX) is None  # a rejected frame is never kept


def test_verified_frames_are_bounded_by_count_and_bytes() -> None:
    frames = [seal(ALICE, Text(text=str(i) * 100), now_ms=NOW)[0] for i in range(4)]
    envelope = open_(frames[0])
    kept = VerifiedFrames(max_frames=2, max_bytes=16 * 1024)
    for frame in frames:
        kept.put(frame, MAX, envelope)
    assert [kept.get(frame, MAX) is not None for frame in frames] == [False, False, True, True]
    assert kept.get(frames[3], MAX // 2) is None  # parsed under another limit: not the same
    small = VerifiedFrames(max_frames=10, max_bytes=16 * len(frames[0]) - 1)
    small.put(frames[0], MAX, envelope)  # over 1/16 of the budget: not kept
    assert small.get(frames[0], MAX) is None


def nested_arrays(size: int) -> bytes:
    """About ``size`` bytes of msgpack: an array of arrays of empty arrays (each array short
    enough for msgpack's own length limit), the shape that cost 0.36 s and 74 MiB."""
    inner = b"\xdd" + (100_000).to_bytes(4, "big") + b"\x90" * 100_000
    count = max(1, size // len(inner))
    return b"\xdc" + count.to_bytes(2, "big") + inner * count


def cpu_and_peak(work: Callable[[], object]) -> tuple[float, int]:
    """The least CPU time of a few runs of ``work`` and its peak of traced allocations."""
    cpu = []
    for _ in range(5):
        started = time.process_time()
        work()
        cpu.append(time.process_time() - started)
    tracemalloc.start()
    try:
        work()
        return min(cpu), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_hostile_nesting_costs_what_an_honest_frame_of_its_size_costs() -> None:
    bulk = nested_arrays(MAX - 1024)
    honest, _ = seal(ALICE, Blob(data=bytes(len(bulk))), now_ms=NOW)
    header = fields_of(seal(ALICE, Text(text="x"), now_ms=NOW)[0])[:7]
    signed = b"\x98" + msgpack.packb(header)[1:] + bulk  # [header..., body: nested arrays]
    packed = [msgpack.packb(field) for field in header]
    in_header = b"\x98" + b"".join(packed[:3]) + bulk + b"".join(packed[4:]) + b"\x90"
    hostile = {
        "the whole frame": (bulk, RejectReason.MALFORMED),
        "the body, unsigned": (msgpack.packb([signed, bytes(64)]), RejectReason.BAD_SIGNATURE),
        "the body, signed by the sender": (
            msgpack.packb([signed, ALICE.sign(SIGNATURE_DOMAIN + signed)]),
            RejectReason.MALFORMED,
        ),
        "a header field": (msgpack.packb([in_header, bytes(64)]), RejectReason.MALFORMED),
    }

    def open_honest() -> None:
        VERIFIED.clear()  # no shortcut through the cache
        open_(honest)

    honest_cpu, honest_peak = cpu_and_peak(open_honest)
    for name, (frame, reason) in hostile.items():
        assert len(frame) > MAX // 2
        assert reason_of(frame) == reason, name
        cpu, peak = cpu_and_peak(lambda frame=frame: reason_of(frame))  # type: ignore[misc]
        # measured side by side under the same load; the unbounded parse cost 100x and more
        assert cpu <= 5 * honest_cpu, (name, cpu, honest_cpu)
        assert peak <= max(2 * honest_peak, 4 * len(frame)), (name, peak, honest_peak)


def test_bodies_are_parsed_within_their_schema_bounds() -> None:
    frame, _ = seal(ALICE, Ping(sent_ms=5), now_ms=NOW)
    fields = fields_of(frame)
    cases = {
        "a longer array than the type holds": [5, 6],
        "more arrays than the type holds": [[]],
        "a map": {"sent_ms": 5},
        "an empty map": {},
    }
    for name, body in cases.items():
        assert reason_of(resign(ALICE, [*fields[:7], body])) == RejectReason.MALFORMED, name
    trailing = msgpack.packb(fields, use_bin_type=True) + b"\xc0"
    assert reason_of(msgpack.packb([trailing, ALICE.sign(SIGNATURE_DOMAIN + trailing)])) == (
        RejectReason.MALFORMED
    )
    assert reason_of(frame + b"\xc0") == RejectReason.MALFORMED


def test_a_crowd_of_future_dated_senders_cannot_make_honest_messages_stale() -> None:
    skew = 5_000
    replay = ReplayGuard(window_ms=60_000, max_skew_ms=skew, started_ms=NOW - skew, max_peers=50)
    crowd = [Identity.generate() for _ in range(120)]  # cheap identities, clocks at the limit
    crowd_frames = [seal(sybil, Text(text="soon"), now_ms=NOW + skew)[0] for sybil in crowd]
    refused = []
    for i, (sybil, frame) in enumerate(zip(crowd, crowd_frames, strict=True)):
        if i % 10 == 0:  # an established peer goes on talking, stamped by its honest clock
            open_(
                seal(ALICE, Text(text=str(i)), now_ms=NOW + i - 50)[0], replay=replay, now=NOW + i
            )
        try:
            open_(frame, peer=sybil.peer_id, replay=replay, now=NOW + i)
        except RemoteProtocolError as exc:
            refused.append(exc.reason)
    assert refused == [RejectReason.RATE_LIMITED] * (len(crowd) - 49)  # counted, not kept
    assert replay._global_floor <= NOW + len(crowd)  # never beyond our own clock
    # once the crowd's future has passed, a newcomer is heard at once, and none of the
    # crowd's frames, forgotten or not, is accepted again
    after = NOW + skew + 1
    bob = Identity.generate()
    open_(
        seal(bob, Text(text="hi"), now_ms=after - 50)[0], peer=bob.peer_id, replay=replay, now=after
    )
    for sybil, frame in zip(crowd, crowd_frames, strict=True):
        assert reason_of(frame, peer=sybil.peer_id, replay=replay, now=after) in (
            RejectReason.STALE,
            RejectReason.REPLAYED,
        )


def test_freshness_bounds_are_exact() -> None:
    replay = ReplayGuard(window_ms=60_000, max_skew_ms=5_000, started_ms=0)
    assert reason_of(seal(ALICE, Ping(sent_ms=1), now_ms=NOW - 60_000)[0], replay=replay) == (
        RejectReason.STALE
    )
    open_(seal(ALICE, Ping(sent_ms=2), now_ms=NOW - 59_999)[0], replay=replay)
    open_(seal(ALICE, Ping(sent_ms=3), now_ms=NOW + 5_000)[0], replay=replay)
    assert reason_of(seal(ALICE, Ping(sent_ms=4), now_ms=NOW + 5_001)[0], replay=replay) == (
        RejectReason.FUTURE
    )
    floored = ReplayGuard(window_ms=60_000, max_skew_ms=5_000, started_ms=NOW - 10)
    assert reason_of(seal(ALICE, Ping(sent_ms=5), now_ms=NOW - 10)[0], replay=floored) == (
        RejectReason.STALE
    )
    open_(seal(ALICE, Ping(sent_ms=6), now_ms=NOW - 9)[0], replay=floored)


def wide_bin(data: bytes) -> bytes:
    return b"\xc6" + len(data).to_bytes(4, "big") + data


def test_any_msgpack_width_is_accepted_and_signed_as_sent() -> None:
    """A second implementation may encode with wider formats than msgpack-python's shortest:
    the signature covers the bytes as sent, and the receiver reads every width."""
    header = fields_of(seal(ALICE, Ping(sent_ms=5), now_ms=NOW)[0])
    uint64 = lambda n: b"\xcf" + n.to_bytes(8, "big")  # noqa: E731
    signed = b"".join(
        [
            b"\xdd" + (8).to_bytes(4, "big"),  # array 32 of 8
            uint64(1),
            b"\xdb" + len(b"meshfed.ping").to_bytes(4, "big") + b"meshfed.ping",  # str 32
            wide_bin(header[2]),
            b"\xdc\x00\x02" + wide_bin(b"") + uint64(0),  # scope [b"", 0], array 16
            wide_bin(header[4]),
            uint64(NOW),
            wide_bin(b""),  # reply_to: a zero-length bin
            b"\xdd" + (1).to_bytes(4, "big") + uint64(5),  # body [5]
        ]
    )
    frame = b"\xdc\x00\x02" + wide_bin(signed) + wide_bin(ALICE.sign(SIGNATURE_DOMAIN + signed))
    envelope = open_(frame)
    assert envelope.body == Ping(sent_ms=5)
    assert envelope.scope == Scope() and envelope.reply_to == b""


def test_string_bounds_count_code_points_not_bytes() -> None:
    wide = "\u20ac" * 4096  # 4096 code points, 12,288 UTF-8 bytes: within Text's 4096
    assert open_(seal(ALICE, Text(text=wide), now_ms=NOW)[0]).body == Text(text=wide)
    fields = fields_of(seal(ALICE, Text(text="x"), now_ms=NOW)[0])
    assert reason_of(resign(ALICE, [*fields[:7], ["x" * 4097]])) == RejectReason.BAD_FIELD
