"""Bootstrap: a peer that comes up after us is reached; backoff grows, with jitter, and resets."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from meshfed import Identity, NodeConfig, open_node
from meshfed.membership.bootstrap import Backoff
from meshfed.testing import free_port


def config(data_dir: Path, **overrides: object) -> NodeConfig:
    base: dict[str, object] = {
        "data_dir": data_dir,
        "listen": ["/ip4/127.0.0.1/tcp/0"],
        "mdns": False,
        "ping_interval_s": 0,
        "gossip_interval_s": 0.5,
    }
    return NodeConfig(**{**base, **overrides})  # type: ignore[arg-type]


async def within(seconds: float, predicate: Callable[[], bool]) -> None:
    with trio.fail_after(seconds):
        while True:
            if predicate():
                return
            await trio.sleep(0.1)


async def test_a_bootstrap_peer_that_starts_late_is_reached_over_libp2p(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    late_identity = Identity.generate()
    port = free_port()
    late_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{late_identity.peer_id}"
    caplog.set_level(logging.INFO, logger="meshfed.membership.bootstrap")
    early_config = config(tmp_path / "early", bootstrap=[late_addr])
    async with open_node(early_config) as early:
        assert early.transport.connected_peers() == []  # nobody there yet
        await trio.sleep(3)
        late_config = config(tmp_path / "late", listen=[f"/ip4/127.0.0.1/tcp/{port}"])
        async with open_node(late_config, identity=late_identity) as late:
            await within(15, lambda: late.peer_id in early.transport.connected_peers())
            membership = early.membership
            assert membership is not None
            await within(15, lambda: late.peer_id in {r.peer for r in membership.peers()})
    messages = [record.getMessage() for record in caplog.records]
    assert "bootstrap peers unreachable, retrying" in messages  # the retries are logged
    assert "bootstrap peer reached" in messages


def test_backoff_doubles_with_jitter_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(random.Random(1), first_s=0.5, max_s=4.0)
    delays = [backoff.next_delay() for _ in range(6)]
    steps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(step / 2 <= d <= step for d, step in zip(delays, steps, strict=True))
    backoff.reset()
    assert backoff.next_delay() <= 0.5
