"""The rules a peer catching up follows with strangers in its roster: a state needs a quorum
of claims, a round needs the job's clock, rosters change by version, absent peers get a probe."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.errors import ConfigError
from meshfed.identity import Identity
from meshfed.secagg.driver import DeadlinePolicy
from meshfed.training.roster import RosterChange, RosterSchedule
from meshfed.training.sync import Claim, agreed_round, agreed_state, plausible_round

PEERS = [Identity.generate().peer_id for _ in range(12)]
HONEST = Claim(5, b"h" * 32)


def digest(tag: int) -> bytes:
    return tag.to_bytes(32, "big")


claims = st.builds(Claim, st.integers(0, 40), st.integers(0, 3).map(digest))


@given(
    honest=st.integers(0, 6),
    liars=st.lists(claims, max_size=5),
    collusion=st.integers(1, 5),
)
def test_colluders_within_the_bound_never_choose_the_state(
    honest: int, liars: list[Claim], collusion: int
) -> None:
    """Up to ``collusion`` liars, whatever they claim, cannot make a state agreed that no
    honest peer holds; with a quorum of honest peers, theirs is the state."""
    liars = liars[:collusion]
    answers = [(PEERS[i], HONEST) for i in range(honest)]
    answers += [(PEERS[6 + i], lie) for i, lie in enumerate(liars)]
    quorum = collusion + 1
    agreed = agreed_state(answers, quorum=quorum, least=0, most=40)
    if honest >= quorum:
        assert agreed is not None and agreed.claim == HONEST
    if agreed is not None:
        assert agreed.claim == HONEST and set(agreed.peers) >= {PEERS[i] for i in range(honest)}
    ahead = agreed_round(answers, quorum=quorum, least=0, most=40)
    assert ahead is None or (honest and ahead <= HONEST.next_round)


def test_claims_past_the_clock_or_below_the_asked_round_count_for_nothing() -> None:
    answers = [(PEERS[0], Claim(9, digest(1))), (PEERS[1], Claim(9, digest(1)))]
    assert agreed_state(answers, quorum=2, least=0, most=8) is None
    assert agreed_state(answers, quorum=2, least=10, most=20) is None
    agreed = agreed_state(answers, quorum=2, least=9, most=9)
    assert agreed is not None and agreed.peers == (PEERS[0], PEERS[1])


def test_a_peer_counts_once_and_the_furthest_quorum_wins() -> None:
    again = [(PEERS[0], Claim(7, digest(1)))] * 3
    assert agreed_state(again, quorum=2, least=0, most=99) is None
    answers = [
        (PEERS[0], Claim(3, digest(1))),
        (PEERS[1], Claim(3, digest(1))),
        (PEERS[2], Claim(4, digest(2))),
        (PEERS[3], Claim(4, digest(2))),
        (PEERS[4], Claim(6, digest(3))),
    ]
    agreed = agreed_state(answers, quorum=2, least=0, most=99)
    assert agreed is not None and agreed.claim == Claim(4, digest(2))
    assert agreed_round(answers, quorum=2, least=0, most=99) == 4
    assert agreed_round(answers, quorum=2, least=5, most=99) is None


def test_two_states_with_a_quorum_at_one_round_the_larger_wins_a_tie_none() -> None:
    split = [(PEERS[i], Claim(4, digest(i % 2))) for i in range(4)]
    assert agreed_state(split, quorum=2, least=0, most=9) is None
    more = [*split, (PEERS[4], Claim(4, digest(1)))]
    agreed = agreed_state(more, quorum=2, least=0, most=9)
    assert agreed is not None and agreed.claim.digest == digest(1)
    with pytest.raises(ValueError, match="quorum"):
        agreed_state(more, quorum=0, least=0, most=9)


def test_the_clock_bounds_a_round_by_the_fastest_plausible_rate_and_the_job() -> None:
    assert plausible_round(known_round=0, known_at=100.0, now=100.0, min_round_s=1, rounds=50) == 1
    assert plausible_round(known_round=0, known_at=100.0, now=110.5, min_round_s=1, rounds=50) == 11
    assert plausible_round(known_round=4, known_at=100.0, now=90.0, min_round_s=1, rounds=50) == 5
    assert plausible_round(known_round=0, known_at=0.0, now=1e9, min_round_s=1, rounds=50) == 50


def test_a_roster_changes_from_its_round_and_only_by_a_newer_version() -> None:
    ids = [str(p) for p in PEERS]
    schedule = RosterSchedule(PEERS[:5])
    swap = RosterChange(roster=(*ids[:4], ids[5]), from_round=4, version=1)
    assert schedule.take(swap)
    assert schedule.at(3) == tuple(PEERS[:5])
    assert schedule.at(4) == schedule.at(9) == (*PEERS[:4], PEERS[5])
    assert not schedule.take(swap)  # a replay
    older = RosterChange(roster=tuple(ids[6:10]), from_round=2, version=0)
    assert not schedule.take(older) and schedule.at(9) == (*PEERS[:4], PEERS[5])
    earlier = RosterChange(roster=tuple(ids[6:10]), from_round=2, version=2)
    assert schedule.take(earlier)  # a newer version rewrites the plan from its round on
    assert schedule.at(1) == tuple(PEERS[:5]) and schedule.at(9) == tuple(PEERS[6:10])
    assert schedule.everyone() == frozenset(PEERS[:5] + PEERS[6:10])
    for bad in [ids[:1], [ids[0], ids[0]], [ids[0], "not a peer id"]]:
        with pytest.raises(ConfigError):
            schedule.take(RosterChange(roster=tuple(bad), from_round=1, version=9))
    assert schedule.version == 2


def test_once_all_but_the_presumed_absent_are_in_the_first_phase_waits_only_a_probe() -> None:
    policy = DeadlinePolicy(join_s=3.0, grace_s=0.5, slack=2.0, probe_s=0.1)
    waiting = policy.deadline(started=0.0, majority_at=0.05, last_at=0.05, first=True)
    assert waiting == pytest.approx(3.05)
    probed = policy.deadline(
        started=0.0, majority_at=0.05, last_at=0.05, first=True, present_at=0.05
    )
    assert probed == pytest.approx(0.15)
    late = policy.deadline(started=0.0, majority_at=1.0, first=True, present_at=1.0)
    assert late == pytest.approx(3.0)  # the others took 1 s: the absent get twice that
    later_phase = policy.deadline(started=0.0, majority_at=0.05, first=False, present_at=0.05)
    assert later_phase == pytest.approx(0.55)  # only the first phase waits for the absent
