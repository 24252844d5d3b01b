"""A node over libp2p under a random mix of every hostile action ``tests/procs/hostile.py``
knows (security review: "a node never stops on input"): it keeps serving an honest peer
throughout, and is still running afterwards. ~8 s by default; ``MESHFED_SOAK=1``: 60 s."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.procs.harness import ROOT, Process, start_peer

SECONDS = 60.0 if os.environ.get("MESHFED_SOAK") == "1" else 8.0


@pytest.mark.slow
def test_a_node_under_a_random_hostile_mix_keeps_serving_honest_peers(tmp_path: Path) -> None:
    (target, target_info), (honest, _) = (start_peer(tmp_path / n) for n in ("target", "honest"))
    try:
        honest.call(cmd="connect", addr=target_info["listen"][0])
        hostile = Process(
            str(ROOT / "tests" / "procs" / "hostile.py"),
            target_info["listen"][0],
            "--flood",
            str(SECONDS),
            "--mix",
            str(int(time.time())),
        )
        assert hostile.read(timeout=60)["event"] == "flooding", hostile.stderr
        served = 0
        while hostile.popen.poll() is None:
            answer = honest.call(cmd="request", peer=target_info["peer_id"], text=str(served))
            assert answer == {"answer": f"echo:{served}"}
            served += 1
        report = hostile.read()["flood"]
        assert hostile.popen.wait() == 0, hostile.stderr
        assert len(report) >= 5, report  # most kinds ran, each many times
        assert served >= SECONDS  # at least one honest answer a second, throughout
        assert target.popen.poll() is None, target.stderr
        assert "Traceback" not in target.stderr, target.stderr
        status = target.call(cmd="status")
        rejected = status["stats"]["rejected"]
        for reason in ("malformed", "oversized", "handshake_failed"):
            assert rejected.get(reason, 0) > 0, rejected
        assert honest.call(cmd="request", peer=target_info["peer_id"], text="after") == {
            "answer": "echo:after"
        }
    finally:
        for process in (target, honest):
            process.stop()
