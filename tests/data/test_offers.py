"""Data set offers on the wire: their bounds hold for a peer's signed record too."""

from __future__ import annotations

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
    PeerRecord,
    PeerTable,
    SignedPeerRecord,
    sign_record,
)
from meshfed.stats import RejectReason

NOW = 1_800_000_000_000
MALLORY = Identity.generate()

offers = st.builds(
    DatasetOffer,
    name=st.text(max_size=40),
    examples=st.integers(0, 2**40),
    feature_shape=st.lists(st.integers(1, 2**31 - 1), max_size=4),
    classes=st.integers(0, 2**31 - 1),
    label_digest=st.binary(min_size=32, max_size=32),
)


@given(st.lists(offers, max_size=32))
def test_offers_travel_in_a_record_and_come_back_equal(datasets: list[DatasetOffer]) -> None:
    signed = sign_record(
        MALLORY, seq=1, expires_ms=NOW + 60_000, addrs=[],
        capabilities=Capabilities(datasets=datasets),
    )  # fmt: skip
    assert signed.verify().capabilities.datasets == datasets


@pytest.mark.parametrize(
    ("index", "value"),
    [(2, [0]), (2, [1, 2, 3, 4, 5]), (2, [2**31]), (2, [-3]), (3, -1), (4, bytes(31))],
)
def test_a_signed_record_with_an_offer_out_of_bounds_is_refused(index: int, value: object) -> None:
    good = sign_record(
        MALLORY, seq=1, expires_ms=NOW + 60_000, addrs=[],
        capabilities=Capabilities(datasets=[DatasetOffer(name="x", examples=10)]),
    )  # fmt: skip
    fields = msgpack.unpackb(good.record, raw=False)
    fields[6][11][0][index] = value  # capabilities.datasets[0], signed by its subject
    encoded = msgpack.packb(fields, use_bin_type=True)
    bad = SignedPeerRecord(record=encoded, signature=MALLORY.sign(RECORD_DOMAIN + encoded))
    with pytest.raises(RemoteProtocolError) as refused:
        PeerTable().apply(bad, now_ms=NOW)
    assert refused.value.reason == RejectReason.BAD_FIELD
    assert schema_of(PeerRecord).decode(msgpack.unpackb(good.record, raw=False)).peer


def test_an_offer_says_its_feature_shape_is_in_range() -> None:
    with pytest.raises(ValueError, match="feature axes are 1"):
        DatasetOffer(name="x", examples=1, feature_shape=[0])
