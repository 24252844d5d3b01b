"""The market's messages: every one round-trips through a signed envelope, every bound holds
on the wire, and digests bind a message to its exact content."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshfed.codec import schema_of
from meshfed.errors import RemoteProtocolError
from meshfed.identity import Identity
from meshfed.market.messages import (
    DIGEST_BYTES,
    MAX_ROSTER,
    MAX_SPEC_BYTES,
    MAX_UNITS,
    Award,
    Bid,
    BidCapabilities,
    DebitAck,
    DebitNote,
    DebitRefusal,
    Decline,
    DeclineReason,
    JobStatusQuery,
    JobStatusReport,
    Lease,
    LeaseDecline,
    MarketMessage,
    ModelOffer,
    ModelQuery,
    PrivacyLevel,
    ProofQuery,
    Receipt,
    RefusalReason,
    Release,
    Rfq,
    RosterUpdate,
    ScoringWeight,
    Settle,
    SettleReason,
    Verification,
    check_fresh,
    digest,
)
from meshfed.market.terms import MAX_AMOUNT, Requirements, Tier, WorkKind
from meshfed.stats import RejectReason
from meshfed.wire import ReplayGuard, message_types, open_envelope, seal

SELLER = Identity.generate()
PEERS = [Identity.generate().peer_id for _ in range(6)]
NOW = 1_700_000_000_000

jobs = st.text(min_size=1, max_size=128)
expiries = st.integers(0, 2**63 - 1)
digests = st.binary(min_size=DIGEST_BYTES, max_size=DIGEST_BYTES)
amounts = st.integers(0, MAX_AMOUNT)
units = st.integers(1, MAX_UNITS)
peers = st.sampled_from(PEERS)
rosters = st.lists(peers, min_size=1, max_size=len(PEERS), unique=True)
short = st.text(max_size=32)

requirements = st.builds(
    Requirements,
    dataset=st.text(max_size=128),
    min_examples=st.integers(0, 2**40),
    roles=st.lists(st.sampled_from(["trainer", "inference", "relay"]), max_size=3),
    min_battery_pct=st.integers(0, 100),
    unmetered=st.booleans(),
)


@st.composite
def rfqs(draw: st.DrawFn) -> Rfq:
    least = draw(st.integers(1, MAX_ROSTER))
    expires = draw(expiries)
    return Rfq(
        job=draw(jobs),
        expires_ms=expires,
        kind=draw(st.sampled_from(list(WorkKind))).value,
        tier=draw(st.sampled_from(list(Tier))).value,
        requirements=draw(requirements),
        units=draw(units),
        min_peers=least,
        max_peers=draw(st.integers(least, MAX_ROSTER)),
        budget=draw(amounts),
        bid_deadline_ms=draw(st.integers(0, expires)),
        privacy=draw(st.sampled_from(list(PrivacyLevel))).value,
        forfeit_after_s=draw(st.integers(1, 3600)),
        spec=draw(st.binary(max_size=256)),
        scoring=[
            ScoringWeight(name, value)
            for name, value in draw(
                st.dictionaries(st.text(min_size=1, max_size=32), st.floats(0.0, 1e6), max_size=4)
            ).items()
        ],
        verification=Verification(
            replicas=draw(st.integers(1, least)),
            spot_rate=draw(st.floats(0.0, 1.0)),
            window_s=draw(st.integers(1, 3600)),
        ),
    )


@st.composite
def awards(draw: st.DrawFn) -> Award:
    roster = draw(rosters)
    return Award(
        job=draw(jobs),
        expires_ms=draw(expiries),
        rfq_digest=draw(digests),
        winner=draw(st.sampled_from(roster)),
        price=draw(amounts),
        units=draw(units),
        roster=roster,
        roster_version=draw(st.integers(1, MAX_UNITS)),
        forfeit_after_s=draw(st.integers(1, 3600)),
    )


@st.composite
def roster_updates(draw: st.DrawFn) -> RosterUpdate:
    everyone = draw(st.lists(peers, min_size=1, unique=True))
    cut = draw(st.integers(1, len(everyone)))
    return RosterUpdate(
        job=draw(jobs),
        expires_ms=draw(expiries),
        roster_version=draw(st.integers(1, MAX_UNITS)),
        roster=everyone[:cut],
        from_round=draw(st.integers(0, MAX_UNITS)),
        replaced=everyone[cut:],
    )


capabilities = st.builds(
    BidCapabilities,
    examples=st.integers(0, 2**40),
    throughput=st.floats(0.0, 1e12),
    accelerator=short,
    memory_mb=st.integers(0, 2**40),
    battery_pct=st.none() | st.integers(0, 100),
    locality=short,
)

market_messages: st.SearchStrategy[MarketMessage] = st.one_of(
    rfqs(),
    st.builds(
        Bid,
        job=jobs,
        expires_ms=expiries,
        rfq_digest=digests,
        price=amounts,
        units=units,
        capabilities=capabilities,
    ),
    st.builds(
        Decline,
        job=jobs,
        expires_ms=expiries,
        rfq_digest=digests,
        reason=st.sampled_from(list(DeclineReason)).map(str),
        detail=st.text(max_size=256),
    ),
    awards(),
    st.builds(Lease, job=jobs, expires_ms=expiries, award_digest=digests),
    st.builds(LeaseDecline, job=jobs, expires_ms=expiries, award_digest=digests, detail=short),
    st.builds(Release, job=jobs, expires_ms=expiries, rfq_digest=digests),
    roster_updates(),
    st.builds(
        DebitNote,
        job=jobs,
        expires_ms=expiries,
        award_digest=digests,
        unit=units,
        amount=amounts,
        evidence=digests,
    ),
    st.builds(
        DebitAck,
        job=jobs,
        expires_ms=expiries,
        seller=peers,
        unit=units,
        amount=amounts,
        note_digest=digests,
    ),
    st.builds(
        DebitRefusal,
        job=jobs,
        expires_ms=expiries,
        seller=peers,
        unit=units,
        note_digest=digests,
        reason=st.sampled_from(list(RefusalReason)).map(str),
        agreed=st.just(b"") | digests,
    ),
    st.builds(
        ProofQuery,
        job=jobs,
        expires_ms=expiries,
        award_digest=digests,
        unit=units,
        evidence=digests,
    ),
    st.builds(
        Settle,
        job=jobs,
        expires_ms=expiries,
        units=st.integers(0, MAX_UNITS),
        amount=amounts,
        reason=st.sampled_from(list(SettleReason)).map(str),
    ),
    st.builds(
        Receipt,
        job=jobs,
        expires_ms=expiries,
        settle_digest=digests,
        units=st.integers(0, MAX_UNITS),
        amount=amounts,
    ),
    st.builds(JobStatusQuery, job=jobs, expires_ms=expiries),
    st.builds(ModelQuery, job=jobs, expires_ms=expiries, digest=st.just(b"") | digests),
    st.builds(
        ModelOffer,
        job=jobs,
        expires_ms=expiries,
        round=units,
        digest=digests,
        parameters=st.integers(1, 2**31),
    ),
    st.builds(
        JobStatusReport,
        job=jobs,
        expires_ms=expiries,
        state=short,
        round=st.integers(0, MAX_UNITS),
        rounds=st.integers(0, MAX_UNITS),
        accuracy=st.none() | st.floats(0.0, 1.0),
        examples=st.integers(0, 2**48),
        roster=st.lists(peers, max_size=len(PEERS)),
        noted=st.integers(0, MAX_UNITS),
    ),
)


def test_every_market_message_is_registered() -> None:
    registered = {
        cls for name, cls in message_types().items() if name.startswith("meshfed.market.")
    }
    assert registered == {
        Rfq,
        Bid,
        Decline,
        Award,
        Lease,
        LeaseDecline,
        Release,
        RosterUpdate,
        DebitNote,
        DebitAck,
        DebitRefusal,
        ProofQuery,
        Settle,
        Receipt,
        JobStatusQuery,
        JobStatusReport,
        ModelQuery,
        ModelOffer,
    }


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(market_messages)
def test_signed_round_trip(body: MarketMessage) -> None:
    frame, _ = seal(SELLER, body, now_ms=NOW)
    replay = ReplayGuard(window_ms=60_000, max_skew_ms=5_000, started_ms=NOW - 60_000)
    opened = open_envelope(frame, peer=SELLER.peer_id, now_ms=NOW, replay=replay, max_bytes=1 << 20)
    assert opened.body == body
    assert digest(opened.body) == digest(body)


def _decode(cls: type[MarketMessage], fields: list[Any]) -> Any:
    return schema_of(cls).unpack(msgpack.packb(fields, use_bin_type=True), max_bytes=1 << 20)


def _mutations(body: MarketMessage) -> list[tuple[str, Any]]:
    """Out-of-bounds values for the fields every message has, and for amounts and units."""
    out: list[tuple[str, Any]] = [
        ("job", ""),
        ("job", "j" * 129),
        ("expires_ms", -1),
        ("expires_ms", 1.5),
    ]
    for name in ("amount", "price", "budget"):
        if hasattr(body, name):
            out += [(name, -1), (name, MAX_AMOUNT + 1), (name, True)]
    for name in ("rfq_digest", "award_digest", "note_digest", "settle_digest", "evidence"):
        if hasattr(body, name):
            out += [(name, b"\x00" * 31), (name, b"\x00" * 33)]
    for name in ("unit", "units"):
        if hasattr(body, name):
            out += [(name, MAX_UNITS + 1)]
    return out


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(market_messages, st.data())
def test_every_bound_is_enforced_on_the_wire(body: MarketMessage, data: st.DataObject) -> None:
    names = [field.name for field in dataclasses.fields(body)]  # type: ignore[arg-type]
    encoded = schema_of(type(body)).encode(body)
    name, bad = data.draw(st.sampled_from(_mutations(body)))
    encoded[names.index(name)] = bad
    with pytest.raises(RemoteProtocolError) as caught:
        _decode(type(body), encoded)
    assert caught.value.reason is RejectReason.BAD_FIELD


def test_inconsistent_messages_are_refused_as_bad_fields() -> None:
    base = Award(
        job="j",
        expires_ms=NOW,
        rfq_digest=bytes(32),
        winner=PEERS[0],
        price=5,
        units=2,
        roster=PEERS[:2],
        roster_version=1,
        forfeit_after_s=60,
    )
    encoded = schema_of(Award).encode(base)
    assert _decode(Award, encoded) == base
    cases: list[tuple[type[MarketMessage], list[Any]]] = []
    outsider = list(encoded)
    outsider[3] = PEERS[5].raw  # the winner is not in the roster
    twice = list(encoded)
    twice[6] = [PEERS[0].raw, PEERS[0].raw]
    cases += [(Award, outsider), (Award, twice)]
    decline = schema_of(Decline).encode(
        Decline(job="j", expires_ms=NOW, rfq_digest=bytes(32), reason="busy", detail="")
    )
    decline[3] = "because"
    cases.append((Decline, decline))
    change = schema_of(RosterUpdate).encode(
        RosterUpdate(
            job="j", expires_ms=NOW, roster_version=2, roster=PEERS[:2], from_round=3, replaced=[]
        )
    )
    change[5] = [PEERS[0].raw]  # replaced and still in the roster
    cases.append((RosterUpdate, change))
    refusal = schema_of(DebitRefusal).encode(
        DebitRefusal("j", NOW, PEERS[0], 1, bytes(32), RefusalReason.WRONG.value, bytes(32))
    )
    cases += [
        (DebitRefusal, [*refusal[:5], "because", refusal[6]]),  # no such reason
        (DebitRefusal, [*refusal[:6], bytes(31)]),  # agreed is a digest or empty
    ]
    rfq = schema_of(Rfq).encode(
        Rfq("j", NOW, "training", "small", Requirements(), 3, 2, 4, 10, NOW, "none", 60, b"", [])
    )
    cases += [
        (Rfq, [*rfq[:14], [3, 0.0, 120]]),  # 3 replicas asked of at least 2 peers
        (Rfq, [*rfq[:14], [1, 1.5, 120]]),  # a spot rate above 1
        (Rfq, [*rfq[:14], [0, 0.0, 120]]),  # no replica
    ]
    for cls, fields in cases:
        with pytest.raises(RemoteProtocolError) as caught:
            _decode(cls, fields)
        assert caught.value.reason is RejectReason.BAD_FIELD


@given(rfqs())
def test_rfq_refuses_a_spec_over_64_kib_and_unknown_tiers(rfq: Rfq) -> None:
    encoded = schema_of(Rfq).encode(rfq)
    for index, bad in ((13, b"x" * (MAX_SPEC_BYTES + 1)), (3, "huge"), (2, "mining"), (11, "")):
        fields = list(encoded)
        fields[index] = bad
        with pytest.raises(RemoteProtocolError):
            _decode(Rfq, fields)


@given(market_messages, market_messages)
def test_one_message_one_digest_and_distinct_messages_distinct_digests(
    a: MarketMessage, b: MarketMessage
) -> None:
    assert digest(a) == digest(dataclasses.replace(a))  # type: ignore[type-var]
    assert len(digest(a)) == DIGEST_BYTES
    if digest(a) == digest(b):
        assert a == b


def test_a_digest_binds_the_type_too() -> None:
    lease = Lease(job="j", expires_ms=NOW, award_digest=bytes(32))
    release = Release(job="j", expires_ms=NOW, rfq_digest=bytes(32))
    assert schema_of(Lease).encode(lease) == schema_of(Release).encode(release)
    assert digest(lease) != digest(release)


def test_expired_messages_are_refused() -> None:
    query = JobStatusQuery(job="j", expires_ms=NOW)
    check_fresh(query, NOW)
    with pytest.raises(RemoteProtocolError) as caught:
        check_fresh(query, NOW + 1)
    assert caught.value.reason is RejectReason.STALE


def test_peer_ids_in_rosters_are_checked() -> None:
    encoded = schema_of(RosterUpdate).encode(
        RosterUpdate(
            job="j", expires_ms=NOW, roster_version=1, roster=PEERS[:1], from_round=0, replaced=[]
        )
    )
    encoded[3] = [b"\x00" * 38]
    with pytest.raises(RemoteProtocolError):
        _decode(RosterUpdate, encoded)
