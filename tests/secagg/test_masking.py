"""The pieces fit: pairwise masks from X25519 + HKDF + AES-CTR cancel in the group sum."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.identity import Identity
from meshfed.secagg.keys import context_digest, mask_sign, neighbours, pair_seed
from meshfed.secagg.prg import expand_mask

U32 = np.dtype(np.uint32)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(3, 12),
    st.sampled_from([2, 4, 100]),
    st.integers(1, 2000),
    st.integers(0, 2**32 - 1),
)
def test_pairwise_masks_cancel_in_the_sum(group: int, k: int, length: int, seed: int) -> None:
    peers = [Identity.generate().peer_id for _ in range(group)]
    keys = {p: X25519PrivateKey.generate() for p in peers}
    context = context_digest(job=b"job", round=7, group=0, roster=peers)
    graph = neighbours(
        peers, k=min(k, group - 1) if k < group - 1 and k % 2 == 0 else 100, context=context
    )
    rng = np.random.default_rng(seed)
    inputs = {p: rng.integers(0, 2**32, length, dtype=np.uint32) for p in peers}
    masked = {}
    for me in peers:
        vector = inputs[me].copy()
        for other in graph[me]:
            secret = keys[me].exchange(keys[other].public_key())
            mask = expand_mask(pair_seed(secret, context=context, a=me, b=other), length, dtype=U32)
            if mask_sign(me, other) > 0:
                vector += mask
            else:
                vector -= mask
        masked[me] = vector
        if graph[me]:
            assert not np.array_equal(vector, inputs[me])  # nothing leaves in the clear
    total = np.zeros(length, np.uint32)
    for vector in masked.values():
        total += vector
    expected = np.zeros(length, np.uint32)
    for vector in inputs.values():
        expected += vector
    assert np.array_equal(total, expected)
