"""The secure-aggregation protocol for one peer of one group: a sans-IO state machine.

Theory of operation (SPEC.md, "Secure aggregation"). Bonawitz et al. (CCS 2017) with double
masking, run without a server: every decision the server made there is made here by every
peer from signed messages, and checked to be the same everywhere before anything is revealed.

===========  ==================================================================================
phase        what this peer does when it enters the phase
===========  ==================================================================================
KEYS         sends its two ephemeral X25519 public keys to the roster
SHARES       cuts its mask key and self-mask seed into Shamir t-of-g shares and seals one of
             each to every peer whose keys arrived (AES-GCM, key from X25519 + HKDF)
ROLL_CALL    lists whose shares it holds; the run goes on only if every listed peer lists the
             same set, which becomes the *owners* (they hold each other's shares)
INPUT        sends slice m of ``y = x + PRG(b) + sum(+-PRG(s_uv))`` to owner m (butterfly)
RECEIVED     as owner m, reports whose slice m arrived in time
SURVIVORS    computes the survivors S (slices at every owner) and signs S: the consistency check
UNMASK       once every owner signed the same S: reveals its shares of the self-mask seeds of S
             and of the mask keys of the owners outside S (never both for one peer)
SUM          as owner m, rebuilds those secrets, removes the masks from the sum of slice m and
             sends the slice sum to every owner; the concatenated slices are the result
===========  ==================================================================================

The machine never waits: :meth:`SecAggPeer.receive` and :meth:`SecAggPeer.receive_slice` take
what arrived, :meth:`SecAggPeer.expire` says the phase deadline passed, and each returns the
actions to carry out (:class:`Send`, :class:`SendSlice`, then one :class:`Finished` or
:class:`Aborted`). A phase ends as soon as everyone it waits for has answered. Messages for a
later phase are kept until it starts; a message for a phase that ended is rejected as late.

A run aborts (with a reason) instead of ever producing a wrong sum. Before the unmask phase,
nothing about any input has been revealed, so :class:`SecAggSession` re-runs the group with
fresh keys (attempt + 1, same roster: whoever went silent just does not show up again). After
it, a re-run would let owners difference two sums of the same inputs, so there is none
(``Aborted.released``).
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from ..errors import ConfigError, RemoteProtocolError
from ..identity import PeerId
from ..stats import RejectReason
from ..wire import Message
from .bounds import DEFAULT_COLLUSION, least_threshold, smallest_group
from .keys import context_digest, mask_sign, neighbours, pair_seed
from .messages import (
    MAX_GROUP,
    AdvertiseKeys,
    InputsReceived,
    RollCall,
    SealedShares,
    ShareKeys,
    SharePart,
    Survivors,
    Unmask,
)
from .prg import add_masks
from .ring import Levels
from .shamir import PRIME, Share, combine, split

__all__ = [
    "AbortReason",
    "Aborted",
    "Action",
    "Finished",
    "GroupSpec",
    "Phase",
    "Progress",
    "Rejected",
    "SecAggPeer",
    "Send",
    "SendSlice",
    "SliceKind",
    "SecAggSession",
    "slice_bounds",
]

_SHARE_INFO = b"meshfed-secagg-shares-v1"
_SHARE_BYTES = 66  # one Shamir share value (shamir: GF(2^521 - 1), big-endian)
_ZERO_NONCE = bytes(12)  # each sealing key is used once (one context, one direction)


class Phase(enum.IntEnum):
    """The phases in order; see the module docstring."""

    KEYS = 1
    SHARES = 2
    ROLL_CALL = 3
    INPUT = 4
    RECEIVED = 5
    SURVIVORS = 6
    UNMASK = 7
    SUM = 8
    DONE = 9
    ABORTED = 10


class AbortReason(enum.StrEnum):
    """Why a run ended without a sum."""

    #: fewer than ``threshold`` peers took part in a phase
    TOO_FEW = "too_few"
    #: the roll call showed peers holding different sets of shares (someone left mid-phase)
    VIEWS_DIFFER = "views_differ"
    #: a slice owner went silent before anything was revealed: re-run without it
    OWNER_LOST = "owner_lost"
    #: owners signed different survivor sets, or a rebuilt secret fails its commitment
    INCONSISTENT = "inconsistent"
    #: a slice owner went silent after the unmask phase: its slice sum is lost for good
    SLICE_LOST = "slice_lost"
    #: ``threshold`` peers called the roll without us (our shares came too late): they go on
    #: without us, so a re-run would only wait for them; final
    LEFT_OUT = "left_out"


class SliceKind(enum.StrEnum):
    """The arrays of a butterfly (the array name is ``<kind>:<context hex>``)."""

    #: a masked input slice (ring elements), to its owner
    INPUT = "secagg.input"
    #: an owner's unmasked slice sum (ring elements), to every owner
    SUM = "secagg.sum"
    #: the same two without masks (float32), for plain averaging
    PLAIN_INPUT = "butterfly.input"
    PLAIN_SUM = "butterfly.sum"
    #: a whole vector to every member (float32), for robust aggregation
    GATHER = "gather.vector"


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSpec:
    """One run of one group: what every member must agree on before it starts.

    Attributes:
        job, round, group: where the run belongs (bound into every key and message).
        roster: the members, in slice order.
        threshold: ``t``; secrets need ``t`` shares, a run needs ``t`` survivors. More than
            half the roster, so that two different survivor sets cannot both be signed, and at
            least ``collusion + 2``, so that every sum the run reveals holds two honest inputs
            or more (:mod:`~meshfed.secagg.bounds`; :func:`~meshfed.secagg.bounds.threshold_for`
            gives the least such ``t``).
        collusion: ``c``, how many members may collude (share what they see, and lie about
            whose input arrived). ``0`` only for groups whose inputs are already sums of two
            honest inputs or more (later Moshpit steps): a member of such a group learns a sum,
            never one peer's input.
        neighbours: SecAgg+'s ``k`` (even): mask with ``k`` neighbours only; ``None`` masks
            with everyone (Bonawitz).
        ring_bits: 32 (``uint32`` levels) or 16 (``uint16``, the 8-bit mode).
        attempt: 0, then 1, 2 ... for re-runs (:func:`next_attempt`).
    """

    job: bytes
    round: int
    group: int
    roster: tuple[PeerId, ...]
    threshold: int
    neighbours: int | None = None
    ring_bits: int = 32
    attempt: int = 0
    collusion: int = DEFAULT_COLLUSION

    def __post_init__(self) -> None:
        size = len(self.roster)
        if len(set(self.roster)) != size or not 2 <= size <= MAX_GROUP:
            raise ConfigError(f"a roster lists 2..{MAX_GROUP} distinct peers, not {size}")
        if self.collusion < 0:
            raise ConfigError(f"collusion must be >= 0, not {self.collusion}")
        least = least_threshold(size, self.collusion)
        if least > size:
            raise ConfigError(
                f"a secure group of {size} cannot resist {self.collusion} colluding member(s): "
                f"they could declare the others dropped and read a single peer's input from the "
                f"sum; use groups of {smallest_group(self.collusion)} or more"
            )
        if not least <= self.threshold <= size:
            raise ConfigError(
                f"threshold {self.threshold} of a group of {size} must be in {least}..{size}: a "
                f"majority, and at least collusion + 2 = {self.collusion + 2} so that every "
                f"revealed sum holds two honest inputs or more"
            )
        k = self.neighbours
        if k is not None and (k < 2 or k % 2):
            raise ConfigError(f"neighbours must be even and >= 2, not {k}")
        # A survivor's slice stays hidden while one honest neighbour of it survives: colluders
        # are up to c of its neighbours and can have up to size - t honest ones declared
        # dropped (whose mask keys are then revealed).
        if k is not None and k < min(size - 1, self.collusion + 1 + size - self.threshold):
            raise ConfigError(
                f"neighbours {k} leave a member of a group of {size} (threshold "
                f"{self.threshold}) without an honest neighbour once {self.collusion} "
                f"colluder(s) declare {size - self.threshold} others dropped: use at least "
                f"{self.collusion + 1 + size - self.threshold} (or None: everyone)"
            )
        if self.ring_bits not in (16, 32):
            raise ConfigError(f"ring_bits must be 16 or 32, not {self.ring_bits}")

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger[Any]]:
        """The numpy dtype of ring elements."""
        return np.dtype(np.uint32 if self.ring_bits == 32 else np.uint16)

    @property
    def context(self) -> bytes:
        """The 32-byte digest every message and key of the run is bound to."""
        return context_digest(
            job=self.job, round=self.round, group=self.group, roster=self.roster,
            attempt=self.attempt,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to ``to`` (a signed request; the answer is an acknowledgement)."""

    to: PeerId
    message: Message


@dataclass(frozen=True, slots=True)
class SendSlice:
    """Stream ``array`` to ``to`` as the array named ``<kind>:<context hex>``."""

    to: PeerId
    kind: SliceKind
    array: npt.NDArray[Any]
    context: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message accepted earlier turned out invalid once its phase began: count it."""

    peer: PeerId
    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The run's result in pieces: for a butterfly, the sum of the survivors' inputs (in the
    ring, for secure runs) as the owners' slices in order (:attr:`total` joins them; a caller
    that converts the sum anyway can write each part straight into its output and skip that
    copy); for a gather, the survivors' vectors."""

    parts: tuple[npt.NDArray[Any], ...]
    survivors: tuple[PeerId, ...]

    @property
    def total(self) -> npt.NDArray[Any]:
        """The whole sum, one array."""
        return np.concatenate(self.parts)


@dataclass(frozen=True, slots=True)
class Aborted:
    """The run ended without a sum.

    Attributes:
        released: this peer revealed unmask shares, so the group must not re-run this round.
    """

    reason: AbortReason
    detail: str
    released: bool


Action = Send | SendSlice | Rejected | Finished | Aborted


@dataclass(frozen=True, slots=True)
class Progress:
    """A session's step (any comparable key that changes when a phase ends), how many
    answers the step waits for, and how many are in."""

    step: tuple[int, int]
    expected: int
    arrived: int
    #: the phase's name, for people and logs
    phase: str


def slice_bounds(length: int, owners: int, index: int) -> tuple[int, int]:
    """Elements ``[lo, hi)`` of a ``length`` vector owned by owner ``index`` of ``owners``."""
    return index * length // owners, (index + 1) * length // owners


@dataclass(frozen=True, slots=True)
class _Held:
    """What one peer's ShareKeys gave us: our shares of its secrets and its commitment."""

    mask_key_share: bytes
    self_mask_share: bytes
    self_mask_digest: bytes


_PHASES = tuple(Phase)
_PHASE_NAMES = {phase: phase.name.lower() for phase in Phase}
_PHASE_OF: dict[type[Message], Phase] = {
    AdvertiseKeys: Phase.KEYS,
    ShareKeys: Phase.SHARES,
    RollCall: Phase.ROLL_CALL,
    InputsReceived: Phase.RECEIVED,
    Survivors: Phase.SURVIVORS,
    Unmask: Phase.UNMASK,
}
_SLICE_PHASE = {SliceKind.INPUT: Phase.INPUT, SliceKind.SUM: Phase.SUM}


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _reject(reason: RejectReason, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason=reason)


def _agree(mine: X25519PrivateKey, theirs: bytes) -> bytes:
    """X25519 of our private key and a peer's public key.

    Raises:
        RemoteProtocolError: ``bad_field`` for a low-order key (an all-zero result).
    """
    try:
        return mine.exchange(X25519PublicKey.from_public_bytes(theirs))
    except ValueError:
        raise _reject(RejectReason.BAD_FIELD, "low-order X25519 key") from None


def _check_share(y: bytes) -> None:
    """A Shamir share value from a peer must be a field element.

    Raises:
        RemoteProtocolError: ``bad_field`` for a value at or above the field's prime.
    """
    if len(y) != _SHARE_BYTES or int.from_bytes(y, "big") >= PRIME:
        raise _reject(RejectReason.BAD_FIELD, "a share value outside the field")


class SecAggPeer:
    """One peer's side of one run. Call :meth:`start`, then feed it what arrives.

    Args:
        spec: the run (every member builds the same spec).
        me: this peer (in ``spec.roster``).
        levels: this peer's input, a 1-D array of ``spec.dtype`` at least as long as the roster
            (quantize floats with :class:`~meshfed.secagg.ring.Quantizer` first).
        random_bytes: the randomness source for keys, secrets and shares (``os.urandom``;
            tests pass a seeded one).
        buffer: where to write the masked vector (same shape and dtype as ``levels``; a new
            array if ``None``). It must not change until the run's sends are done.
    """

    def __init__(
        self,
        spec: GroupSpec,
        me: PeerId,
        levels: Levels,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        buffer: Levels | None = None,
    ) -> None:
        if me not in spec.roster:
            raise ValueError("this peer is not in the roster")
        if levels.ndim != 1 or levels.dtype != spec.dtype or len(levels) < len(spec.roster):
            raise ValueError(
                f"input must be a 1-D {spec.dtype} array with at least {len(spec.roster)} elements"
            )
        self.spec = spec
        self.me = me
        self.context = spec.context
        self.phase = Phase.KEYS
        if buffer is not None and (buffer.shape != levels.shape or buffer.dtype != levels.dtype):
            raise ValueError("the buffer must have the input's shape and dtype")
        self._levels = levels
        self._buffer = buffer
        self._index = {peer: i for i, peer in enumerate(spec.roster)}
        self._random_bytes = random_bytes
        self._cipher_key = X25519PrivateKey.from_private_bytes(random_bytes(32))
        self._mask_key = X25519PrivateKey.from_private_bytes(random_bytes(32))
        self._self_seed = random_bytes(32)
        self._keys: dict[PeerId, tuple[bytes, bytes]] = {
            me: (_raw_public(self._cipher_key), _raw_public(self._mask_key))
        }
        #: each peer's keys, agreed with ours when they arrived (X25519 cipher, mask secrets)
        self._agreed: dict[PeerId, tuple[bytes, bytes]] = {}
        self._inbox: dict[Phase, dict[PeerId, Any]] = {phase: {} for phase in _PHASES}
        self._expected: frozenset[PeerId] = frozenset()
        self._owners: tuple[PeerId, ...] = ()
        self._graph: dict[PeerId, set[PeerId]] = {}
        self._survivors: tuple[PeerId, ...] = ()
        self._released = False
        self._started = False

    # -- what the driver asks ------------------------------------------------------------------

    @property
    def waiting_for(self) -> frozenset[PeerId]:
        """The peers the current phase still waits for."""
        if self.phase >= Phase.DONE:
            return frozenset()
        return self._expected - self._inbox[self.phase].keys()

    @property
    def expected(self) -> frozenset[PeerId]:
        """Everyone the current phase waits for (answered or not)."""
        return self._expected if self.phase < Phase.DONE else frozenset()

    @property
    def owners(self) -> tuple[PeerId, ...]:
        """The slice owners, once the roll call agreed on them."""
        return self._owners

    def start(self) -> list[Action]:
        """Begin the run: advertise this run's keys."""
        if self._started:
            raise RuntimeError("start() is called once")
        self._started = True
        cipher_key, mask_key = self._keys[self.me]
        advert = AdvertiseKeys(context=self.context, cipher_key=cipher_key, mask_key=mask_key)
        return self._enter(Phase.KEYS, self.spec.roster, [advert]) + self._progress()

    def receive(self, sender: PeerId, message: Message) -> list[Action]:
        """Take a verified message from ``sender``.

        Raises:
            RemoteProtocolError: the message is for another run, from a stranger, late, a
                duplicate, or invalid; nothing changed (count it).
        """
        phase = _PHASE_OF.get(type(message))
        if phase is None:
            raise _reject(RejectReason.UNKNOWN_TYPE, f"{message.TYPE} is not a secagg message")
        self._admit(sender, phase, getattr(message, "context", b""))
        self._inbox[phase][sender] = self._check(sender, message)
        if phase is Phase.ROLL_CALL and self._left_out():
            return self._abort(
                AbortReason.LEFT_OUT, f"{self.spec.threshold} peers go on without us"
            )
        return self._progress()

    def receive_slice(self, sender: PeerId, kind: SliceKind, array: Levels) -> list[Action]:
        """Take a masked input slice or a slice sum from ``sender`` (context already matched).

        Raises:
            RemoteProtocolError: as for :meth:`receive`, or the array has the wrong dtype.
        """
        phase = _SLICE_PHASE.get(kind)
        if phase is None:
            raise _reject(RejectReason.UNKNOWN_TYPE, f"{kind} is not a secure-aggregation array")
        self._admit(sender, phase, self.context)
        if array.dtype != self.spec.dtype or array.ndim != 1:
            raise _reject(RejectReason.BAD_ARRAY, f"a slice is a 1-D {self.spec.dtype} array")
        if self._owners:
            self._check_slice_length(sender, phase, array)
        self._inbox[phase][sender] = array
        return self._progress()

    def expire(self) -> list[Action]:
        """The current phase's deadline passed: go on with what arrived (or abort)."""
        if self.phase >= Phase.DONE:
            return []
        return self._advance() + self._progress()

    # -- admission -----------------------------------------------------------------------------

    def _admit(self, sender: PeerId, phase: Phase, context: bytes) -> None:
        if context != self.context:
            raise _reject(RejectReason.WRONG_CONTEXT, "message of another run")
        if sender not in self._index or sender == self.me:
            raise _reject(RejectReason.NOT_A_MEMBER, f"{sender.short()} is not in this group")
        if phase < self.phase or self.phase >= Phase.DONE:
            raise _reject(RejectReason.LATE, f"{phase.name} message after that phase ended")
        if sender in self._inbox[phase]:
            raise _reject(RejectReason.DUPLICATE, f"second {phase.name} message from the peer")

    def _check(self, sender: PeerId, message: Message) -> Any:
        """Validate one message against what we know; return what the inbox keeps."""
        if isinstance(message, AdvertiseKeys):
            agreed = self._agree_keys(sender, message.cipher_key, message.mask_key)
            self._keep_keys(sender, message.cipher_key, message.mask_key, agreed)
            return message
        if isinstance(message, ShareKeys):
            agreed = self._agree_keys(sender, message.cipher_key, message.mask_key)
            held = self._open_shares(sender, message, agreed[0])
            self._keep_keys(sender, message.cipher_key, message.mask_key, agreed)
            return held
        if isinstance(message, RollCall | InputsReceived | Survivors):
            if isinstance(message, RollCall):
                peers = message.members
            elif isinstance(message, InputsReceived):
                peers = message.senders
            else:
                peers = message.survivors
            listed = frozenset(peers)
            if len(listed) != len(peers) or not listed <= self._index.keys():
                raise _reject(RejectReason.BAD_FIELD, "a peer list with repeats or strangers")
            return listed
        assert isinstance(message, Unmask)
        for part in (*message.self_masks, *message.mask_keys):
            _check_share(part.y)
        self_masks = {part.peer: part.y for part in message.self_masks}
        mask_keys = {part.peer: part.y for part in message.mask_keys}
        if self_masks.keys() & mask_keys.keys():
            raise _reject(
                RejectReason.INCONSISTENT, "shares of both secrets of one peer: never allowed"
            )
        return self_masks, mask_keys

    def _agree_keys(
        self, sender: PeerId, cipher_key: bytes, mask_key: bytes
    ) -> tuple[bytes, bytes]:
        """X25519 of our keys with the sender's, checked here at the door (a low-order key is
        rejected before anything keeps it): later phases only read what this agreed."""
        known = self._keys.get(sender)
        if known is not None and known != (cipher_key, mask_key):
            raise _reject(RejectReason.INCONSISTENT, "keys differ from the ones advertised")
        agreed = self._agreed.get(sender)
        if agreed is None:
            agreed = (_agree(self._cipher_key, cipher_key), _agree(self._mask_key, mask_key))
        return agreed

    def _keep_keys(
        self, sender: PeerId, cipher_key: bytes, mask_key: bytes, agreed: tuple[bytes, bytes]
    ) -> None:
        self._keys[sender] = (cipher_key, mask_key)
        self._agreed[sender] = agreed

    def _check_slice_length(self, sender: PeerId, phase: Phase, array: Levels) -> None:
        owner = self.me if phase is Phase.INPUT else sender
        if owner not in self._owners:
            raise _reject(RejectReason.NOT_A_MEMBER, f"{owner.short()} owns no slice")
        lo, hi = slice_bounds(len(self._levels), len(self._owners), self._owners.index(owner))
        if len(array) != hi - lo:
            raise _reject(RejectReason.BAD_ARRAY, f"slice of {len(array)} elements, not {hi - lo}")

    # -- sealing shares ------------------------------------------------------------------------

    def _share_cipher(self, peer: PeerId, secret: bytes, *, outgoing: bool) -> AESGCM:
        """The AES-GCM key sealing shares between us and ``peer`` (``secret``: X25519 of the
        cipher keys, the same for both directions), one per direction."""
        sender, receiver = (self.me, peer) if outgoing else (peer, self.me)
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=self.context,
            info=_SHARE_INFO + sender.raw + receiver.raw,
        ).derive(secret)
        return AESGCM(key)

    def _open_shares(self, sender: PeerId, message: ShareKeys, secret: bytes) -> _Held:
        receivers = [entry.peer for entry in message.sealed]
        if len(set(receivers)) != len(receivers) or not self._index.keys() >= set(receivers):
            raise _reject(RejectReason.BAD_FIELD, "sealed shares for repeats or strangers")
        mine = [entry.sealed for entry in message.sealed if entry.peer == self.me]
        if not mine:
            raise _reject(RejectReason.BAD_FIELD, "no shares sealed for this peer")
        cipher = self._share_cipher(sender, secret, outgoing=False)
        try:
            plain = cipher.decrypt(_ZERO_NONCE, mine[0], self.context)
        except InvalidTag:
            raise _reject(RejectReason.INCONSISTENT, "sealed shares do not open") from None
        held = _Held(plain[:_SHARE_BYTES], plain[_SHARE_BYTES:], message.self_mask_digest)
        _check_share(held.mask_key_share)
        _check_share(held.self_mask_share)
        return held

    # -- phases --------------------------------------------------------------------------------

    def _enter(
        self, phase: Phase, waits_for: Iterable[PeerId], send: list[Message]
    ) -> list[Action]:
        """Move to ``phase``, send ``send`` to everyone it waits for."""
        self.phase = phase
        self._expected = frozenset(waits_for) - {self.me}
        return [Send(peer, message) for message in send for peer in self._expected_in_order()]

    def _expected_in_order(self) -> list[PeerId]:
        return [peer for peer in self.spec.roster if peer in self._expected]

    def _progress(self) -> list[Action]:
        """Advance through every phase whose wait is already over."""
        actions: list[Action] = []
        while self.phase < Phase.DONE and self._inbox[self.phase].keys() >= self._expected:
            actions += self._advance()
        return actions

    def _abort(self, reason: AbortReason, detail: str) -> list[Action]:
        self.phase = Phase.ABORTED
        return [Aborted(reason, detail, self._released)]

    def _heard(self, phase: Phase) -> set[PeerId]:
        return set(self._inbox[phase]) | {self.me}

    def _advance(self) -> list[Action]:
        """End the current phase with what arrived and begin the next."""
        handler: dict[Phase, Callable[[], list[Action]]] = {
            Phase.KEYS: self._end_keys,
            Phase.SHARES: self._end_shares,
            Phase.ROLL_CALL: self._end_roll_call,
            Phase.INPUT: self._end_input,
            Phase.RECEIVED: self._end_received,
            Phase.SURVIVORS: self._end_survivors,
            Phase.UNMASK: self._end_unmask,
            Phase.SUM: self._end_sum,
        }
        return handler[self.phase]()

    def _end_keys(self) -> list[Action]:
        # Peers whose shares came early told us their keys too.
        with_keys = set(self._keys)
        if len(with_keys) < self.spec.threshold:
            return self._abort(AbortReason.TOO_FEW, "too few peers advertised keys")
        size, t = len(self.spec.roster), self.spec.threshold
        mask_shares = split(
            _raw_private(self._mask_key), shares=size, threshold=t, random_bytes=self._random_bytes
        )
        self_shares = split(
            self._self_seed, shares=size, threshold=t, random_bytes=self._random_bytes
        )
        digest = hashlib.sha256(self._self_seed).digest()
        own_index = self._index[self.me]
        self._inbox[Phase.SHARES][self.me] = _Held(
            mask_shares[own_index].y, self_shares[own_index].y, digest
        )
        self.phase = Phase.SHARES
        self._expected = frozenset(with_keys - {self.me})
        cipher_key, mask_key = self._keys[self.me]
        receivers = self._expected_in_order()
        sealed = []
        for peer in receivers:
            index = self._index[peer]
            cipher = self._share_cipher(peer, self._agreed[peer][0], outgoing=True)
            plain = mask_shares[index].y + self_shares[index].y
            sealed.append(SealedShares(peer, cipher.encrypt(_ZERO_NONCE, plain, self.context)))
        message = ShareKeys(
            context=self.context,
            cipher_key=cipher_key,
            mask_key=mask_key,
            self_mask_digest=digest,
            sealed=sealed,
        )
        return [Send(peer, message) for peer in receivers]

    def _end_shares(self) -> list[Action]:
        holders = self._heard(Phase.SHARES)
        if len(holders) < self.spec.threshold:
            return self._abort(AbortReason.TOO_FEW, "too few peers shared their keys")
        members = [peer for peer in self.spec.roster if peer in holders]
        call = RollCall(context=self.context, members=members)
        # to the whole roster: a peer left out learns it at once instead of waiting (and
        # re-running) for peers that have gone on without it
        return self._enter(Phase.ROLL_CALL, holders, []) + [
            Send(peer, call) for peer in self.spec.roster if peer != self.me
        ]

    def _left_out(self) -> bool:
        """Whether ``threshold`` roll calls agree on members that do not include us."""
        views = Counter(
            view for view in self._inbox[Phase.ROLL_CALL].values() if self.me not in view
        )
        return bool(views) and max(views.values()) >= self.spec.threshold

    def _end_roll_call(self) -> list[Action]:
        mine = frozenset(self._heard(Phase.SHARES))
        views: dict[PeerId, frozenset[PeerId]] = self._inbox[Phase.ROLL_CALL]
        differ = sorted(str(peer) for peer in self._expected if views.get(peer) != mine)
        if differ:
            return self._abort(
                AbortReason.VIEWS_DIFFER,
                f"{len(differ)} peers hold other shares than we do, or went silent",
            )
        self._owners = tuple(peer for peer in self.spec.roster if peer in mine)
        k = self.spec.neighbours
        self._graph = neighbours(
            self._owners, k=len(self._owners) if k is None else k, context=self.context
        )
        actions: list[Action] = self._drop_misfit_slices(Phase.INPUT)
        masked = self._masked_input()
        self.phase = Phase.INPUT
        self._expected = frozenset(self._owners) - {self.me}
        for index, owner in enumerate(self._owners):
            lo, hi = slice_bounds(len(masked), len(self._owners), index)
            if owner == self.me:
                self._inbox[Phase.INPUT][self.me] = masked[lo:hi]
            else:
                actions.append(SendSlice(owner, SliceKind.INPUT, masked[lo:hi], self.context))
        return actions

    def _drop_misfit_slices(self, phase: Phase) -> list[Action]:
        """Slices that came before the owners were known, checked now."""
        rejected: list[Action] = []
        for peer, array in list(self._inbox[phase].items()):
            try:
                self._check_slice_length(peer, phase, array)
            except RemoteProtocolError as exc:
                del self._inbox[phase][peer]
                rejected.append(Rejected(peer, exc.reason, str(exc)))
        return rejected

    def _end_input(self) -> list[Action]:
        arrived = [peer for peer in self._owners if peer in self._heard(Phase.INPUT)]
        report = InputsReceived(context=self.context, senders=arrived)
        self._inbox[Phase.RECEIVED][self.me] = frozenset(arrived)
        return self._enter(Phase.RECEIVED, self._owners, [report])

    def _end_received(self) -> list[Action]:
        reports: dict[PeerId, frozenset[PeerId]] = self._inbox[Phase.RECEIVED]
        if missing := set(self._owners) - reports.keys():
            return self._abort(AbortReason.OWNER_LOST, f"{len(missing)} owners did not report")
        everywhere = frozenset(self._owners).intersection(*reports.values())
        survivors = [peer for peer in self._owners if peer in everywhere]
        if len(survivors) < self.spec.threshold:
            return self._abort(
                AbortReason.TOO_FEW, f"only {len(survivors)} inputs reached every owner"
            )
        self._survivors = tuple(survivors)
        self._inbox[Phase.SURVIVORS][self.me] = everywhere
        return self._enter(
            Phase.SURVIVORS, self._owners, [Survivors(context=self.context, survivors=survivors)]
        )

    def _end_survivors(self) -> list[Action]:
        signed: dict[PeerId, frozenset[PeerId]] = self._inbox[Phase.SURVIVORS]
        mine = signed[self.me]
        if any(view != mine for view in signed.values()):
            return self._abort(AbortReason.INCONSISTENT, "owners signed different survivor sets")
        if missing := set(self._owners) - signed.keys():
            return self._abort(
                AbortReason.OWNER_LOST, f"{len(missing)} owners did not sign the survivors"
            )
        held: dict[PeerId, _Held] = self._inbox[Phase.SHARES]
        self_masks = [SharePart(p, held[p].self_mask_share) for p in self._survivors]
        mask_keys = [SharePart(p, held[p].mask_key_share) for p in self._dropped()]
        self._inbox[Phase.UNMASK][self.me] = (
            {part.peer: part.y for part in self_masks},
            {part.peer: part.y for part in mask_keys},
        )
        self._released = True
        unmask = Unmask(context=self.context, self_masks=self_masks, mask_keys=mask_keys)
        return self._enter(Phase.UNMASK, self._owners, [unmask])

    def _dropped(self) -> list[PeerId]:
        """Owners whose input is not in the sum but whose pairwise masks are."""
        return [peer for peer in self._owners if peer not in self._survivors]

    def _end_unmask(self) -> list[Action]:
        revealed: dict[PeerId, tuple[dict[PeerId, bytes], dict[PeerId, bytes]]]
        revealed = self._inbox[Phase.UNMASK]
        try:
            self_seeds = {p: self._rebuild(p, revealed, 0) for p in self._survivors}
            mask_keys = {p: self._rebuild(p, revealed, 1) for p in self._dropped()}
            seeds = self._unmask_seeds(self_seeds, mask_keys)
        except _RebuildError as exc:
            return self._abort(exc.reason, str(exc))
        total = self._unmasked_slice(seeds)
        self._inbox[Phase.SUM][self.me] = total
        actions: list[Action] = self._drop_misfit_slices(Phase.SUM)
        self.phase = Phase.SUM
        self._expected = frozenset(self._owners) - {self.me}
        actions += [
            SendSlice(peer, SliceKind.SUM, total, self.context)
            for peer in self._expected_in_order()
        ]
        return actions

    def _rebuild(
        self,
        peer: PeerId,
        revealed: dict[PeerId, tuple[dict[PeerId, bytes], dict[PeerId, bytes]]],
        which: int,
    ) -> bytes:
        shares = [
            Share(self._index[holder] + 1, parts[which][peer])
            for holder, parts in revealed.items()
            if peer in parts[which]
        ]
        if len(shares) < self.spec.threshold:
            raise _RebuildError(
                AbortReason.TOO_FEW, f"{len(shares)} shares of a secret of {peer.short()}"
            )
        try:
            secret = combine(shares[: self.spec.threshold])
        except ValueError:
            secret = b""
        if which == 0:
            good = (
                hashlib.sha256(secret).digest() == self._inbox[Phase.SHARES][peer].self_mask_digest
            )
        else:
            good = (
                len(secret) == 32
                and _raw_public(X25519PrivateKey.from_private_bytes(secret)) == self._keys[peer][1]
            )
        if not good:
            raise _RebuildError(
                AbortReason.INCONSISTENT, f"a rebuilt secret of {peer.short()} fails its check"
            )
        return secret

    def _end_sum(self) -> list[Action]:
        sums: dict[PeerId, Levels] = self._inbox[Phase.SUM]
        if missing := set(self._owners) - sums.keys():
            return self._abort(AbortReason.SLICE_LOST, f"{len(missing)} slice sums never came")
        self.phase = Phase.DONE
        return [Finished(tuple(sums[owner] for owner in self._owners), self._survivors)]

    # -- masks ---------------------------------------------------------------------------------

    def _masked_input(self) -> Levels:
        """``x + PRG(b) + sum over neighbours v of sign(me, v) PRG(s_{me,v})``."""
        seeds = [(self._self_seed, 1)] + [
            (
                pair_seed(self._agreed[peer][1], context=self.context, a=self.me, b=peer),
                mask_sign(self.me, peer),
            )
            for peer in sorted(self._graph[self.me], key=lambda p: p.raw)
        ]
        masked = np.empty_like(self._levels) if self._buffer is None else self._buffer
        add_masks(masked, seeds, base=[self._levels])
        return masked

    def _unmask_seeds(
        self, self_seeds: dict[PeerId, bytes], mask_keys: dict[PeerId, bytes]
    ) -> list[tuple[bytes, int]]:
        """The masks to take off the survivors' sum, as (seed, sign): subtracting a mask is
        adding it with the opposite sign.

        Raises:
            _RebuildError: a dropped peer's rebuilt key agrees with no survivor's key (cannot
                happen with keys checked at the door; an abort, never an exception out).
        """
        seeds = [(self_seeds[peer], -1) for peer in self._survivors]
        for dropped, key in mask_keys.items():
            dropped_key = X25519PrivateKey.from_private_bytes(key)
            for peer in self._graph[dropped] & set(self._survivors):
                try:
                    secret = _agree(dropped_key, self._keys[peer][1])
                except RemoteProtocolError as exc:
                    raise _RebuildError(AbortReason.INCONSISTENT, str(exc)) from None
                # peer added sign(peer, dropped) * PRG(s); remove it
                seed = pair_seed(secret, context=self.context, a=dropped, b=peer)
                seeds.append((seed, -mask_sign(peer, dropped)))
        return seeds

    def _unmasked_slice(self, seeds: list[tuple[bytes, int]]) -> Levels:
        """This owner's slice of the survivors' sum, ``seeds`` taken off."""
        index = self._owners.index(self.me)
        lo, hi = slice_bounds(len(self._levels), len(self._owners), index)
        inputs: dict[PeerId, Levels] = self._inbox[Phase.INPUT]
        total = np.empty(hi - lo, dtype=self.spec.dtype)
        add_masks(total, seeds, offset=lo, base=[inputs[peer] for peer in self._survivors])
        return total


class _RebuildError(Exception):
    def __init__(self, reason: AbortReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class SecAggSession:
    """One peer's runs of one group in one round: attempt 0, and re-runs while allowed.

    A re-run keeps the roster and bumps ``spec.attempt`` (so every peer derives the same next
    context without talking); peers that went silent just miss its key phase. Messages for a
    later attempt that arrive before this peer gets there are kept (at most one per sender,
    kind and attempt) and handed over when it starts; messages for an abandoned attempt are
    rejected as late. No re-run after this peer revealed unmask shares.

    The interface is :class:`SecAggPeer`'s; the session ends with one :class:`Finished` or
    one :class:`Aborted` (the last attempt's). ``new_buffer`` gives each attempt the array to
    mask into (each its own: an earlier attempt's sends may still be reading its buffer).
    """

    def __init__(
        self,
        spec: GroupSpec,
        me: PeerId,
        levels: Levels,
        *,
        max_attempts: int = 3,
        random_bytes: Callable[[int], bytes] = os.urandom,
        new_buffer: Callable[[], Levels] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._specs = [replace(spec, attempt=spec.attempt + k) for k in range(max_attempts)]
        self._attempt_of = {s.context: k for k, s in enumerate(self._specs)}
        self._me = me
        self._levels = levels
        self._random_bytes = random_bytes
        self.attempt = 0
        self._new_buffer = new_buffer
        self.current = self._peer(self._specs[0])
        #: why each abandoned attempt ended
        self.aborts: list[Aborted] = []
        self._later: dict[tuple[int, PeerId, str], Message | tuple[SliceKind, Levels]] = {}

    @property
    def contexts(self) -> tuple[bytes, ...]:
        """The context of every attempt this session may run."""
        return tuple(self._attempt_of)

    def progress(self) -> Progress:
        """Where the session is, for deadlines: which step and how many answers are in."""
        expected = len(self.current.expected)
        phase = self.current.phase
        arrived = expected - len(self.current.waiting_for)
        return Progress((self.attempt, int(phase)), expected, arrived, _PHASE_NAMES[phase])

    def attempt_of(self, context: bytes) -> int:
        """Which attempt ``context`` belongs to.

        Raises:
            RemoteProtocolError: ``WRONG_CONTEXT`` for a context of no attempt of this session.
        """
        attempt = self._attempt_of.get(context)
        if attempt is None:
            raise _reject(RejectReason.WRONG_CONTEXT, "message of another run")
        return attempt

    def start(self) -> list[Action]:
        """Begin attempt 0."""
        return self._settle(self.current.start())

    def receive(self, sender: PeerId, message: Message) -> list[Action]:
        """As :meth:`SecAggPeer.receive`, for whichever attempt the message belongs to."""
        attempt = self.attempt_of(getattr(message, "context", b""))
        if attempt > self.attempt:
            return self._keep(attempt, sender, message.TYPE, message)
        self._check_current(attempt)
        return self._settle(self.current.receive(sender, message))

    def receive_slice(
        self, sender: PeerId, kind: SliceKind, context: bytes, array: Levels
    ) -> list[Action]:
        """As :meth:`SecAggPeer.receive_slice`, for the attempt of ``context``."""
        attempt = self.attempt_of(context)
        if attempt > self.attempt:
            return self._keep(attempt, sender, str(kind), (kind, array))
        self._check_current(attempt)
        return self._settle(self.current.receive_slice(sender, kind, array))

    def expire(self) -> list[Action]:
        """The current phase's deadline passed."""
        return self._settle(self.current.expire())

    def _check_current(self, attempt: int) -> None:
        if attempt < self.attempt:
            raise _reject(RejectReason.LATE, f"message of abandoned attempt {attempt}")

    def _keep(
        self, attempt: int, sender: PeerId, kind: str, item: Message | tuple[SliceKind, Levels]
    ) -> list[Action]:
        if sender not in self._specs[0].roster or sender == self._me:
            raise _reject(RejectReason.NOT_A_MEMBER, f"{sender.short()} is not in this group")
        key = (attempt, sender, kind)
        if key in self._later:
            raise _reject(RejectReason.DUPLICATE, f"second {kind} for attempt {attempt}")
        self._later[key] = item
        return []

    def _settle(self, actions: list[Action]) -> list[Action]:
        """Pass actions on; turn an abort that allows a re-run into the next attempt."""
        result: list[Action] = []
        for action in actions:
            if not isinstance(action, Aborted):
                result.append(action)
                continue
            final = action.released or action.reason is AbortReason.LEFT_OUT
            if final or self.attempt + 1 >= len(self._specs):
                result.append(action)
                continue
            self.aborts.append(action)
            result += self._next_attempt()
        return result

    def _peer(self, spec: GroupSpec) -> SecAggPeer:
        buffer = None if self._new_buffer is None else self._new_buffer()
        return SecAggPeer(
            spec, self._me, self._levels, random_bytes=self._random_bytes, buffer=buffer
        )

    def _next_attempt(self) -> list[Action]:
        self.attempt += 1
        spec = self._specs[self.attempt]
        self.current = self._peer(spec)
        actions = self.current.start()
        kept = sorted(
            (key for key in self._later if key[0] == self.attempt),
            key=lambda key: _PHASE_ORDER.get(key[2], 0),
        )
        for key in kept:
            item = self._later.pop(key)
            try:
                if isinstance(item, tuple):
                    actions += self.current.receive_slice(key[1], *item)
                else:
                    actions += self.current.receive(key[1], item)
            except RemoteProtocolError as exc:
                actions.append(Rejected(key[1], exc.reason, str(exc)))
        self._later = {key: item for key, item in self._later.items() if key[0] > self.attempt}
        return self._settle(actions)


_PHASE_ORDER = {cls.TYPE: phase for cls, phase in _PHASE_OF.items()} | {
    str(kind): phase for kind, phase in _SLICE_PHASE.items()
}
