"""An order's job: written grouped or flat, bought on the same terms, and sent in the flat form
that nodes of every version read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshfed.errors import ConfigError
from meshfed.identity import Identity
from meshfed.market.order import TrainingOrder, read_order, spec_from
from meshfed.training.spec import JobSpec

ROSTER = [str(Identity.generate().peer_id) for _ in range(4)]
FLAT = {"job_id": "j", "rounds": 3, "secure": False, "dp_clip": 1.0, "schedule": "moshpit"}
GROUPED = {
    "job_id": "j",
    "rounds": 3,
    "averaging": {"secure": False, "schedule": "moshpit"},
    "privacy": {"dp_clip": 1.0},
}


def test_a_grouped_job_file_makes_the_same_order_as_a_flat_one(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        'job_id = "j"\nrounds = 3\n[averaging]\nsecure = false\nschedule = "moshpit"\n'
        "[privacy]\ndp_clip = 1.0\n"
    )
    grouped = read_order(path, budget=10**6)
    flat = TrainingOrder(job=FLAT, budget=10**6)
    assert grouped.job == flat.job == FLAT  # the order keeps the flat form ...
    assert grouped.job_bytes() == flat.job_bytes()  # ... and sends it
    assert (grouped.rounds, grouped.smallest_roster) == (3, 2)  # read from [averaging]


def test_a_seller_reads_the_job_of_a_buyer_of_either_version() -> None:
    expected = JobSpec.from_document({**GROUPED, "roster": ROSTER})
    assert spec_from(json.dumps(FLAT).encode(), ROSTER) == expected  # an older buyer's
    assert spec_from(json.dumps(GROUPED).encode(), ROSTER) == expected  # a grouped one
    sent = TrainingOrder(job=GROUPED, budget=10**6).job_bytes()
    assert set(json.loads(sent)) == set(FLAT)
    assert spec_from(sent, ROSTER) == expected


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"secur": False}, "secur: unknown job field; did you mean 'secure'?"),
        ({"data": {"secure": False}}, r"data\.secure: unknown job field"),
        ({"secure": False, "averaging": {"secure": False}}, "secure: given both flat and in"),
        ({"roster": ROSTER}, "roster: an order's roster is chosen by the auction"),
    ],
)
def test_an_order_refuses_a_wrong_key_before_anything_is_posted(
    job: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainingOrder(job=job, budget=10**6)


def test_a_seller_refuses_a_wrong_key_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"averaging\.secur: unknown job field"):
        spec_from(b'{"job_id": "j", "averaging": {"secur": false}}', ROSTER)
    with pytest.raises(ConfigError, match="secure: given both flat and in averaging"):
        spec_from(b'{"secure": false, "averaging": {"secure": true}}', ROSTER)
    with pytest.raises(ConfigError, match="without roster"):
        spec_from(json.dumps({"roster": ROSTER}).encode(), ROSTER)
