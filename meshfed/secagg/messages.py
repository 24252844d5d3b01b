"""The secure-aggregation messages (SPEC.md, "Secure aggregation"), one per phase.

Every message carries the 32-byte ``context`` of its run (job, round, group, attempt, roster:
:func:`meshfed.secagg.keys.context_digest`), so a message of one run is rejected by every other
run; the envelope around it says who sent it and signs it. Masked inputs and slice sums are not
messages but arrays (``meshfed.arrays``) named ``secagg.input:<context hex>`` and
``secagg.sum:<context hex>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..codec import bounded
from ..identity import PeerId
from ..wire import Message, message

__all__ = [
    "MAX_GROUP",
    "AdvertiseKeys",
    "InputsReceived",
    "RollCall",
    "SealedShares",
    "ShareKeys",
    "SharePart",
    "Survivors",
    "Unmask",
]

#: the largest group the protocol runs (and so the longest peer list on the wire)
MAX_GROUP = 128
_CONTEXT = 32
_KEY = 32
_SHARE_Y = 66
#: two Shamir share values (66 bytes each) sealed with AES-GCM (16-byte tag)
_SEALED_SHARES = 2 * _SHARE_Y + 16


@message("meshfed.secagg.keys")
@dataclass(frozen=True, slots=True)
class AdvertiseKeys(Message):
    """Phase 1: this run's ephemeral X25519 public keys, one to seal shares, one for masks."""

    context: bytes = bounded(min_len=_CONTEXT, max_len=_CONTEXT)
    cipher_key: bytes = bounded(min_len=_KEY, max_len=_KEY)
    mask_key: bytes = bounded(min_len=_KEY, max_len=_KEY)


@dataclass(frozen=True, slots=True)
class SealedShares:
    """One receiver's shares of the sender's mask key and self-mask seed, sealed for it alone."""

    peer: PeerId
    sealed: bytes = bounded(min_len=_SEALED_SHARES, max_len=_SEALED_SHARES)


@message("meshfed.secagg.shares")
@dataclass(frozen=True, slots=True)
class ShareKeys(Message):
    """Phase 2, one message to every peer whose keys arrived: each one's shares of the sender's
    mask key and self-mask seed, sealed for that peer alone (a receiver opens its own entry;
    the others are ciphertexts under keys it does not hold).

    ``self_mask_digest`` commits to the self-mask seed so that a rebuilt seed is checked, and
    the keys are repeated so that a receiver that missed phase 1 still has them.
    """

    context: bytes = bounded(min_len=_CONTEXT, max_len=_CONTEXT)
    cipher_key: bytes = bounded(min_len=_KEY, max_len=_KEY)
    mask_key: bytes = bounded(min_len=_KEY, max_len=_KEY)
    self_mask_digest: bytes = bounded(min_len=32, max_len=32)
    sealed: list[SealedShares] = bounded(max_len=MAX_GROUP)


@message("meshfed.secagg.roll_call")
@dataclass(frozen=True, slots=True)
class RollCall(Message):
    """Phase 3: the peers whose shares the sender holds (itself included). The run goes on only
    if every listed peer lists the same set: it becomes the set of slice owners."""

    context: bytes = bounded(min_len=_CONTEXT, max_len=_CONTEXT)
    members: list[PeerId] = bounded(max_len=MAX_GROUP)


@message("meshfed.secagg.received")
@dataclass(frozen=True, slots=True)
class InputsReceived(Message):
    """Phase 5, from each slice owner: whose masked slice reached it before its deadline."""

    context: bytes = bounded(min_len=_CONTEXT, max_len=_CONTEXT)
    senders: list[PeerId] = bounded(max_len=MAX_GROUP)


@message("meshfed.secagg.survivors")
@dataclass(frozen=True, slots=True)
class Survivors(Message):
    """Phase 6, the consistency check: the survivor set the sender computed, signed (by the
    envelope). Nobody unmasks unless every owner signed the same set."""

    context: bytes = bounded(min_len=_CONTEXT, max_len=_CONTEXT)
    survivors: list[PeerId] = bounded(max_len=MAX_GROUP)


@dataclass(frozen=True, slots=True)
class SharePart:
    """The sender's share of one peer's secret: which peer, and the share value."""

    peer: PeerId
    y: bytes = bounded(min_len=_SHARE_Y, max_len=_SHARE_Y)


@message("meshfed.secagg.unmask")
@dataclass(frozen=True, slots=True)
class Unmask(Message):
    """Phase 7: shares of the survivors' self-mask seeds and of the dropped peers' mask keys;
    never both for one peer."""

    context: bytes = bounded(min_len=_CONTEXT, max_len=_CONTEXT)
    self_masks: list[SharePart] = bounded(max_len=MAX_GROUP)
    mask_keys: list[SharePart] = bounded(max_len=MAX_GROUP)
