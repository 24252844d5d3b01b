"""Which job spec a delivered model is kept under: the roster the job ended with, else the one
it started with (a secure job that went on with 3 winners after a failure is not a job that
could start: its spec does not validate)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from meshfed.identity import Identity
from meshfed.market.delivery import _spec

JOB = {"job_id": "kept", "rounds": 3, "dataset": "digits", "partition": "iid"}


def handle(ended: list[str], started: list[str]) -> Any:
    buyer = SimpleNamespace(
        job="kept",
        rfq=SimpleNamespace(spec=json.dumps(JOB).encode()),
        roster=tuple(ended),
    )
    return SimpleNamespace(buyer=buyer, events=[{"event": "started", "roster": started}])


def test_the_roster_it_ended_with_when_a_job_may_run_with_it() -> None:
    four = [str(Identity.generate().peer_id) for _ in range(4)]
    spec = _spec(handle(four, [*four[:3], str(Identity.generate().peer_id)]))
    assert spec is not None and list(spec.roster) == four


def test_the_roster_it_started_with_when_the_end_is_too_small_for_secure_groups() -> None:
    four = [str(Identity.generate().peer_id) for _ in range(4)]
    spec = _spec(handle(four[:3], four))
    assert spec is not None and list(spec.roster) == four


def test_none_when_no_roster_makes_a_job() -> None:
    three = [str(Identity.generate().peer_id) for _ in range(3)]
    assert _spec(handle(three, three[:2])) is None
