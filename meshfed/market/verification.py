"""Verification of the units a job pays for: replication and spot checks (SPEC.md, "7f.5
Verification"). Pure: notes, proofs and the clock in, decisions out.

Theory of operation. A unit's result is the ``evidence`` digest its debit note carries (for
training: ``sha256`` of the model's parameter bytes after the round; on the ``exact``
schedule every roster peer ends a round with the same bytes, so every note for round *u*
must carry the same evidence: replication that training gives for free). The job's
:class:`~meshfed.market.messages.Verification` terms say how a note is judged:

- **Replication** (``replicas`` = *r* > 1). The notes for one unit are counted by evidence,
  leaving out the notes whose proof failed. The unit is *agreed* on evidence *e* as soon as
  *e* has *c* >= *r* notes and *c* > *n* - *c*, *n* being the sellers expected to note that
  unit (the leases that cover it): no note still to come could outvote it. At the unit's
  deadline (``window_s`` after its first note, or halfway to the earliest expiry of its
  notes if sooner) the unit is agreed on the evidence with the most notes if it has at least
  *r* and strictly more than any other; else (fewer than *r*, or a tie for the lead) it is
  *unverified*. The verdict is final. Notes that carry the agreed evidence are paid; the
  others are refused (``wrong``, and their sellers' reputation records a wrong result);
  every note of an unverified unit is refused (``unverified``, nobody blamed: the buyer
  cannot tell who did the work). A note that comes after its unit's deadline is judged by
  the verdict, and its seller's reputation records a late result.
- **No replication** (*r* = 1): each note is its own unit, agreed on its own evidence.
- **Spot checks** (``spot_rate`` = *p*): a (seller, unit) is checked when
  ``HMAC-SHA256(key, "meshfed-spot-v1\\0" job "\\0" seller unit)``'s first 8 bytes, read as
  an integer, are below *p* * 2^64. The key is the buyer's secret, so a seller cannot tell
  which of its notes will be checked before it signs them (and a signed note's evidence
  cannot change). A checked note is paid only once its proof (the state bytes whose digest is
  its evidence: :func:`proves`) passed; a proof that fails, or that has not come by the
  note's deadline, refuses it (``proof``, a wrong result).

Units here are the job's units (rounds), the same for every seller; the lease machine maps a
lease's own unit numbers onto them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import LocalProtocolError
from ..identity import PeerId
from .messages import DIGEST_BYTES, RefusalReason, Verification

__all__ = [
    "AskProof",
    "Verdict",
    "Late",
    "Pay",
    "Refuse",
    "Verifier",
    "evidence_of",
    "proves",
    "spot_checked",
]

_SPOT_DOMAIN = b"meshfed-spot-v1\x00"


def evidence_of(state: bytes) -> bytes:
    """The evidence a note carries for a unit that produced ``state`` (its SHA-256)."""
    return hashlib.sha256(state).digest()


def proves(state: bytes, evidence: bytes) -> bool:
    """Whether ``state`` is what a note with ``evidence`` claims (a spot check's proof)."""
    return hmac.compare_digest(evidence_of(state), evidence)


def spot_checked(key: bytes, job: str, seller: PeerId, unit: int, rate: float) -> bool:
    """Whether ``seller``'s note for ``unit`` of ``job`` is spot-checked at ``rate``: a
    keyed draw, the same on every replay, that nobody without ``key`` can predict."""
    if rate <= 0.0:
        return False
    message = _SPOT_DOMAIN + job.encode() + b"\x00" + seller.raw + unit.to_bytes(8, "big")
    draw = int.from_bytes(hmac.new(key, message, hashlib.sha256).digest()[:8], "big")
    return draw < rate * 2**64


# -------------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Pay:
    """``seller``'s note for ``unit`` is verified: pay and acknowledge it."""

    seller: PeerId
    unit: int


@dataclass(frozen=True, slots=True)
class Refuse:
    """``seller``'s note for ``unit`` is not paid, for ``reason``; ``agreed`` is the unit's
    agreed evidence (empty when there is none)."""

    seller: PeerId
    unit: int
    reason: RefusalReason
    agreed: bytes


@dataclass(frozen=True, slots=True)
class AskProof:
    """Spot check: ask ``seller`` for the state whose digest is ``evidence`` (its note for
    ``unit``), and report the outcome with :meth:`Verifier.proof` before ``by``."""

    seller: PeerId
    unit: int
    evidence: bytes
    by: float


@dataclass(frozen=True, slots=True)
class Late:
    """``seller``'s note for ``unit`` came after the unit's deadline."""

    seller: PeerId
    unit: int


Verdict = Pay | Refuse | AskProof | Late


@dataclass(slots=True)
class _Claim:
    """One seller's note for one unit, as the verifier holds it."""

    evidence: bytes
    #: its verdict is due by then (a proof missing then is a failed proof)
    deadline: float
    spot: bool
    #: a spot check's outcome, once known
    proof: bool | None = None
    done: bool = False


@dataclass(slots=True)
class _Unit:
    """The notes for one unit (one per seller) and the unit's verdict."""

    deadline: float
    claims: dict[PeerId, _Claim] = field(default_factory=dict)
    agreed: bytes | None = None
    closed: bool = False


@dataclass
class Verifier:
    """The verdicts on one job's notes under ``terms``; ``key`` is the buyer's secret for the
    spot checks (at least 16 bytes when ``terms.spot_rate`` > 0).

    Every method returns decisions sorted by (unit, seller), so equal events give equal
    decisions on every replay.

    Raises:
        LocalProtocolError: spot checks asked without a key.
    """

    terms: Verification
    job: str
    key: bytes = b""
    _units: dict[tuple[int, bytes], _Unit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.terms.spot_rate > 0 and len(self.key) < 16:
            raise LocalProtocolError("spot checks need a secret key of at least 16 bytes")

    def held(self, seller: PeerId, unit: int) -> bytes | None:
        """The evidence of ``seller``'s note for ``unit`` while it waits for its verdict."""
        claim = self._claim(seller, unit)
        return None if claim is None or claim.done else claim.evidence

    def note(
        self,
        seller: PeerId,
        unit: int,
        evidence: bytes,
        *,
        expires_at: float,
        now: float,
        expected: Callable[[int], int],
    ) -> list[Verdict]:
        """``seller`` notes ``unit`` with ``evidence`` (its note valid until ``expires_at``);
        ``expected(unit)`` is how many sellers are expected to note it.

        Raises:
            LocalProtocolError: ``seller`` noted ``unit`` before, or evidence is no digest.
        """
        if len(evidence) != DIGEST_BYTES or self._claim(seller, unit) is not None:
            raise LocalProtocolError(f"{seller} noted unit {unit} before (or not a digest)")
        deadline = min(now + self.terms.window_s, (now + expires_at) / 2)
        group = self._units.setdefault(self._group(seller, unit), _Unit(deadline))
        decisions: list[Verdict] = []
        if now > group.deadline:
            decisions.append(Late(seller, unit))
        if not group.closed:
            group.deadline = min(group.deadline, deadline)
        spot = spot_checked(self.key, self.job, seller, unit, self.terms.spot_rate)
        group.claims[seller] = _Claim(evidence, deadline, spot)
        if spot:
            decisions.append(AskProof(seller, unit, evidence, deadline))
        return decisions + self._judge(group, unit, now, expected)

    def proof(self, seller: PeerId, unit: int, ok: bool, now: float) -> list[Verdict]:
        """The spot check of ``seller``'s note for ``unit`` passed (``ok``) or failed. An
        outcome after the verdict changes nothing.

        Raises:
            LocalProtocolError: that note was not spot-checked.
        """
        claim = self._claim(seller, unit)
        if claim is None or not claim.spot:
            raise LocalProtocolError(f"no spot check of {seller}'s unit {unit}")
        if claim.done or claim.proof is not None:
            return []
        claim.proof = ok
        group = self._units[self._group(seller, unit)]
        return self._judge(group, unit, now, _none)

    def expire(self, now: float, expected: Callable[[int], int]) -> list[Verdict]:
        """Deadlines up to ``now`` passed: units without a verdict are judged by the deadline
        rule, proofs not in are failed."""
        decisions: list[Verdict] = []
        for (unit, _), group in sorted(self._units.items()):
            due = not group.closed and group.deadline <= now
            for claim in group.claims.values():
                if claim.spot and claim.proof is None and not claim.done and claim.deadline <= now:
                    claim.proof, due = False, True
            if due:
                decisions += self._judge(group, unit, now, expected)
        return decisions

    def close(self, now: float) -> list[Verdict]:
        """The job settles: every unit without a verdict is judged by the deadline rule now,
        and a note still waiting for its proof is judged without it."""
        decisions: list[Verdict] = []
        for (unit, _), group in sorted(self._units.items()):
            decisions += self._judge(group, unit, now, _none, final=True)
        return decisions

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has something to do next (None: nothing waits)."""
        due = [group.deadline for group in self._units.values() if not group.closed]
        due += [
            claim.deadline
            for group in self._units.values()
            for claim in group.claims.values()
            if claim.spot and claim.proof is None and not claim.done
        ]
        return min(due, default=None)

    # ------------------------------------------------------------------------ the rule

    def _group(self, seller: PeerId, unit: int) -> tuple[int, bytes]:
        return (unit, b"") if self.terms.replicas > 1 else (unit, seller.raw)

    def _claim(self, seller: PeerId, unit: int) -> _Claim | None:
        group = self._units.get(self._group(seller, unit))
        return None if group is None else group.claims.get(seller)

    def _judge(
        self,
        group: _Unit,
        unit: int,
        now: float,
        expected: Callable[[int], int],
        *,
        final: bool = False,
    ) -> list[Verdict]:
        """Decide ``group``'s verdict if it can be decided now, then every claim it settles."""
        if not group.closed:
            self._verdict(group, unit, expected, final=final or group.deadline <= now)
        waits_proof = not final  # settling: a proof still out is not waited for
        decisions: list[Verdict] = []
        agreed = group.agreed or b""
        for seller, claim in sorted(group.claims.items(), key=lambda kv: kv[0].raw):
            if claim.done:
                continue
            decision: Verdict
            if claim.proof is False:
                decision = Refuse(seller, unit, RefusalReason.PROOF, agreed)
            elif not group.closed or (claim.spot and claim.proof is None and waits_proof):
                continue  # waits for the replicas, or for its proof
            elif group.agreed is None:
                decision = Refuse(seller, unit, RefusalReason.UNVERIFIED, agreed)
            elif claim.evidence != group.agreed:
                decision = Refuse(seller, unit, RefusalReason.WRONG, agreed)
            else:
                decision = Pay(seller, unit)
            claim.done = True
            decisions.append(decision)
        return decisions

    def _verdict(
        self, group: _Unit, unit: int, expected: Callable[[int], int], *, final: bool
    ) -> None:
        counts = Counter(c.evidence for c in group.claims.values() if c.proof is not False)
        ranked = counts.most_common()
        best, most = ranked[0] if ranked else (b"", 0)
        runner_up = ranked[1][1] if len(ranked) > 1 else 0
        needed = self.terms.replicas
        expected_notes = expected(unit) if needed > 1 else 1
        if most >= needed and (most > expected_notes - most or (final and most > runner_up)):
            group.agreed, group.closed = best, True
        elif final:
            group.closed = True


def _none(unit: int) -> int:
    """No early agreement: the count of expected notes is not known (judged at the
    deadline, or already agreed)."""
    return 2**31
