"""Onion key epochs: which X25519 key a node peels packets with, and for how long.

Every node keeps its long-term X25519 key (``identity.py``) for other uses; its onion keys
are separate and change every epoch, so that a key that leaks later opens only the packets
of its own epochs, and a relay's replay cache can forget the tags of an epoch whose key is
gone. Epochs are global: epoch ``e`` runs from ``e * period`` to ``(e + 1) * period`` seconds
of Unix time, so every packet built in one epoch names the same number and the number tells
an observer nothing but the rough time the packet was built.

A node holds a key from ``grace`` before its epoch starts (clock skew) until ``grace``
after it ends (packets still in flight, SURBs made late in the epoch); a packet whose epoch
is outside that window is dropped as :attr:`~.events.DropReason.UNKNOWN_EPOCH`. A node
publishes the public key of the current and of the next epoch in its signed record, with
:func:`onion_key_statement` signed by its identity key.

Where a key comes from is the driver's choice: ``os.urandom(32)`` stored in the node's store
and erased at retirement (forward secrecy across epochs), or :func:`derive_epoch_secret`
from a seed (nothing to store, but the seed opens every epoch's packets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, LocalProtocolError
from ..identity import PeerId
from .packet import MAX_EPOCH
from .primitives import KEY_SIZE, x25519_base

__all__ = [
    "EpochSchedule",
    "KeyRing",
    "derive_epoch_secret",
    "onion_key_statement",
    "verify_onion_key",
]

_STATEMENT_DOMAIN = b"meshfed-onion-key-v1"
_SEED_INFO = b"meshfed-onion-v1 epoch secret"


@dataclass(frozen=True, kw_only=True)
class EpochSchedule:
    """When epochs start and how long a node keeps an epoch's key around them.

    Args:
        period: seconds per epoch.
        grace: seconds a key is held before its epoch starts and after it ends; at most
            half the period, so at most three keys are held at once.

    Raises:
        ConfigError: a value is out of range.
    """

    period: float = 3600.0
    grace: float = 600.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.period) and self.period >= 1.0):
            raise ConfigError(f"onion epoch period must be at least 1 s, not {self.period}")
        if not (math.isfinite(self.grace) and 0.0 <= self.grace <= self.period / 2):
            raise ConfigError(f"onion key grace must be in 0..period/2, not {self.grace}")

    def epoch_at(self, now: float) -> int:
        """The epoch that runs at Unix time ``now`` (the one a sender builds for)."""
        return min(max(0, math.floor(now / self.period)), MAX_EPOCH)

    def starts_at(self, epoch: int) -> float:
        """When ``epoch`` begins."""
        return epoch * self.period

    def retires_at(self, epoch: int) -> float:
        """When a node drops ``epoch``'s key and forgets its replay tags."""
        return (epoch + 1) * self.period + self.grace

    def accepts(self, epoch: int, now: float) -> bool:
        """True if a packet for ``epoch`` is processed at ``now``."""
        return self.starts_at(epoch) - self.grace <= now < self.retires_at(epoch)


class KeyRing:
    """A node's onion secret keys by epoch (sans-IO: the driver installs and stores them)."""

    def __init__(self, schedule: EpochSchedule) -> None:
        self.schedule = schedule
        self._secrets: dict[int, bytes] = {}

    @property
    def epochs(self) -> list[int]:
        """The epochs a key is installed for, oldest first."""
        return sorted(self._secrets)

    def wanted(self, now: float) -> list[int]:
        """Epochs that need a key installed now: the current one and the next (publish the
        next epoch's key before it starts, so senders have it in time)."""
        current = self.schedule.epoch_at(now)
        candidates = (current, min(current + 1, MAX_EPOCH))
        return [e for e in dict.fromkeys(candidates) if e not in self._secrets]

    def install(self, epoch: int, secret: bytes) -> None:
        """Use ``secret`` (32 random or derived bytes) as the key of ``epoch``.

        Raises:
            LocalProtocolError: a key is installed for ``epoch`` already, or the arguments are
                out of range.
        """
        if not 0 <= epoch <= MAX_EPOCH:
            raise LocalProtocolError(f"epoch {epoch} is not an unsigned 32-bit number")
        if len(secret) != KEY_SIZE:
            raise LocalProtocolError(f"an onion secret has {KEY_SIZE} bytes, not {len(secret)}")
        if epoch in self._secrets:
            raise LocalProtocolError(f"epoch {epoch} has a key already; keys never change")
        self._secrets[epoch] = bytes(secret)

    def secret_for(self, epoch: int, now: float) -> bytes | None:
        """The key to peel a packet of ``epoch`` with at ``now``, or ``None``."""
        secret = self._secrets.get(epoch)
        if secret is None or not self.schedule.accepts(epoch, now):
            return None
        return secret

    def public_key(self, epoch: int) -> bytes:
        """The 32-byte X25519 public key of ``epoch``, for the signed record.

        Raises:
            LocalProtocolError: no key is installed for ``epoch``.
        """
        secret = self._secrets.get(epoch)
        if secret is None:
            raise LocalProtocolError(f"no onion key for epoch {epoch}; install it first")
        return x25519_base(secret)

    def retire(self, now: float) -> list[int]:
        """Forget the keys whose epoch and grace are over; returns their epochs (the driver
        erases their stored copies and the replay cache forgets their tags)."""
        gone = [e for e in self._secrets if now >= self.schedule.retires_at(e)]
        for epoch in gone:
            del self._secrets[epoch]
        return sorted(gone)


def derive_epoch_secret(seed: bytes, epoch: int) -> bytes:
    """A 32-byte onion secret for ``epoch`` from a node's seed (e.g.
    ``identity.derive_key(b"meshfed-onion-seed-v1")``): HKDF-SHA256(seed, info || epoch)."""
    if not 0 <= epoch <= MAX_EPOCH:
        raise LocalProtocolError(f"epoch {epoch} is not an unsigned 32-bit number")
    info = _SEED_INFO + epoch.to_bytes(4, "big")
    return HKDF(algorithm=SHA256(), length=KEY_SIZE, salt=None, info=info).derive(seed)


def onion_key_statement(peer: PeerId, epoch: int, public_key: bytes) -> bytes:
    """What a node signs to publish its onion key for ``epoch``:
    ``b"meshfed-onion-key-v1" || peer id (38) || epoch (u32 BE) || public key (32)``."""
    return _STATEMENT_DOMAIN + peer.raw + epoch.to_bytes(4, "big") + public_key


def verify_onion_key(peer: PeerId, epoch: int, public_key: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``peer``'s signature over its onion key for ``epoch``."""
    if len(public_key) != KEY_SIZE or not 0 <= epoch <= MAX_EPOCH:
        return False
    return peer.verify(signature, onion_key_statement(peer, epoch, public_key))
