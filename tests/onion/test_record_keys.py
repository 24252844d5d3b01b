"""Onion keys in the signed peer record: bounded, and bound to their peer and epoch."""

from __future__ import annotations

import os

import pytest

from meshfed.errors import RemoteProtocolError
from meshfed.identity import Identity
from meshfed.membership.records import Capabilities, OnionKey, SignedPeerRecord, sign_record
from meshfed.onion import onion_key_statement, verify_onion_key
from meshfed.onion.primitives import x25519_base
from meshfed.stats import RejectReason

ALICE, MALLORY = Identity.generate(), Identity.generate()


def _key(identity: Identity, epoch: int, signer: Identity | None = None) -> OnionKey:
    public = x25519_base(os.urandom(32))
    signature = (signer or identity).sign(onion_key_statement(identity.peer_id, epoch, public))
    return OnionKey(epoch, public, signature)


def _signed(keys: list[OnionKey]) -> SignedPeerRecord:
    caps = Capabilities(roles=["relay"], onion_keys=keys)
    return sign_record(ALICE, seq=1, expires_ms=2**50, addrs=[], capabilities=caps)


def test_published_keys_travel_in_the_record_and_verify() -> None:
    keys = [_key(ALICE, 7), _key(ALICE, 8)]
    record = _signed(keys).verify()
    assert record.capabilities.onion_keys == keys
    for key in record.capabilities.onion_keys:
        assert verify_onion_key(ALICE.peer_id, key.epoch, key.public_key, key.signature)


def test_a_key_signed_by_another_peer_or_moved_to_another_epoch_does_not_verify() -> None:
    forged = _key(ALICE, 7, signer=MALLORY)
    assert not verify_onion_key(ALICE.peer_id, 7, forged.public_key, forged.signature)
    honest = _key(ALICE, 7)
    assert not verify_onion_key(ALICE.peer_id, 8, honest.public_key, honest.signature)
    assert not verify_onion_key(MALLORY.peer_id, 7, honest.public_key, honest.signature)


def test_a_record_with_too_many_keys_is_a_bad_field() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        _signed([_key(ALICE, e) for e in range(4)]).verify()
    assert info.value.reason == RejectReason.BAD_FIELD
