"""Lioness, the payload's wide-block cipher: it inverts, and a changed bit spreads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.onion.lioness import (
    LIONESS_KEY_SIZE,
    MIN_BLOCK_SIZE,
    lioness_decrypt,
    lioness_encrypt,
)
from meshfed.onion.packet import PAYLOAD_SIZE

keys = st.binary(min_size=LIONESS_KEY_SIZE, max_size=LIONESS_KEY_SIZE)


@given(key=keys, block=st.binary(min_size=MIN_BLOCK_SIZE, max_size=3000))
def test_decrypt_inverts_encrypt(key: bytes, block: bytes) -> None:
    ciphertext = lioness_encrypt(key, block)
    assert len(ciphertext) == len(block)
    assert lioness_decrypt(key, ciphertext) == block


def _differing_bits(a: bytes, b: bytes) -> int:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()


@settings(max_examples=50)
@given(key=keys, bit=st.integers(0, PAYLOAD_SIZE * 8 - 1))
def test_one_flipped_ciphertext_bit_scrambles_every_part_of_the_plaintext(
    key: bytes, bit: int
) -> None:
    """The SPRP property Sphinx relies on: no part of a tampered payload decrypts intact."""
    plain = bytes(PAYLOAD_SIZE)
    tampered = bytearray(lioness_encrypt(key, plain))
    tampered[bit // 8] ^= 1 << (bit % 8)
    garbage = lioness_decrypt(key, bytes(tampered))
    for start in range(0, PAYLOAD_SIZE, 256):
        part = slice(start, start + 256)
        assert 0.35 < _differing_bits(garbage[part], plain[part]) / 2048 < 0.65


@pytest.mark.parametrize(
    ("key", "block"),
    [
        (bytes(LIONESS_KEY_SIZE - 1), bytes(64)),
        (bytes(LIONESS_KEY_SIZE), bytes(MIN_BLOCK_SIZE - 1)),
    ],
)
def test_wrong_sizes_are_refused(key: bytes, block: bytes) -> None:
    with pytest.raises(ValueError):
        lioness_encrypt(key, block)
    with pytest.raises(ValueError):
        lioness_decrypt(key, block)
