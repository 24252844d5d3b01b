"""The sender's shortcut: one X25519 multiplication by a combined scalar gives the point the
relays reach by blinding one factor at a time, for every key and alpha on the curve."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.onion.primitives import (
    GROUP_ORDER,
    clamped,
    combined_scalar,
    x25519,
    x25519_base,
)

scalars = st.binary(min_size=32, max_size=32)
# a point of order 8
_TORSION = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


@settings(max_examples=60, deadline=None)
@given(st.lists(scalars, min_size=1, max_size=5), scalars)
def test_a_combined_scalar_reaches_the_point_of_the_blinding_chain(
    factors: list[bytes], secret: bytes
) -> None:
    point = x25519_base(secret)
    chained: bytes | None = point
    product = 1
    for factor in factors:
        assert chained is not None
        chained = x25519(factor, chained)
        product = product * clamped(factor) % GROUP_ORDER
    combined = combined_scalar(product)
    assert combined is not None and clamped(combined) == int.from_bytes(combined, "little")
    assert x25519(combined, point) == chained
    base_chain: bytes | None = x25519_base(factors[0])
    for factor in factors[1:]:
        assert base_chain is not None
        base_chain = x25519(factor, base_chain)
    assert x25519_base(combined) == base_chain


def test_a_low_order_key_is_refused_by_a_combined_scalar_as_by_the_chain() -> None:
    factor = os.urandom(32)
    combined = combined_scalar(clamped(factor))
    assert combined is not None
    assert x25519(combined, _TORSION) is None
    assert x25519(factor, _TORSION) is None


@given(st.integers(min_value=0, max_value=GROUP_ORDER - 1))
def test_a_combined_scalar_exists_for_all_but_a_vanishing_few_products(product: int) -> None:
    combined = combined_scalar(product)
    m = product * pow(8, -1, GROUP_ORDER) % GROUP_ORDER
    if combined is None:  # neither m nor l - m is in [2^251, 2^252)
        assert m >= 2**252 or GROUP_ORDER - m >= 2**252
    else:
        value = int.from_bytes(combined, "little")
        assert value % 8 == 0 and 2**254 <= value < 2**255
        assert value % GROUP_ORDER in (product, GROUP_ORDER - product)


def test_the_rare_product_without_a_combined_scalar_is_said() -> None:
    m = 2**252 + 1  # in [2^252, l): neither m nor l - m is in [2^251, 2^252)
    assert combined_scalar(8 * m % GROUP_ORDER) is None
