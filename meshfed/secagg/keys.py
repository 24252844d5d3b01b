"""Who masks with whom, and with which seed: derived from signed data, never negotiated.

Every value here is a pure function of the round's *context* (job id, round, group index and the
signed roster of the group), so every peer computes the same plan without asking anyone
(ARCHITECTURE.md, "No coordinator").

- :func:`context_digest` hashes the context (and the attempt); every derivation below is bound
  to it, so a seed or a mask of one round is useless in any other.
- :func:`pair_seed` turns an X25519 shared secret into the 32-byte seed of a pairwise mask, with
  HKDF bound to the context and to both peer ids (in a fixed order, so both ends agree).
- :func:`mask_sign` says which of the two adds the pairwise mask and which subtracts it.
- :func:`neighbours` is SecAgg+'s masking graph (Bell et al., CCS 2020): with ``k`` smaller than
  the group, each peer masks only with its ``k`` neighbours on a Harary graph laid over a
  permutation of the roster drawn from the context digest (peers sorted by
  SHA-256(context || peer id)), which cuts the mask cost from
  O(g) to O(k) keystreams per peer while a coalition still needs to surround a victim.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..identity import PeerId

__all__ = ["context_digest", "derived_context", "mask_sign", "neighbours", "pair_seed"]


def context_digest(
    *, job: bytes, round: int, group: int, roster: Sequence[PeerId], attempt: int = 0
) -> bytes:
    """SHA-256 of the round's context; the roster's order does not matter, duplicates do.

    ``attempt`` counts re-runs of one group in one round (each re-run draws fresh keys).

    Raises:
        ValueError: a roster with a repeated peer.
    """
    ids = sorted(peer.raw for peer in roster)
    if len(set(ids)) != len(ids):
        raise ValueError("a roster lists each peer once")
    digest = hashlib.sha256(b"meshfed-secagg-context-v2")  # v2: masks in GCM-counter segments
    digest.update(
        struct.pack(">H", len(job)) + job + struct.pack(">QIIH", round, group, attempt, len(ids))
    )
    for raw in ids:
        digest.update(raw)
    return digest.digest()


def derived_context(
    domain: bytes, *, job: bytes, round: int, group: int, roster: Sequence[PeerId]
) -> bytes:
    """The context of another protocol over the same group (``SHA-256(domain || context
    digest)``), so that its messages can never pass for secure-aggregation ones."""
    digest = context_digest(job=job, round=round, group=group, roster=roster)
    return hashlib.sha256(domain + digest).digest()


def pair_seed(shared_secret: bytes, *, context: bytes, a: PeerId, b: PeerId) -> bytes:
    """The 32-byte seed of the pairwise mask between ``a`` and ``b`` (symmetric in them)."""
    low, high = sorted((a.raw, b.raw))
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=context,
        info=b"meshfed-secagg-pair-v1" + low + high,
    ).derive(shared_secret)


def mask_sign(me: PeerId, other: PeerId) -> int:
    """+1 if ``me`` adds the pairwise mask shared with ``other``, -1 if it subtracts it."""
    if me == other:
        raise ValueError("no pairwise mask with oneself")
    return 1 if me.raw < other.raw else -1


def neighbours(roster: Sequence[PeerId], *, k: int, context: bytes) -> dict[PeerId, set[PeerId]]:
    """Each peer's masking neighbours: everyone when ``k >= len(roster) - 1``, else a ``k``-
    regular Harary graph (``k`` even) over a permutation of the roster seeded by ``context``.

    Raises:
        ValueError: an odd ``k`` below the group size, or ``k < 2``.
    """
    peers = sorted(roster, key=lambda p: p.raw)
    if k >= len(peers) - 1:
        return {p: {q for q in peers if q != p} for p in peers}
    if k < 2 or k % 2:
        raise ValueError(f"k must be even and at least 2 (or >= group size - 1), not {k}")
    # The permutation: peers sorted by SHA-256(context || peer id), the same at every peer and
    # easy to reimplement (no language's PRNG in the protocol).
    order = sorted(peers, key=lambda p: hashlib.sha256(context + p.raw).digest())
    n = len(order)
    graph: dict[PeerId, set[PeerId]] = {p: set() for p in order}
    for index, peer in enumerate(order):
        for step in range(1, k // 2 + 1):
            graph[peer].add(order[(index + step) % n])
            graph[peer].add(order[(index - step) % n])
    return graph
