"""Shamir sharing: any t shares rebuild the secret; fewer do not."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.secagg.shamir import PRIME, Share, combine, split


@given(st.binary(min_size=32, max_size=32), st.data())
def test_any_threshold_subset_rebuilds_the_secret(secret: bytes, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 12))
    t = data.draw(st.integers(1, n))
    shares = split(secret, shares=n, threshold=t, random_bytes=os.urandom)
    subset = data.draw(st.permutations(shares)).__getitem__(slice(0, data.draw(st.integers(t, n))))
    assert combine(subset) == secret


def test_fewer_than_threshold_shares_do_not_rebuild_it() -> None:
    secret = bytes(range(32))
    shares = split(secret, shares=5, threshold=3, random_bytes=os.urandom)
    for pair in ([shares[0], shares[1]], [shares[2], shares[4]]):
        with contextlib.suppress(ValueError):  # or not even a 32-byte value
            assert combine(pair) != secret


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_one_share_of_two_is_consistent_with_every_secret(secret: bytes, other: bytes) -> None:
    """Hiding, t = 2: whatever share a curious peer holds, for every candidate secret there is a
    degree-1 polynomial through it, so the share says nothing about which secret it was."""
    [held, _] = split(secret, shares=2, threshold=2, random_bytes=os.urandom)
    y = int.from_bytes(held.y, "big")
    forged = Share(2, ((2 * y - int.from_bytes(other, "big")) % PRIME).to_bytes(66, "big"))
    assert combine([held, forged]) == other


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        split(b"short", shares=3, threshold=2, random_bytes=os.urandom)
    with pytest.raises(ValueError):
        split(bytes(32), shares=2, threshold=3, random_bytes=os.urandom)
    share = split(bytes(32), shares=2, threshold=2, random_bytes=os.urandom)[0]
    with pytest.raises(ValueError, match="distinct"):
        combine([share, share])
    with pytest.raises(ValueError):
        Share(0, share.y)
