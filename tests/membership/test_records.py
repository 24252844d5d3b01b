"""Peer records: signed by their subject, newest wins, forgeries rejected everywhere."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.codec import schema_of
from meshfed.errors import RemoteProtocolError
from meshfed.identity import Identity
from meshfed.membership.records import (
    RECORD_DOMAIN,
    Capabilities,
    DatasetOffer,
    PeerQuery,
    PeerRecord,
    PeerTable,
    PriceAsk,
    Role,
    SignedPeerRecord,
    sign_record,
)
from meshfed.stats import RejectReason

ALICE, MALLORY = Identity.generate(), Identity.generate()
NOW = 1_800_000_000_000


def record(identity: Identity = ALICE, seq: int = 1, **caps: object) -> SignedPeerRecord:
    return sign_record(
        identity,
        seq=seq,
        expires_ms=NOW + 60_000,
        addrs=["/ip4/127.0.0.1/tcp/4001"],
        capabilities=Capabilities(**caps),  # type: ignore[arg-type]
    )


capabilities = st.builds(
    Capabilities,
    cpu_cores=st.integers(0, 4096),
    battery_pct=st.none() | st.integers(0, 100),
    charging=st.none() | st.booleans(),
    models=st.lists(st.text(max_size=20), max_size=5),
    datasets=st.lists(
        st.builds(DatasetOffer, name=st.text(max_size=20), examples=st.integers(0, 10**9)),
        max_size=3,
    ),
    roles=st.lists(st.sampled_from(["relay", "trainer", "inference"]), max_size=3)
    | st.just(["client-only", "trainer"]),
    prices=st.lists(
        st.builds(
            PriceAsk,
            kind=st.sampled_from(["training", "inference"]),
            tier=st.sampled_from(["small", "large"]),
            price=st.integers(0, 2**53),
        ),
        max_size=2,
    ),
)


@given(capabilities, st.integers(0, 2**32))
def test_records_round_trip(caps: Capabilities, seq: int) -> None:
    signed = sign_record(ALICE, seq=seq, expires_ms=NOW + 1, addrs=[], capabilities=caps)
    decoded = signed.verify()
    assert decoded.capabilities == caps
    assert (decoded.peer, decoded.seq) == (ALICE.peer_id, seq)


def test_newer_sequence_wins_and_older_is_ignored() -> None:
    table = PeerTable()
    assert table.apply(record(seq=2, battery_pct=80), now_ms=NOW)
    assert not table.apply(record(seq=1, battery_pct=10), now_ms=NOW)
    assert not table.apply(record(seq=2, battery_pct=80), now_ms=NOW)
    assert table.apply(record(seq=3, battery_pct=20), now_ms=NOW)
    held = table.get(ALICE.peer_id)
    assert held is not None and held.capabilities.battery_pct == 20


def test_record_claiming_another_peer_is_rejected() -> None:
    genuine = record()
    fields = schema_of(PeerRecord).encode(genuine.verify())
    fields[1] = 99  # a higher seq with a lower battery, say
    forged_bytes = msgpack.packb(fields, use_bin_type=True)
    forged = SignedPeerRecord(
        record=forged_bytes, signature=MALLORY.sign(RECORD_DOMAIN + forged_bytes)
    )
    table = PeerTable()
    with pytest.raises(RemoteProtocolError) as info:
        table.apply(forged, now_ms=NOW)
    assert info.value.reason == RejectReason.BAD_SIGNATURE
    assert len(table) == 0


def test_agreement_key_must_be_bound_to_the_subject() -> None:
    own = record(MALLORY).verify()
    swapped = dataclasses.replace(own, x25519=ALICE.x25519_public)
    encoded = msgpack.packb(schema_of(PeerRecord).encode(swapped), use_bin_type=True)
    signed = SignedPeerRecord(record=encoded, signature=MALLORY.sign(RECORD_DOMAIN + encoded))
    with pytest.raises(RemoteProtocolError, match="bound"):
        signed.verify()


def test_expired_records_are_stale_and_dropped() -> None:
    table = PeerTable()
    table.apply(record(), now_ms=NOW)
    with pytest.raises(RemoteProtocolError) as info:
        table.apply(record(MALLORY), now_ms=NOW + 60_000)
    assert info.value.reason == RejectReason.STALE
    assert table.expire(now_ms=NOW + 60_000) == [ALICE.peer_id]


def test_garbage_records_are_malformed_or_bad_fields() -> None:
    for blob in (b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb({"peer": 1})):
        with pytest.raises(RemoteProtocolError) as info:
            SignedPeerRecord(record=blob, signature=bytes(64)).verify()
        assert info.value.reason in (RejectReason.MALFORMED, RejectReason.BAD_FIELD)


@pytest.mark.parametrize(
    ("ask", "problem"),
    [
        (["training", "platinum", 5], "unknown tier"),
        (["mining", "small", 5], "unknown kind"),
        (["training", "small", 1.5], "expected int"),
        (["training", "small", 2**53 + 1], ">"),
    ],
)
def test_price_asks_outside_the_market_vocabulary_are_bad_fields(
    ask: list[object], problem: str
) -> None:
    fields = schema_of(PeerRecord).encode(record().verify())
    fields[-1][-1] = [ask]  # capabilities.prices
    encoded = msgpack.packb(fields, use_bin_type=True)
    signed = SignedPeerRecord(record=encoded, signature=ALICE.sign(RECORD_DOMAIN + encoded))
    with pytest.raises(RemoteProtocolError, match=problem) as info:
        signed.verify()
    assert info.value.reason == RejectReason.BAD_FIELD


def test_queries_answer_from_the_table() -> None:
    table = PeerTable()
    bob = Identity.generate()
    table.apply(
        record(
            ALICE,
            roles=["trainer"],
            datasets=[DatasetOffer(name="digits", examples=10)],
            battery_pct=15,
        ),
        now_ms=NOW,
    )
    table.apply(
        record(bob, roles=["trainer", "relay"], models=["mlp"], battery_pct=15, charging=True),
        now_ms=NOW,
    )
    assert {r.peer for r in table.peers(PeerQuery(role=Role.TRAINER))} == {
        ALICE.peer_id,
        bob.peer_id,
    }
    assert [r.peer for r in table.peers(PeerQuery(role=Role.RELAY))] == [bob.peer_id]
    assert [r.peer for r in table.peers(PeerQuery(dataset="digits"))] == [ALICE.peer_id]
    assert [r.peer for r in table.peers(PeerQuery(model="mlp"))] == [bob.peer_id]
    assert [r.peer for r in table.peers(PeerQuery(min_battery_pct=50))] == [bob.peer_id]  # charging


def test_unknown_roles_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown roles"):
        Capabilities(roles=["overlord"])


def test_client_only_peers_cannot_take_inbound_roles() -> None:
    with pytest.raises(ValueError, match="client-only"):
        Capabilities(roles=["client-only", "relay"])
