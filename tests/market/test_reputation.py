"""Reputation: what a node saw of each peer's work, persisted once per job, scored in [0, 1]."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshfed.errors import CorruptRecord
from meshfed.identity import PeerId
from meshfed.market.reputation import PeerEvent, Reputation, WorkRecord
from meshfed.store import Store

GOOD, BAD, STRANGER = (PeerId.from_public_key(bytes([i]) * 32) for i in range(3))
KEY = bytes(range(32))
DAY = 86400.0


def test_a_stranger_scores_the_prior_and_work_moves_the_score(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        reputation = Reputation(store, half_life=None)
        assert reputation.score(STRANGER) == 0.5  # as an Offer without a reliability
        reputation.record("j1", GOOD, PeerEvent.DELIVERED)
        assert reputation.score(GOOD) == pytest.approx(0.6)
        reputation.record("j1", BAD, PeerEvent.FAILED)
        assert reputation.score(BAD) == pytest.approx(0.4)
        reputation.record("j2", STRANGER, PeerEvent.DELIVERED)
        reputation.record("j2", STRANGER, PeerEvent.LATE)  # late costs half a failure
        assert reputation.score(STRANGER) == pytest.approx(3 / 5.5)
        reputation.record("j3", GOOD, PeerEvent.WRONG)  # a wrong result costs two failures
        assert reputation.score(GOOD) == pytest.approx(3 / 7)  # (2 + 1) / (4 + 1 + 2)
        assert reputation.scores([GOOD, BAD]) == {
            GOOD: reputation.score(GOOD),
            BAD: reputation.score(BAD),
        }


def test_an_event_counts_once_per_job_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    with Store.open(path, key=KEY) as store:
        reputation = Reputation(store)
        assert reputation.record("job", BAD, PeerEvent.FAILED)
        assert not reputation.record("job", BAD, PeerEvent.FAILED)
        assert reputation.record("job", BAD, PeerEvent.WRONG)
        assert reputation.record("other", BAD, PeerEvent.FAILED)
        before = reputation.score(BAD, now=1e9)
    with Store.open(path, key=KEY) as store:
        reputation = Reputation(store)
        assert not reputation.record("job", BAD, PeerEvent.FAILED)  # replayed after a restart
        assert reputation.counters(BAD) == WorkRecord(BAD, failed=2, wrong=1)
        assert reputation.score(BAD, now=1e9) == before
        assert reputation.counters(GOOD) == WorkRecord(GOOD)


def test_old_events_weigh_less_and_the_score_drifts_back_to_the_prior(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        reputation = Reputation(store, half_life=10 * DAY)
        reputation.record("job", BAD, PeerEvent.FAILED, at=0.0)
        assert reputation.score(BAD, now=0.0) == pytest.approx(2 / 5)
        assert reputation.score(BAD, now=10 * DAY) == pytest.approx(2 / 4.5)
        assert reputation.score(BAD, now=1000 * DAY) == pytest.approx(0.5)
        reputation.record("later", BAD, PeerEvent.FAILED, at=20 * DAY)
        assert reputation.score(BAD, now=30 * DAY) == pytest.approx(2 / (4 + 0.125 + 0.5))
        # another half-life: the score is summed from the events themselves
        faster = Reputation(store, half_life=5 * DAY)
        assert faster.score(BAD, now=30 * DAY) == pytest.approx(2 / (4 + 2**-6 + 2**-2))
        assert faster.counters(BAD) == WorkRecord(BAD, failed=2)


#: (good, bad) per event, as SPEC states them
EVIDENCE = {
    PeerEvent.DELIVERED: (1.0, 0.0),
    PeerEvent.FAILED: (0.0, 1.0),
    PeerEvent.LATE: (0.0, 0.5),
    PeerEvent.WRONG: (0.0, 2.0),
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(PeerEvent), st.floats(0, 1e7)), max_size=25
    ),
    st.floats(1e7, 2e7),
    st.one_of(st.none(), st.floats(1.0, 1e7)),
)
def test_the_score_is_the_decayed_beta_mean_of_the_events_in_any_order(
    events: list[tuple[int, PeerEvent, float]], now: float, half_life: float | None
) -> None:
    with tempfile.TemporaryDirectory() as directory, Store.open(Path(directory) / "s") as store:
        reputation = Reputation(store, half_life=half_life)
        first: dict[tuple[int, PeerEvent], float] = {}
        for job, event, at in events:
            reputation.record(f"job{job}", BAD, event, at=at)
            first.setdefault((job, event), at)  # a repeat counts once, at its first time
        good, bad = 2.0, 2.0
        for (_, event), at in first.items():
            weight = 1.0 if half_life is None else 0.5 ** ((now - at) / half_life)
            good += EVIDENCE[event][0] * weight
            bad += EVIDENCE[event][1] * weight
        score = reputation.score(BAD, now=now)
        assert score == pytest.approx(good / (good + bad), rel=1e-9)
        assert 0.0 < score < 1.0
        if all(event is PeerEvent.DELIVERED for _, event in first):
            assert score >= 0.5
        if all(event is not PeerEvent.DELIVERED for _, event in first):
            assert score <= 0.5
        assert reputation.verify() == []


def test_a_tampered_record_is_detected_and_never_scored(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    with Store.open(path, key=KEY) as store:
        Reputation(store).record("job", BAD, PeerEvent.WRONG)
        Reputation(store).record("job", GOOD, PeerEvent.WRONG)
    connection = sqlite3.connect(path)
    whitewash = "UPDATE market_reputation_peers SET bad = 0, wrong = 0 WHERE peer = ?"
    connection.execute(whitewash, (BAD.raw,))
    connection.execute(
        "UPDATE market_reputation SET event = 'delivered' WHERE peer = ?", (GOOD.raw,)
    )
    connection.commit()
    connection.close()
    with Store.open(path, key=KEY) as store:
        with pytest.raises(CorruptRecord, match="reputation tally of"):
            Reputation(store).score(BAD)
        with pytest.raises(CorruptRecord, match="reputation tally of"):
            Reputation(store).record("other", BAD, PeerEvent.DELIVERED)
        with pytest.raises(CorruptRecord, match=r"reputation of .* in job 'job' \(delivered\)"):
            Reputation(store, half_life=None).score(GOOD)  # summed from its events
        problems = Reputation(store).verify()
    # BAD's tally, GOOD's event, and both tallies no longer counting their (sound) events
    assert len(problems) == 4 and sum("does not count" in p for p in problems) == 2


def test_a_prior_or_half_life_that_means_nothing_is_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        for prior in ((0.0, 1.0), (1.0, -1.0)):
            with pytest.raises(ValueError, match="prior"):
                Reputation(store, prior=prior)
        with pytest.raises(ValueError, match="half-life"):
            Reputation(store, half_life=0.0)
        with pytest.raises(ValueError, match="finite"):
            Reputation(store).record("job", BAD, PeerEvent.FAILED, at=float("nan"))
