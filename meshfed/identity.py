"""Who a node is: an Ed25519 signing key, its libp2p peer id, and a bound X25519 key.

The Ed25519 key is the node's identity. Its peer id is the libp2p one: the identity
multihash of the protobuf-encoded public key, so that libp2p peers and ours agree on names
(``12D3KooW...``). The X25519 key is for key agreement (secure aggregation, onion routing);
it is bound to the identity by an Ed25519 signature over
``b"meshfed-x25519-binding-v1" || x25519_public`` so that nobody can substitute their own.

On disk (``<data_dir>/identity.key``, mode 0600) the file holds the two 32-byte private keys,
Ed25519 seed first, behind a magic line. A node refuses to start when that file can be read
by group or others: a leaked identity key lets anyone sign as the node.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from .errors import IdentityError

__all__ = ["Identity", "PeerId", "load_or_create_identity", "verify_x25519_binding"]

# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}, then identity multihash (0x00, len)
_ED25519_PROTOBUF_PREFIX = b"\x08\x01\x12\x20"
_IDENTITY_MULTIHASH_PREFIX = b"\x00\x24"
_PEER_ID_PREFIX = _IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX
_BINDING_DOMAIN = b"meshfed-x25519-binding-v1"
_KEY_FILE = "identity.key"
_KEY_MAGIC = b"meshfed-identity-v1\n"
_MAX_KNOWN = 65536


@dataclass(frozen=True, slots=True)
class PeerId:
    """A libp2p peer id for an Ed25519 key (38 bytes; ``str()`` gives ``12D3KooW...``)."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes):
            raise TypeError(f"a peer id is bytes, not {type(self.raw).__name__}")
        if len(self.raw) != len(_PEER_ID_PREFIX) + 32 or not self.raw.startswith(_PEER_ID_PREFIX):
            raise ValueError(f"not an Ed25519 libp2p peer id: {self.raw.hex()}")

    # Peer ids are dict keys and set members everywhere: compare and hash the bytes alone
    # (a bytes object caches its hash; the generated methods build a tuple on every call).
    def __eq__(self, other: object) -> bool:
        if type(other) is not PeerId:
            return NotImplemented
        return self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    @classmethod
    def of(cls, raw: bytes) -> PeerId:
        """``PeerId(raw)``, the same object for the same bytes while they keep coming: ids are
        dict keys everywhere, and a lookup that finds the very object skips comparing bytes.

        Raises:
            ValueError: ``raw`` is not an Ed25519 peer id.
        """
        peer = _KNOWN.get(raw)
        if peer is None:
            peer = cls(raw)
            if len(_KNOWN) >= _MAX_KNOWN:
                _KNOWN.clear()
            _KNOWN[raw] = peer
        return peer

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        """The peer id of a raw 32-byte Ed25519 public key."""
        if len(public_key) != 32:
            raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(public_key)}")
        return cls.of(_PEER_ID_PREFIX + public_key)

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse the base58btc form (``12D3KooW...``).

        Raises:
            ValueError: if ``text`` is not the peer id of an Ed25519 key.
        """
        try:
            raw = base58.b58decode(text)
        except ValueError as exc:
            raise ValueError(f"peer id {text!r} is not base58") from exc
        return cls.of(raw)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key this id embeds."""
        return self.raw[len(_PEER_ID_PREFIX) :]

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this peer's Ed25519 signature of ``data``.

        libsodium checks it (strict RFC 8032: no non-canonical encodings or small-order
        keys), in ~60% of the time OpenSSL takes here: every message a node receives pays it.
        """
        if len(signature) != 64:
            return False
        try:
            crypto_sign_open(signature + data, self.public_key)
        except BadSignatureError:
            return False
        return True

    def __str__(self) -> str:
        text: str = base58.b58encode(self.raw).decode("ascii")
        return text

    def __repr__(self) -> str:
        return f"PeerId({self})"

    def short(self) -> str:
        """The last 6 characters of the string form, for logs and tables."""
        return str(self)[-6:]


_KNOWN: dict[bytes, PeerId] = {}  # see PeerId.of


class Identity:
    """A node's private keys. Create with :meth:`generate` or :func:`load_or_create_identity`."""

    def __init__(self, signing_key: Ed25519PrivateKey, agreement_key: X25519PrivateKey) -> None:
        self._signing_key = signing_key
        self._agreement_key = agreement_key
        public = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.peer_id = PeerId.from_public_key(public)
        self.x25519_public = agreement_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.x25519_binding = self.sign(_BINDING_DOMAIN + self.x25519_public)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity from the OS random source."""
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @classmethod
    def from_seeds(cls, ed25519_seed: bytes, x25519_seed: bytes) -> Identity:
        """Rebuild an identity from its two 32-byte private keys."""
        return cls(
            Ed25519PrivateKey.from_private_bytes(ed25519_seed),
            X25519PrivateKey.from_private_bytes(x25519_seed),
        )

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._signing_key.sign(data)

    def agree(self, peer_x25519_public: bytes) -> bytes:
        """The raw X25519 shared secret with a peer's key (feed it to HKDF; never use it raw)."""
        return self._agreement_key.exchange(X25519PublicKey.from_public_bytes(peer_x25519_public))

    def derive_key(self, purpose: bytes) -> bytes:
        """A 32-byte secret key for ``purpose`` (e.g. ``b"meshfed-store-v1"``), derived from
        the private keys: HKDF-SHA256(ed25519_seed || x25519_private, info=purpose)."""
        return HKDF(algorithm=SHA256(), length=32, salt=None, info=purpose).derive(
            self.ed25519_seed() + self._x25519_seed()
        )

    def ed25519_seed(self) -> bytes:
        """The 32-byte Ed25519 private seed (for handing the key to libp2p)."""
        return self._signing_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def _x25519_seed(self) -> bytes:
        return self._agreement_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def save(self, path: Path) -> None:
        """Write both private keys to ``path`` with mode 0600, atomically: into a new
        ``<path>.tmp`` (created exclusively, never through a symlink: whatever sits at that
        name is removed first), then renamed over ``path``.

        Raises:
            IdentityError: the temporary file cannot be created.
        """
        tmp = path.with_suffix(".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # a crash's leftover, or a planted link: removed, not followed
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            raise IdentityError(f"cannot create {tmp} for the node's key: {exc}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(_KEY_MAGIC + self.ed25519_seed() + self._x25519_seed())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def verify_x25519_binding(peer: PeerId, x25519_public: bytes, binding: bytes) -> bool:
    """True if ``binding`` is ``peer``'s signature over its X25519 public key."""
    return len(x25519_public) == 32 and peer.verify(binding, _BINDING_DOMAIN + x25519_public)


def load_or_create_identity(data_dir: Path) -> Identity:
    """Load the identity in ``data_dir``, creating it (and the directory) on first start.

    Raises:
        IdentityError: if the key file is readable by group or others (fix with
            ``chmod 600``), is a symlink, or is not a meshfed identity file.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / _KEY_FILE
    if not path.exists() and not path.is_symlink():
        identity = Identity.generate()
        identity.save(path)
        return identity
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:  # ELOOP: a symlink, which could lend us someone else's key
        raise IdentityError(f"{path} cannot be opened as a regular file: {exc}") from None
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"{path} has mode {mode:o}: other users can read the node's private key. "
                f"Run `chmod 600 {path}` (and consider the key compromised) before starting."
            )
        blob = f.read(len(_KEY_MAGIC) + 65)
    if not blob.startswith(_KEY_MAGIC) or len(blob) != len(_KEY_MAGIC) + 64:
        raise IdentityError(f"{path} is not a meshfed identity file (wrong magic or length)")
    body = blob[len(_KEY_MAGIC) :]
    return Identity.from_seeds(body[:32], body[32:])
