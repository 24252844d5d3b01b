"""Key epochs: the window a key is held in, the key ring, and the signed publication."""

from __future__ import annotations

import os

import pytest

from meshfed.errors import ConfigError, LocalProtocolError
from meshfed.identity import Identity
from meshfed.onion import (
    EpochSchedule,
    KeyRing,
    derive_epoch_secret,
    onion_key_statement,
    verify_onion_key,
)
from meshfed.onion.primitives import x25519_base

SCHEDULE = EpochSchedule(period=100.0, grace=10.0)


def test_an_epochs_key_is_held_from_grace_before_it_starts_to_grace_after_it_ends() -> None:
    assert SCHEDULE.epoch_at(250.0) == 2
    assert [SCHEDULE.accepts(2, t) for t in (189.9, 190.0, 309.9, 310.0)] == [
        False,
        True,
        True,
        False,
    ]
    assert SCHEDULE.retires_at(2) == 310.0


@pytest.mark.parametrize(("period", "grace"), [(0.5, 0.0), (100.0, 51.0), (100.0, -1.0)])
def test_a_schedule_out_of_range_is_a_config_error(period: float, grace: float) -> None:
    with pytest.raises(ConfigError):
        EpochSchedule(period=period, grace=grace)


def test_the_ring_asks_for_the_current_and_next_keys_and_retires_old_ones() -> None:
    ring = KeyRing(SCHEDULE)
    assert ring.wanted(250.0) == [2, 3]
    for epoch in ring.wanted(250.0):
        ring.install(epoch, os.urandom(32))
    assert ring.wanted(250.0) == []
    assert ring.secret_for(3, 250.0) is None  # installed, published, not yet in use
    assert ring.secret_for(3, 295.0) is not None
    assert ring.retire(309.0) == []
    assert ring.retire(310.0) == [2]
    assert ring.epochs == [3]
    with pytest.raises(LocalProtocolError, match="install it first"):
        ring.public_key(2)


def test_a_key_once_installed_never_changes() -> None:
    ring = KeyRing(SCHEDULE)
    ring.install(1, bytes(range(32)))
    with pytest.raises(LocalProtocolError, match="never change"):
        ring.install(1, os.urandom(32))
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        ring.install(2, b"short")
    assert ring.public_key(1) == x25519_base(bytes(range(32)))


def test_derived_secrets_are_the_same_for_a_seed_and_epoch_and_differ_otherwise() -> None:
    seed = b"s" * 32
    assert derive_epoch_secret(seed, 7) == derive_epoch_secret(seed, 7)
    assert len({derive_epoch_secret(seed, e) for e in range(5)}) == 5
    assert derive_epoch_secret(seed, 7) != derive_epoch_secret(b"t" * 32, 7)


def test_a_published_onion_key_verifies_only_for_its_peer_epoch_and_key() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    key = x25519_base(os.urandom(32))
    signature = alice.sign(onion_key_statement(alice.peer_id, 5, key))
    assert verify_onion_key(alice.peer_id, 5, key, signature)
    assert not verify_onion_key(alice.peer_id, 6, key, signature)
    assert not verify_onion_key(bob.peer_id, 5, key, signature)
    assert not verify_onion_key(alice.peer_id, 5, x25519_base(os.urandom(32)), signature)
    assert not verify_onion_key(alice.peer_id, -1, key, signature)
