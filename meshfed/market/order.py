"""What a buyer asks for: a job without its roster, and the market terms it is bought on.

A :class:`TrainingOrder` holds the job's fields (a job file's table without ``roster``: the
auction picks the roster) and the terms: budget, tier, peer counts, requirements, bid window
and forfeit terms. :meth:`TrainingOrder.check` refuses, before anything is posted, an order
whose job could not run with any roster size in ``[min_peers, max_peers]`` (for example a
secure job for fewer than four peers), so a bad field is the buyer's error, not every
seller's.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..identity import Identity
from .messages import Verification
from .terms import MAX_AMOUNT, MICRO, Requirements, Tier, WorkKind, tier_range

if TYPE_CHECKING:
    from ..training.spec import JobSpec

__all__ = ["TrainingOrder", "read_order", "spec_from"]

#: data sets that come with meshfed (``training/data.py``): every peer holds them
BUNDLED = ("digits", "synthetic")

#: the most job fields a spec sent in an RFQ may hold, encoded (JSON bytes)
MAX_JOB_BYTES = 32 * 1024


@dataclass(frozen=True, kw_only=True)
class TrainingOrder:
    """A training job to buy.

    Attributes:
        job: the job's fields as a job file holds them (``meshfed.training.spec.JobSpec``),
            without ``roster``; ``job_id`` is made up if missing. Kept in the flat form
            (:func:`~meshfed.training.spec.flattened`), the one RFQs carry.
        budget: the most the buyer pays, all winners and rounds together (micro-credits).
        tier: picks the auction's scoring and defaults (:class:`~.terms.Tier`).
        min_peers, max_peers: how many winners; 0 takes the tier's range (at least 4 for a
            secure job: the smallest secure group).
        requirements: what a seller must offer; its ``dataset`` defaults to the job's (a data
            set each winner registered; every peer has the bundled ones).
        bid_window_s: how long bids are awaited (the window closes early once every asked
            peer answered).
        forfeit_after_s: how long sellers hold unacknowledged debit notes for an absent
            buyer before the escrowed work is forfeited to them.
        verification: how each round's results are checked before they are paid
            (:mod:`.verification`): ``replicas`` roster peers must report the same model
            (at most ``min_peers``; more than one needs the ``exact`` schedule, where every
            peer ends a round with the same model), ``spot_rate`` of the notes are proved.
    """

    job: Mapping[str, Any]
    budget: int
    tier: Tier = Tier.SMALL
    min_peers: int = 0
    max_peers: int = 0
    requirements: Requirements = field(default_factory=Requirements)
    bid_window_s: float = 10.0
    forfeit_after_s: float = 3600.0
    verification: Verification = field(default_factory=Verification)

    def __post_init__(self) -> None:
        from ..training.spec import flattened

        job = flattened(self.job)  # what every version reads (grouped in the file or not)
        if "roster" in job:
            raise ConfigError("roster: an order's roster is chosen by the auction; leave it out")
        job.setdefault("job_id", f"job-{secrets.token_hex(6)}")
        object.__setattr__(self, "job", job)
        object.__setattr__(self, "tier", Tier(self.tier))
        span = tier_range(self.tier)
        least = max(span.least, self.smallest_roster)
        object.__setattr__(self, "min_peers", self.min_peers or least)
        object.__setattr__(self, "max_peers", self.max_peers or max(span.most or 1000, least))
        data = job.get("dataset", "digits")
        if not self.requirements.dataset and isinstance(data, str) and data not in BUNDLED:
            with_data = replace(self.requirements, dataset=data)
            object.__setattr__(self, "requirements", with_data)
        self.check()

    @property
    def job_id(self) -> str:
        """The job's name."""
        return str(self.job["job_id"])

    @property
    def kind(self) -> WorkKind:
        """What the order buys."""
        return WorkKind.TRAINING

    @property
    def rounds(self) -> int:
        """Units of work per winner: the job's rounds."""
        return int(self.job.get("rounds", 10))

    @property
    def smallest_roster(self) -> int:
        """The fewest peers the job can run with: 4 for secure aggregation, else 2."""
        return 4 if self.job.get("secure", True) else 2

    def check(self) -> None:
        """Refuse an order that cannot be bought or run.

        Raises:
            ConfigError: naming the field: a budget out of range, peer counts out of order or
                below what the job needs, a job that is invalid for the smallest or the
                largest roster, or job fields too large to send.
        """
        if not 0 < self.budget <= MAX_AMOUNT:
            raise ConfigError(f"budget: must be in (0, {MAX_AMOUNT // MICRO}] credits")
        if not self.smallest_roster <= self.min_peers <= self.max_peers:
            raise ConfigError(
                f"min_peers, max_peers: need {self.smallest_roster} <= min_peers <= max_peers,"
                f" got {self.min_peers} and {self.max_peers}"
            )
        if not 0 < self.bid_window_s <= 600 or not 0 < self.forfeit_after_s <= 30 * 86400:
            raise ConfigError("bid_window_s in (0, 600], forfeit_after_s in (0, 30 days]")
        if len(self.job_bytes()) > MAX_JOB_BYTES:
            raise ConfigError(f"job: its fields take more than {MAX_JOB_BYTES} bytes")
        replicas = self.verification.replicas
        if replicas > self.min_peers:
            raise ConfigError(f"verification.replicas: {replicas} > min_peers {self.min_peers}")
        if replicas > 1 and self.job.get("schedule", "exact") != "exact":
            raise ConfigError(
                "verification.replicas: peers agree on a round's model only on the exact "
                "schedule (moshpit and pushsum peers hold different models)"
            )
        for size in {self.min_peers, min(self.max_peers, 128)}:
            self.spec_for(_placeholder_roster(size))

    def job_bytes(self) -> bytes:
        """The job's fields as sent to sellers (canonical JSON)."""
        return json.dumps(self.job, sort_keys=True, separators=(",", ":")).encode()

    def spec_for(self, roster: list[str] | tuple[str, ...]) -> JobSpec:
        """The job as the winners ``roster`` run it.

        Raises:
            ConfigError: a job field is wrong (its name first).
        """
        return spec_from(self.job_bytes(), roster)


def spec_from(job: bytes, roster: list[str] | tuple[str, ...]) -> JobSpec:
    """The job whose fields (``TrainingOrder.job_bytes``, flat; grouped ones are read too)
    came in an RFQ, run by ``roster``.

    Raises:
        ConfigError: not a table of job fields, or a field is wrong.
    """
    from ..training.extra import require_training
    from ..training.spec import JobSpec

    require_training("a training job")

    try:
        document = json.loads(job)
    except ValueError as exc:
        raise ConfigError(f"job: not a table of job fields: {exc}") from None
    if not isinstance(document, dict) or "roster" in document:
        raise ConfigError("job: expected a table of job fields without roster")
    return JobSpec.from_document({**document, "roster": list(roster)})


def read_order(path: Path, **terms: Any) -> TrainingOrder:
    """An order for the job in ``path`` (a job file, TOML or JSON, without ``roster``) on
    ``terms`` (the :class:`TrainingOrder` fields besides ``job``).

    Raises:
        ConfigError: the file cannot be read, or a field (of the job or the terms) is wrong.
    """
    from ..training.jobfile import read_document

    document = read_document(path)
    try:
        return TrainingOrder(job=document, **terms)
    except ConfigError as exc:
        raise ConfigError(f"job file {path}: {exc}") from None


#: distinct peer ids that stand for a roster while an order is checked (made once: an
#: Ed25519 key a peer costs ~0.1 ms, at every submission)
_PLACEHOLDERS: list[str] = []


def _placeholder_roster(size: int) -> list[str]:
    while len(_PLACEHOLDERS) < size:
        _PLACEHOLDERS.append(str(Identity.generate().peer_id))
    return _PLACEHOLDERS[:size]
