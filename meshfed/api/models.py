"""Request and response bodies of the REST API (pydantic: they are ``/openapi.json``).

Amounts are integers in micro-credits (``*_micro``); times are Unix seconds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AuditEntryOut",
    "BudgetOut",
    "DatasetOut",
    "EstimateOut",
    "JobDetailOut",
    "JobOut",
    "JobStatusOut",
    "LeaseOut",
    "LedgerOut",
    "PeerOut",
    "Problem",
    "StatsOut",
    "StatementOut",
    "StatusOut",
    "SubmitTraining",
]

JOB_ID = r"^[A-Za-z0-9._:-]{1,64}$"


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """What a refused request gets: why."""

    detail: str


class StatsOut(BaseModel):
    """The node's message counters (``node.stats``)."""

    accepted: dict[str, int]
    rejected: dict[str, int]
    bytes_in: int
    bytes_out: int
    abandoned: int


class StatusOut(BaseModel):
    """The node at a glance."""

    peer_id: str
    listen: list[str]
    uptime_s: float
    connected: int
    members: int
    market: bool
    store: bool
    jobs_running: int
    stats: StatsOut


class PeerOut(BaseModel):
    """A peer: its signed record as membership holds it, and what talking to it showed."""

    peer_id: str
    state: str = Field(description="alive, suspect, dead, or unknown (membership's verdict)")
    addrs: list[str]
    roles: list[str]
    battery_pct: int | None
    charging: bool | None
    temperature_c: float | None
    metered: bool
    datasets: list[str]
    prices: list[dict[str, Any]] = Field(description="[{kind, tier, price}] asks, micro-credits")
    rtt_ms: float | None
    failures: int


class DatasetOut(BaseModel):
    """A data set this node registered (what it offers; never its content)."""

    name: str
    format: str
    examples: int
    feature_shape: list[int]
    classes: int
    registered: float


class LeaseOut(BaseModel):
    """One lease of a job, from this node's side."""

    role: str
    peer: str
    price_micro: int
    units: int
    state: str


class JobOut(BaseModel):
    """A job this node bought, works on, or trained."""

    job_id: str
    role: str = Field(description="buyer, seller, or peer (trained without a lease)")
    leases: int
    lease_states: list[str]
    training: str | None = Field(description="the training's state in this node's store")


class JobStatusOut(BaseModel):
    """How a job is doing (this node's view, else a roster peer's)."""

    job_id: str
    state: str
    round: int
    rounds: int
    accuracy: float | None
    examples: int
    roster: list[str]


class StatementOut(BaseModel):
    """One job's money, from this node's side (micro-credits)."""

    escrowed_micro: int
    released_micro: int
    paid_micro: dict[str, int]
    earned_micro: dict[str, int]
    forfeited_micro: dict[str, int]


class JobDetailOut(BaseModel):
    """One job: its leases, its money and the rounds this node trained."""

    job_id: str
    leases: list[LeaseOut]
    statement: StatementOut
    rounds: list[dict[str, Any]]
    events: list[dict[str, Any]] = Field(description="the buyer's events, if this node bought it")


class ModelOut(BaseModel):
    """The model this node holds for a job: its latest checkpoint (a round it trained or took
    by catch-up), the parameters as one flat float32 vector."""

    job_id: str
    round: int = Field(description="the round (0-based) the model ended")
    score: float = Field(description="its accuracy on this node's validation part")
    model: str = Field(
        description="the architecture (the job's training.model; empty if unreadable)"
    )
    model_options: dict[str, Any]
    parameters: int
    sha256: str = Field(description="of the parameters' float32 bytes, little-endian")


class LedgerOut(BaseModel):
    """The node's accounts (micro-credits)."""

    accounts: dict[str, int]


class EstimateOut(BaseModel):
    """What a job is estimated to cost (micro-credits) and how."""

    total_micro: int
    per_unit_micro: int
    breakdown: dict[str, Any]


class BudgetOut(BaseModel):
    """The privacy budget of one job at this node."""

    job_id: str
    budget_epsilon: float
    delta: float
    spent_epsilon: float
    rounds_charged: int


class AuditEntryOut(BaseModel):
    """One row of the audit log."""

    seq: int
    at: float
    kind: str
    fields: dict[str, Any]


class SubmitTraining(_Closed):
    """Buy a training job (``node.submit_training``)."""

    job: dict[str, Any] = Field(description="the job's fields as a job file holds them, no roster")
    budget: float = Field(gt=0, le=9e9, description="the most to pay, in credits")
    tier: str = Field(default="small", pattern="^(small|medium|large|enterprise)$")
    min_peers: int = Field(default=0, ge=0, le=1024)
    max_peers: int = Field(default=0, ge=0, le=1024)
    bid_window_s: float = Field(default=10.0, gt=0, le=600)
