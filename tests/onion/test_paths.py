"""Path selection plays by its rules whatever the candidates: distinct relays, never the
sender or destination, one relay per /24 or /48, the relays of a failed path last."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.identity import Identity
from meshfed.onion.paths import (
    NoRelayPath,
    RelayCandidate,
    Reliability,
    address_prefixes,
    select_path,
)

PEERS = [Identity.generate().peer_id for _ in range(12)]


def test_prefixes_are_the_24_and_48_networks_of_ip_addresses() -> None:
    addrs = [
        "/ip4/192.0.2.77/tcp/4001/p2p/x",
        "/ip6/2001:db8:aa:bb::1/tcp/4001",
        "/dns4/relay.example/tcp/4001",
        "/ip4/not-an-ip/tcp/1",
    ]
    assert address_prefixes(addrs) == {"192.0.2.0/24", "2001:db8:aa::/48"}


def _candidate(i: int, subnet: int) -> RelayCandidate:
    return RelayCandidate(PEERS[i], bytes(32), address_prefixes([f"/ip4/10.0.{subnet}.{i}/tcp/1"]))


@settings(max_examples=200, deadline=None)
@given(
    subnets=st.lists(st.integers(0, 5), min_size=0, max_size=10),
    count=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
def test_a_path_never_holds_the_ends_a_repeat_or_two_relays_of_one_prefix(
    subnets: list[int], count: int, seed: int
) -> None:
    candidates = [_candidate(i, subnet) for i, subnet in enumerate(subnets)]
    ends = {PEERS[10], PEERS[11]} | ({PEERS[0]} if candidates else set())
    try:
        path = select_path(
            candidates, count, exclude=ends, weight=lambda p: 0.5, rng=random.Random(seed)
        )
    except NoRelayPath:
        usable = {s for i, s in enumerate(subnets) if PEERS[i] not in ends}
        assert len(usable) < count  # a path was possible only with fewer distinct prefixes
        return
    assert len(path) == count and len({c.peer for c in path}) == count
    assert not {c.peer for c in path} & ends
    prefixes = [p for c in path for p in c.prefixes]
    assert len(prefixes) == len(set(prefixes))


def test_the_relays_of_a_failed_path_are_used_only_when_nothing_else_fits() -> None:
    candidates = [_candidate(i, i) for i in range(5)]
    avoid = {PEERS[0], PEERS[1], PEERS[2]}
    for seed in range(50):
        rng = random.Random(seed)
        path = select_path(candidates, 2, exclude=(), avoid=avoid, weight=lambda p: 1, rng=rng)
        assert {c.peer for c in path} == {PEERS[3], PEERS[4]}
        path = select_path(candidates, 3, exclude=(), avoid=avoid, weight=lambda p: 1, rng=rng)
        assert {PEERS[3], PEERS[4]} < {c.peer for c in path}


def test_unreliable_relays_are_picked_less_often() -> None:
    reliability = Reliability()
    for _ in range(20):
        reliability.record([PEERS[0]], answered=False)
        reliability.record([PEERS[1]], answered=True)
    assert reliability.weight(PEERS[0]) < 0.1 < 0.9 < reliability.weight(PEERS[1])
    assert reliability.weight(PEERS[2]) == 0.5
    candidates = [_candidate(0, 0), _candidate(1, 1)]
    rng = random.Random(7)
    picks = [
        select_path(candidates, 1, exclude=(), weight=reliability.weight, rng=rng)[0].peer
        for _ in range(400)
    ]
    assert picks.count(PEERS[1]) > 8 * picks.count(PEERS[0])


def test_too_few_relays_is_an_error_not_a_shorter_path() -> None:
    with pytest.raises(NoRelayPath):
        select_path(
            [_candidate(0, 0), _candidate(1, 0)],
            2,
            exclude=(),
            weight=lambda p: 1,
            rng=random.Random(1),
        )
