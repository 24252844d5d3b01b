"""Masking plans: the same at every peer, bound to the round, symmetric, k-regular."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from meshfed.identity import Identity
from meshfed.secagg.keys import context_digest, mask_sign, neighbours, pair_seed

PEERS = [Identity.generate().peer_id for _ in range(40)]


def test_both_ends_derive_the_same_seed_and_opposite_signs() -> None:
    a_key, b_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    a, b = PEERS[0], PEERS[1]
    context = context_digest(job=b"j", round=1, group=0, roster=PEERS[:5])
    seed_at_a = pair_seed(a_key.exchange(b_key.public_key()), context=context, a=a, b=b)
    seed_at_b = pair_seed(b_key.exchange(a_key.public_key()), context=context, a=b, b=a)
    assert seed_at_a == seed_at_b and len(seed_at_a) == 32
    assert mask_sign(a, b) == -mask_sign(b, a)
    other_round = context_digest(job=b"j", round=2, group=0, roster=PEERS[:5])
    assert pair_seed(a_key.exchange(b_key.public_key()), context=other_round, a=a, b=b) != seed_at_a


def test_context_ignores_roster_order_but_not_its_members() -> None:
    base = context_digest(job=b"j", round=3, group=1, roster=PEERS[:6])
    assert base == context_digest(job=b"j", round=3, group=1, roster=list(reversed(PEERS[:6])))
    assert base != context_digest(job=b"j", round=3, group=1, roster=PEERS[:5])
    assert base != context_digest(job=b"j", round=3, group=2, roster=PEERS[:6])
    with pytest.raises(ValueError, match="once"):
        context_digest(job=b"j", round=3, group=1, roster=[PEERS[0], PEERS[0]])


@given(st.integers(3, 40), st.integers(1, 10), st.binary(min_size=32, max_size=32))
def test_neighbour_graphs_are_symmetric_and_regular(size: int, half: int, context: bytes) -> None:
    roster = PEERS[:size]
    k = 2 * half
    graph = neighbours(roster, k=k, context=context)
    assert set(graph) == set(roster)
    for peer, around in graph.items():
        assert peer not in around
        assert all(peer in graph[other] for other in around)  # symmetric
        assert len(around) == min(k, size - 1)
    assert graph == neighbours(list(reversed(roster)), k=k, context=context)  # same everywhere


def test_the_graph_changes_with_the_round() -> None:
    one = neighbours(PEERS, k=4, context=b"a" * 32)
    two = neighbours(PEERS, k=4, context=b"b" * 32)
    assert one != two
    with pytest.raises(ValueError, match="even"):
        neighbours(PEERS, k=5, context=b"a" * 32)
