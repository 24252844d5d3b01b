"""mDNS: three processes in a network namespace find each other with no bootstrap at all."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.membership.mdns import parse_txt, txt_for
from tests.procs.harness import ROOT, Process, wait_for_full_views


@given(
    st.lists(
        st.from_regex(
            r"/ip4/127\.0\.0\.1/tcp/[0-9]{1,5}/p2p/12D3KooW[a-zA-Z0-9]{44}", fullmatch=True
        ),
        max_size=5,
    )
)
def test_txt_records_round_trip(addrs: list[str]) -> None:
    assert parse_txt(txt_for(addrs)) == addrs


def test_foreign_txt_strings_are_ignored() -> None:
    text = bytes([5]) + b"a=b=c" + txt_for(["/ip4/1.2.3.4/tcp/1/p2p/x"]) + bytes([8]) + b"dnsaddr="
    assert parse_txt(text) == ["/ip4/1.2.3.4/tcp/1/p2p/x"]
    assert parse_txt(b"\xff") == []  # a length running past the end


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace whose loopback carries multicast (made and removed here)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    name = f"meshfed-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"the kernel refused a network namespace: {made.stderr.strip()}")
    try:
        for command in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "set", "lo", "multicast", "on"],
            ["ip", "route", "add", "224.0.0.0/4", "dev", "lo"],
        ):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_three_processes_find_each_other_by_mdns_alone(namespace: str, tmp_path: Path) -> None:
    processes: list[Process] = []
    ids: list[str] = []
    try:
        for index in range(3):
            process = Process(
                "-m",
                "meshfed.cli",
                "run",
                "--json",
                "--status-interval",
                "0.5",
                "--data-dir",
                str(tmp_path / f"n{index}"),
                cwd=ROOT,
                env={"MESHFED_PING_INTERVAL_S": "0"},  # no bootstrap: mDNS alone
                prefix=["ip", "netns", "exec", namespace],
            )
            processes.append(process)
            ids.append(process.read()["peer_id"])
        wait_for_full_views(processes, ids, within=30)
    finally:
        for process in processes:
            process.popen.terminate()
        for process in processes:
            process.popen.wait(20)
