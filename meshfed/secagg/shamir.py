"""Shamir t-of-n secret sharing of 32-byte secrets over GF(2^521 - 1).

The field is the Mersenne prime ``p = 2^521 - 1``, larger than any 32-byte secret, so a secret
is one field element. A share is ``(x, f(x))`` for a random polynomial ``f`` of degree
``t - 1`` with ``f(0) = secret``; any ``t`` shares give the secret back by Lagrange
interpolation at 0, and ``t - 1`` shares are uniformly distributed whatever the secret
(information-theoretic hiding). Randomness comes in as ``random_bytes`` so the maths is
testable and the caller chooses the source (``os.urandom`` in production).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["PRIME", "Share", "combine", "split"]

PRIME = (1 << 521) - 1
_ELEMENT_BYTES = 66


@dataclass(frozen=True, slots=True)
class Share:
    """One share: the evaluation point ``x`` (1..n) and ``f(x)`` as 66 big-endian bytes."""

    x: int
    y: bytes

    def __post_init__(self) -> None:
        if not 1 <= self.x < PRIME or len(self.y) != _ELEMENT_BYTES:
            raise ValueError("a share is x in [1, p) and 66 bytes of f(x)")
        if int.from_bytes(self.y, "big") >= PRIME:
            raise ValueError("share value is not a field element")


def split(
    secret: bytes, *, shares: int, threshold: int, random_bytes: Callable[[int], bytes]
) -> list[Share]:
    """Cut a 32-byte ``secret`` into ``shares`` shares, any ``threshold`` of which rebuild it.

    Raises:
        ValueError: unless ``1 <= threshold <= shares`` and the secret has 32 bytes.
    """
    if len(secret) != 32:
        raise ValueError(f"secrets have 32 bytes, not {len(secret)}")
    if not 1 <= threshold <= shares:
        raise ValueError(f"need 1 <= threshold ({threshold}) <= shares ({shares})")
    coefficients = [int.from_bytes(secret, "big")]
    for _ in range(threshold - 1):
        coefficients.append(int.from_bytes(random_bytes(_ELEMENT_BYTES + 8), "big") % PRIME)
    result = []
    for x in range(1, shares + 1):
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        result.append(Share(x, y.to_bytes(_ELEMENT_BYTES, "big")))
    return result


def combine(shares: Sequence[Share]) -> bytes:
    """The secret from ``threshold`` (or more) distinct shares.

    Raises:
        ValueError: on repeated evaluation points, or if the result is not a 32-byte secret
            (too few shares, or shares of different secrets).
    """
    xs = [share.x for share in shares]
    if len(set(xs)) != len(xs) or not xs:
        raise ValueError("shares must have distinct evaluation points")
    secret = 0
    for i, share in enumerate(shares):
        numerator, denominator = 1, 1
        for j, other in enumerate(xs):
            if j != i:
                numerator = numerator * -other % PRIME
                denominator = denominator * (share.x - other) % PRIME
        lagrange = numerator * pow(denominator, -1, PRIME) % PRIME
        secret = (secret + int.from_bytes(share.y, "big") * lagrange) % PRIME
    if secret >= 1 << 256:
        raise ValueError("these shares do not rebuild a 32-byte secret (too few, or mixed)")
    return secret.to_bytes(32, "big")
