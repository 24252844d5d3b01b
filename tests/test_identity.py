"""Identity: created once, kept across restarts, refused when exposed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.errors import IdentityError
from meshfed.identity import Identity, PeerId, load_or_create_identity, verify_x25519_binding

ALICE = Identity.generate()


def test_first_start_creates_a_private_key_file(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path / "node")
    key_file = tmp_path / "node" / "identity.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert load_or_create_identity(tmp_path / "node").peer_id == identity.peer_id


def test_world_readable_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / "identity.key", 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(tmp_path)


def test_corrupt_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "identity.key").write_bytes(b"not a key")
    os.chmod(tmp_path / "identity.key", 0o600)
    with pytest.raises(IdentityError, match="not a meshfed identity"):
        load_or_create_identity(tmp_path)


def test_a_symlink_planted_at_the_temporary_key_file_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    (data_dir / "identity.tmp").symlink_to(victim)
    identity = load_or_create_identity(data_dir)
    assert victim.read_bytes() == b"precious"  # neither truncated nor given the key
    key_file = data_dir / "identity.key"
    assert not key_file.is_symlink() and key_file.stat().st_mode & 0o777 == 0o600
    assert not (data_dir / "identity.tmp").exists()
    assert load_or_create_identity(data_dir).peer_id == identity.peer_id


def test_a_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "someone-elses.key"
    Identity.generate().save(planted)  # a key its planter knows, mode 0600
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    (data_dir / "identity.key").symlink_to(planted)
    with pytest.raises(IdentityError, match="regular file"):
        load_or_create_identity(data_dir)


def test_peer_id_is_the_libp2p_one() -> None:
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    identity = Identity.generate()
    libp2p_key = Ed25519PrivateKey.from_bytes(identity.ed25519_seed())
    assert str(ID.from_pubkey(libp2p_key.get_public_key())) == str(identity.peer_id)
    assert str(identity.peer_id).startswith("12D3KooW")
    assert PeerId.from_string(str(identity.peer_id)) == identity.peer_id


def test_signatures_verify_only_for_the_signer() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    signature = alice.sign(b"hello")
    assert alice.peer_id.verify(signature, b"hello")
    assert not alice.peer_id.verify(signature, b"hellO")
    assert not bob.peer_id.verify(signature, b"hello")


@settings(max_examples=50)
@given(st.binary(max_size=300), st.integers(0, 8 * 364 - 1))
def test_any_flipped_bit_breaks_a_signature(data: bytes, bit: int) -> None:
    signature = ALICE.sign(data)
    assert ALICE.peer_id.verify(signature, data)
    signed = bytearray(signature + data)
    if bit >= 8 * len(signed):
        return
    signed[bit // 8] ^= 1 << (bit % 8)
    assert not ALICE.peer_id.verify(bytes(signed[:64]), bytes(signed[64:]))
    assert not ALICE.peer_id.verify(signature[:63], data)  # a short signature is no signature


def test_x25519_key_is_bound_to_the_identity() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    assert verify_x25519_binding(alice.peer_id, alice.x25519_public, alice.x25519_binding)
    # Mallory cannot pass her agreement key off as Alice's.
    assert not verify_x25519_binding(alice.peer_id, mallory.x25519_public, mallory.x25519_binding)
    assert alice.agree(mallory.x25519_public) == mallory.agree(alice.x25519_public)


def test_malformed_peer_ids_are_rejected() -> None:
    with pytest.raises(ValueError):
        PeerId(b"\x00" * 38)
    with pytest.raises(ValueError):
        PeerId.from_string("0OIl")
