"""Eight OS processes over libp2p compute a secure mean of 10M float32 while two are killed."""

from __future__ import annotations

from pathlib import Path

from ..procs.harness import Process, start_peer

N = 10_000_000
PEERS = 8
VICTIMS = (2, 5)


def test_eight_processes_secure_mean_with_two_killed_mid_protocol(tmp_path: Path) -> None:
    started = [start_peer(tmp_path / f"p{i}") for i in range(PEERS)]
    processes: list[Process] = [process for process, _ in started]
    ids = [hello["peer_id"] for _, hello in started]
    try:
        for i, process in enumerate(processes):
            for j in range(i + 1, PEERS):
                process.call(cmd="connect", addr=started[j][1]["listen"][0])
        command = {
            "cmd": "secure_mean",
            "roster": ids,
            "seeds": {peer: 100 + i for i, peer in enumerate(ids)},
            "n": N,
            "threshold": 5,
        }
        for process in processes:
            process.call_nowait(**command)
        # Kill the victims the moment they start sending their masked input.
        for victim in VICTIMS:
            while (event := processes[victim].read(timeout=120)).get("phase") != "input":
                assert "error" not in event, event
            processes[victim].popen.kill()
        results = {}
        for i, process in enumerate(processes):
            if i in VICTIMS:
                continue
            while "event" in (answer := process.read(timeout=180)):
                pass
            assert "error" not in answer, answer
            results[i] = answer
        survivors = {tuple(r["survivors"]) for r in results.values()}
        assert survivors == {tuple(ids[i] for i in range(PEERS) if i not in VICTIMS)}
        assert len({r["sha256"] for r in results.values()}) == 1  # the very same mean everywhere
        for r in results.values():
            assert r["max_error"] <= 12.0 / (2**20 - 1), r  # one quantization level at most
            assert r["attempts"] == 2  # the killed owners cost one re-run
    finally:
        for process in processes:
            process.stop()
