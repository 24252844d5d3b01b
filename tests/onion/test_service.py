"""The onion driver among real libp2p nodes on loopback: requests and replies over relays,
what the destination keeps, relays that die mid-flight, replays, caps."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from meshfed.control import Text
from meshfed.errors import ConfigError
from meshfed.onion.service import Privacy

from .net import onion_mesh

pytestmark = pytest.mark.trio


async def test_a_request_and_its_reply_travel_over_three_relays_each_way(tmp_path: Path) -> None:
    async with onion_mesh(tmp_path, relays=4) as mesh:
        alice, dest = mesh.node("alice"), mesh.node("dest")
        paths: list[tuple[list, list]] = []
        assert alice.onion is not None
        alice.onion.path_observers.append(lambda f, b: paths.append((f, b)))
        answer = await alice.onion_request(dest.peer_id, Text(text="hi"), privacy="high")
        assert answer == Text(text="echo:hi")
        assert mesh.served == ["hi"]
        forward, back = paths[-1]  # the transport may lose a first attempt: it is retried
        assert len(forward) == len(back) == 3
        relays = {mesh.node(f"r{i}").peer_id for i in range(4)}
        for path in (forward, back):
            assert len(set(path)) == 3 and set(path) <= relays
        relayed = sum(mesh.node(f"r{i}").stats.onion["relayed"] for i in range(4))
        assert relayed >= 6  # three hops each way, one packet each
        assert dest.stats.onion["requests_served"] == 1


async def test_each_level_answers_and_a_wrong_level_is_refused(tmp_path: Path) -> None:
    async with onion_mesh(tmp_path, relays=3) as mesh:
        alice, dest = mesh.node("alice"), mesh.node("dest")
        for level in Privacy:
            answer = await alice.onion_request(dest.peer_id, Text(text=level), privacy=level)
            assert answer == Text(text=f"echo:{level}")
        assert mesh.served == [str(level) for level in Privacy]
        assert alice.stats.onion["cover_packets"] >= 0  # ultra started the cover loop
        with pytest.raises(ConfigError):
            await alice.onion_request(dest.peer_id, Text(text="x"), privacy="secret")
