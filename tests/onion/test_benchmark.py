"""The onion benchmark runs and reports the keys the issue names, against a plain seal and a
direct request over the same transport."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_prints_one_json_line_with_packet_and_relay_rates() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "onion.py"),
            "--packets",
            "20",
            "--rounds",
            "3",
            "--no-store",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.strip().splitlines()
    figures = json.loads(line)
    assert figures["packet_size"] - figures["body_size"] == figures["overhead_bytes"] > 0
    for key in ("build_per_s", "seal_per_s", "relay_packets_per_s", "open_per_s", "deliver_per_s"):
        assert figures[key] > 0, key
    assert figures["relay_overhead_ms"] > 0
    ratio = figures["open_per_s"] / figures["relay_packets_per_s"]
    assert abs(figures["relay_ratio"] - ratio) <= 0.01 * ratio + 0.01
    assert 0 < figures["direct_ms"] < figures["hop1_ms"] and figures["hop3_ms"] > 0
    assert figures["hop3_ratio"] == round(figures["hop3_ms"] / figures["direct_ms"], 2)
