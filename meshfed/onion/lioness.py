"""Lioness: a wide-block cipher (a strong pseudorandom permutation) over the whole payload.

Anderson and Biham's Lioness (1996) is a four-round unbalanced Feistel network over a short
left part ``L`` (32 bytes here, a ChaCha20 key) and the long rest ``R``::

    encrypt:  R ^= S(L ^ K1);  L ^= H_K2(R);  R ^= S(L ^ K3);  L ^= H_K4(R)
    decrypt:  L ^= H_K4(R);  R ^= S(L ^ K3);  L ^= H_K2(R);  R ^= S(L ^ K1)

with ``S`` the ChaCha20 keystream and ``H`` keyed BLAKE2b-256. It is an SPRP when ``S`` and
``H`` are secure, which is what Sphinx asks of the payload cipher: changing any bit of a
ciphertext changes every bit of its decryption with probability 1/2, so a payload tagged by
an attacker decrypts to noise at the next honest hop and fails the destination's all-zero
authenticator (Danezis and Goldberg 2009, section 3; Katzenpost's Sphinx spec lists Lioness
as its reference SPRP; it uses AEZ for speed, which Python has no binding for).
"""

from __future__ import annotations

import hashlib

from .primitives import KEY_SIZE, stream_xor

__all__ = ["LIONESS_KEY_SIZE", "MIN_BLOCK_SIZE", "lioness_decrypt", "lioness_encrypt"]

#: bytes of a Lioness key: four 32-byte subkeys
LIONESS_KEY_SIZE = 4 * KEY_SIZE
#: the shortest block Lioness takes: the left part and at least one byte of the right
MIN_BLOCK_SIZE = KEY_SIZE + 1


def _xor32(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(KEY_SIZE, "little")


def _hash(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=KEY_SIZE).digest()


def _split(key: bytes, block: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    if len(key) != LIONESS_KEY_SIZE:
        raise ValueError(f"a Lioness key has {LIONESS_KEY_SIZE} bytes, not {len(key)}")
    if len(block) < MIN_BLOCK_SIZE:
        raise ValueError(f"a Lioness block has at least {MIN_BLOCK_SIZE} bytes, not {len(block)}")
    k = KEY_SIZE
    return key[:k], key[k : 2 * k], key[2 * k : 3 * k], key[3 * k :]


def lioness_encrypt(key: bytes, block: bytes) -> bytes:
    """Encrypt ``block`` (any length from :data:`MIN_BLOCK_SIZE`) under a 128-byte key.

    Raises:
        ValueError: the key or the block has the wrong length (a bug in the caller).
    """
    k1, k2, k3, k4 = _split(key, block)
    left, right = block[:KEY_SIZE], block[KEY_SIZE:]
    right = stream_xor(_xor32(left, k1), right)
    left = _xor32(left, _hash(k2, right))
    right = stream_xor(_xor32(left, k3), right)
    left = _xor32(left, _hash(k4, right))
    return left + right


def lioness_decrypt(key: bytes, block: bytes) -> bytes:
    """Invert :func:`lioness_encrypt`; any block of the right size decrypts (to noise if it
    was not made under this key).

    Raises:
        ValueError: the key or the block has the wrong length (a bug in the caller).
    """
    k1, k2, k3, k4 = _split(key, block)
    left, right = block[:KEY_SIZE], block[KEY_SIZE:]
    left = _xor32(left, _hash(k4, right))
    right = stream_xor(_xor32(left, k3), right)
    left = _xor32(left, _hash(k2, right))
    right = stream_xor(_xor32(left, k1), right)
    return left + right
