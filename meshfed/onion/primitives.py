"""The cryptographic primitives of the onion layer, each used the same way at every hop.

=====================  ==========================================================
group (``EXP``)        X25519 (libsodium ``crypto_scalarmult``; scalars clamped)
key derivation         HKDF-SHA256 of the 32-byte shared secret, one call per hop
stream cipher (``S``)  ChaCha20, 256-bit key, nonce and counter zero (keys are single-use)
MAC (``gamma``)        keyed BLAKE2b, 16-byte tag
wide-block cipher      Lioness over ChaCha20 and keyed BLAKE2b (see :mod:`.lioness`)
=====================  ==========================================================

Every key below is derived from one X25519 shared secret, which is fresh for every packet and
hop (the sender's ephemeral scalar is random per packet), so a zero nonce never repeats under
one key. ``x25519`` answers ``None`` for a point whose product is the identity (a low-order
point): the caller turns that into its own rejection, never a library exception.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import CryptoError

__all__ = [
    "GROUP_ELEMENT_SIZE",
    "GROUP_ORDER",
    "KEY_SIZE",
    "MAC_SIZE",
    "REPLAY_TAG_SIZE",
    "HopKeys",
    "clamped",
    "combined_scalar",
    "derive_hop_keys",
    "mac",
    "mac_ok",
    "stream_xor",
    "x25519",
    "x25519_base",
]

#: bytes of an X25519 group element (alpha) and of a scalar
GROUP_ELEMENT_SIZE = 32
#: bytes of every symmetric key
KEY_SIZE = 32
#: bytes of the header MAC (gamma): 128-bit forgery resistance
MAC_SIZE = 16
#: bytes of a relay's replay tag
REPLAY_TAG_SIZE = 16

_KDF_INFO = b"meshfed-onion-v1 hop keys"
_ZERO_NONCE = bytes(16)  # ChaCha20 in cryptography: 4-byte counter || 12-byte nonce


def x25519(scalar: bytes, point: bytes) -> bytes | None:
    """``scalar * point`` on Curve25519 (the scalar clamped), or ``None`` when the result is
    the identity: ``point`` has low order and must be refused."""
    try:
        return bytes(crypto_scalarmult(scalar, point))
    except CryptoError:
        return None


def x25519_base(scalar: bytes) -> bytes:
    """``scalar * G``: the public key of ``scalar``."""
    return bytes(crypto_scalarmult_base(scalar))


#: the order ``l`` of Curve25519's prime-order subgroup (where honest keys and alphas live)
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493
_INVERSE_OF_8 = pow(8, -1, GROUP_ORDER)


def clamped(scalar: bytes) -> int:
    """``scalar`` as X25519 uses it: little-endian, the low 3 bits and bit 255 cleared, bit
    254 set."""
    value = int.from_bytes(scalar, "little")
    return (value & ~7 & ((1 << 255) - 1)) | (1 << 254)


def combined_scalar(product: int) -> bytes | None:
    """A 32-byte scalar ``c`` that X25519 leaves as it is (``clamped(c) == c``) and with
    ``x25519(c, P) == x25519(s_k, ... x25519(s_1, P))`` for every ``P`` on the curve (not the
    twist), ``product`` being ``clamped(s_1) * ... * clamped(s_k)``: one scalar
    multiplication instead of ``k``.

    Both sides are the same multiple of ``P``'s prime-order part (a multiple of 8 kills the
    rest), up to sign, which an x-coordinate does not show: ``c = 8m`` with ``m = +-product / 8
    mod l`` in ``[2^251, 2^252)``. ``None`` when neither sign lands there (probability about
    2^-127): then draw another sender scalar.
    """
    m = product * _INVERSE_OF_8 % GROUP_ORDER
    for candidate in (m, GROUP_ORDER - m):
        if 1 << 251 <= candidate < 1 << 252:
            return (8 * candidate).to_bytes(32, "little")
    return None


@dataclass(frozen=True, slots=True)
class HopKeys:
    """Everything one hop derives from its shared secret (the Sphinx ``h_*`` functions)."""

    #: keys the header MAC (gamma)
    header_mac: bytes
    #: keys the stream cipher over the routing information (beta)
    header_stream: bytes
    #: the four Lioness subkeys of the payload (delta), 128 bytes
    payload: bytes
    #: the scalar that blinds alpha for the next hop
    blinding: bytes
    #: this hop's replay tag: the same packet always gives the same tag
    replay_tag: bytes


def derive_hop_keys(shared_secret: bytes) -> HopKeys:
    """All of one hop's keys from its X25519 shared secret (one HKDF-SHA256 call)."""
    k = KEY_SIZE
    okm = HKDF(algorithm=SHA256(), length=7 * k + REPLAY_TAG_SIZE, salt=None, info=_KDF_INFO)
    material = okm.derive(shared_secret)
    return HopKeys(
        header_mac=material[:k],
        header_stream=material[k : 2 * k],
        payload=material[2 * k : 6 * k],
        blinding=material[6 * k : 7 * k],
        replay_tag=material[7 * k :],
    )


def stream_xor(key: bytes, data: bytes) -> bytes:
    """``data`` XOR the ChaCha20 keystream of ``key`` (encrypts and decrypts)."""
    return Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor().update(data)


def mac(key: bytes, data: bytes) -> bytes:
    """The 16-byte keyed-BLAKE2b tag of ``data``."""
    return hashlib.blake2b(data, key=key, digest_size=MAC_SIZE).digest()


def mac_ok(key: bytes, data: bytes, tag: bytes) -> bool:
    """True if ``tag`` is the tag of ``data`` under ``key`` (constant-time comparison)."""
    return hmac.compare_digest(mac(key, data), tag)
