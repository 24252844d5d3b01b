"""The benchmarks run and print one JSON line with the keys the issues name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.procs.harness import ROOT


def run(script: str, *args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.strip().splitlines()
    document: dict[str, object] = json.loads(line)
    return document


def test_a_thousand_nodes_deliver_every_signed_message_and_stop() -> None:
    figures = run("memory_mesh.py", "--nodes", "1000", "--fanout", "10")
    assert figures["delivered"] == figures["messages"] == 10_000
    assert figures["all_delivered"] is True
    for key in ("start_s", "send_s", "stop_s", "peak_rss_mb", "baseline_send_s", "ratio"):
        assert isinstance(figures[key], int | float)


@pytest.mark.parametrize("mode", ["--quick"])
def test_transport_benchmark_reports_against_raw_tcp(mode: str) -> None:
    figures = run("transport.py", mode)
    for key in ("rtt_us_libp2p", "rtt_us_raw", "bulk_mb_s_libp2p", "bulk_mb_s_raw", "bulk_ratio"):
        value = figures[key]
        assert isinstance(value, int | float) and value > 0, key


def test_mdns_benchmark_reports_time_to_full_view() -> None:
    import shutil

    if (
        shutil.which("ip") is None
        or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode
    ):
        pytest.skip("needs iproute2 network namespaces (root)")
    figures = run("mdns.py", "--runs", "1")
    assert 0 < figures["median_s_discovery"] <= figures["median_s_to_full_view"]  # type: ignore[operator]


def test_membership_benchmark_reports_the_issue_keys() -> None:
    figures = run("membership.py", "--nodes", "30", "--max-view", "8", "--soak-s", "4")
    for key in (
        "nodes",
        "rounds_to_converge",
        "seconds_to_converge",
        "bytes_per_node_s",
        "detect_s_p99",
        "false_positive_rate",
    ):
        assert isinstance(figures[key], int | float), key
    assert figures["detected_fraction"] == 1.0


def test_secagg_benchmark_reports_secure_against_plain_per_case() -> None:
    figures = run("secagg.py", "--quick", "--groups", "8,12", "--neighbours", "4")
    cases = figures["cases"]
    assert isinstance(cases, list)
    assert {(c["transport"], c["g"], c["neighbours"]) for c in cases} == {
        ("memory", 8, None),
        ("memory", 8, 4),
        ("memory", 12, None),
        ("memory", 12, 4),
        ("libp2p", 8, None),
    }
    for c in cases:
        for key in ("secure_s", "plain_s", "ratio", "keystream_bound_s", "bytes_per_param"):
            assert isinstance(c[key], int | float) and c[key] > 0, key
        # A butterfly sends about 2 (g - 1) / g of a vector of 4-byte elements, plus headers.
        assert 2 * 4 * (c["g"] - 1) / c["g"] <= c["bytes_per_param"] < 2 * 4 * 1.1
    for g in (8, 12):
        by_k = {c["neighbours"]: c["mask_bytes_per_peer"] for c in cases if c["g"] == g}
        assert by_k[4] < by_k[None]  # SecAgg+ neighbours cut the masks


def test_training_benchmark_matches_centralized_fedavg() -> None:
    figures = run("training.py", "--quick")
    for key in (
        "acc_central",
        "acc_secure",
        "round_s_small",
        "avg_s_large",
        "bytes_per_peer_round",
    ):
        assert isinstance(figures[key], int | float) and figures[key] > 0, key  # type: ignore[operator]
    # the same job, the same seeds: secure averaging only adds quantization noise
    assert abs(figures["gap_secure"]) <= 0.01  # type: ignore[arg-type]
    assert isinstance(figures["acc_gossip"], float) and figures["acc_gossip"] > 0.3
    # example-level DP within its budget, and still learning (chance is 0.1)
    assert 0 < figures["epsilon_dp"] <= 8 and figures["acc_dp"] > 0.2  # type: ignore[operator]
    assert figures["sim_peers"] == 20
    assert figures["sim_round_s_20"] > 0 and figures["sim_rss_mb_20"] > 0  # type: ignore[operator]
    # one grid axis per round instead of all of them: fewer secure runs, less CPU
    assert 0 < figures["sim_cpu_s_20_moshpit"] < figures["sim_cpu_s_20"]  # type: ignore[operator]


def test_flood_benchmark_reports_honest_rates_and_the_targets_memory() -> None:
    figures = run("flood.py", "--seconds", "3")
    for key in ("honest_rps_calm", "honest_rps_flooded", "flood_ratio", "flood_rss_mb"):
        value = figures[key]
        assert isinstance(value, int | float) and value > 0, key
    assert figures["target_alive"] is True
    assert figures["flood_rss_mb"] < 500  # type: ignore[operator]
    rejected = figures["target_rejected"]
    assert isinstance(rejected, dict)
    for reason in ("handshake_failed", "oversized", "malformed"):
        assert rejected.get(reason, 0) > 0, rejected


def test_market_benchmark_reports_award_and_release_against_round_trips() -> None:
    figures = run(
        "market.py", "--bidders", "5,12", "--procs", "4", "--winners", "2", "--repeats", "1"
    )
    for suffix in ("5", "12", "libp2p_4"):
        for key in ("award_ms", "award_first_ms", "award_rtts", "rtt_ms", "bids_in_ms"):
            value = figures[f"{key}_{suffix}"]
            assert isinstance(value, int | float) and value > 0, (key, suffix)
        # the award reaches the winners after the bids came in, the releases are timed
        assert figures[f"award_ms_{suffix}"] >= figures[f"bids_in_ms_{suffix}"]  # type: ignore[operator]
        assert isinstance(figures[f"release_ms_{suffix}"], int | float)
    for key in ("rtt_ms_memory", "rtt_ms_libp2p"):
        rtt = figures[key]
        assert isinstance(rtt, float) and rtt > 0, key
    for goal in ("goal_award_12_within_1s", "goal_libp2p_4_within_20_rtts"):
        assert isinstance(figures[goal], bool), goal
    assert isinstance(figures["goal_release_within_1s"], bool)
