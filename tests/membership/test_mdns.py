"""mDNS: three processes in a network namespace find each other with no bootstrap at all."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.identity import Identity
from meshfed.membership.mdns import (
    DIAL_BURST,
    MAX_ADDRS_PER_ANNOUNCEMENT,
    MAX_PENDING_DIALS,
    DialBudget,
    parse_txt,
    txt_for,
)
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


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two network namespaces, "hosts" with no link between them yet (made and removed here)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    names = [f"meshfed-{secrets.token_hex(3)}" for _ in range(2)]
    try:
        for name in names:
            made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(f"the kernel refused a network namespace: {made.stderr.strip()}")
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield names[0], names[1]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _link(hosts: tuple[str, str], prefix: str) -> str:
    """Cable the two hosts with a veth pair, addresses ``<prefix>::1`` and ``<prefix>::2``."""
    ends = [f"mf{secrets.token_hex(3)}", f"mf{secrets.token_hex(3)}"]
    subprocess.run(
        ["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]], check=True
    )
    for index, (host, end) in enumerate(zip(hosts, ends, strict=True)):
        subprocess.run(["ip", "link", "set", end, "netns", host], check=True)
        address = f"{prefix}::{index + 1}/64"
        subprocess.run(["ip", "-n", host, "addr", "add", address, "dev", end, "nodad"], check=True)
        subprocess.run(["ip", "-n", host, "link", "set", end, "up"], check=True)
    return ends[0]


def _status_until(process: Process, done: Callable[[dict[str, Any]], bool], within: float) -> None:
    began = time.monotonic()
    while True:
        status = process.read(timeout=30)
        if status.get("event") == "status" and done(status):
            return
        assert time.monotonic() - began < within, f"not within {within} s; last status: {status}"


def test_hosts_find_each_other_over_ipv6_as_their_links_come_and_go(
    two_hosts: tuple[str, str], tmp_path: Path
) -> None:
    processes = [
        Process(
            *("-m", "meshfed.cli", "run", "--json", "--status-interval", "0.5"),
            *("--data-dir", str(tmp_path / f"n{index}")),
            cwd=ROOT,
            env={"MESHFED_PING_INTERVAL_S": "0", "MESHFED_LISTEN": "/ip6/::/tcp/0"},
            prefix=["ip", "netns", "exec", host],
        )
        for index, host in enumerate(two_hosts)
    ]
    try:
        ids = [process.read()["peer_id"] for process in processes]
        cable = _link(two_hosts, "fd00:1")  # the interfaces come after the nodes started
        wait_for_full_views(processes, ids, within=30)
        subprocess.run(["ip", "-n", two_hosts[0], "link", "del", cable], check=True)
        _status_until(processes[0], lambda s: not any("fd00:1::" in a for a in s["listen"]), 20)
        _link(two_hosts, "fd00:2")  # a new network: the other host learns the new address
        _status_until(
            processes[1],
            lambda s: any("/ip6/fd00:2::1/" in a for m in s["members"] for a in m["addrs"]),
            30,
        )
        assert all(process.popen.poll() is None for process in processes)
    finally:
        for process in processes:
            process.popen.terminate()
        for process in processes:
            process.popen.wait(20)


def test_a_peer_announced_by_ptr_and_txt_alone_is_found(namespace: str, tmp_path: Path) -> None:
    """js-libp2p's announcement: PTR + TXT ``dnsaddr=``, no SRV, no A/AAAA."""
    netns = ["ip", "netns", "exec", namespace]
    quiet = Process(  # found only through the announcement below: its own mDNS is off
        *("-m", "meshfed.cli", "run", "--json", "--status-interval", "0.5"),
        *("--data-dir", str(tmp_path / "quiet")),
        cwd=ROOT,
        env={"MESHFED_PING_INTERVAL_S": "0", "MESHFED_MDNS": "0"},
        prefix=netns,
    )
    seeker = Process(
        *("-m", "meshfed.cli", "run", "--json", "--status-interval", "0.5"),
        *("--data-dir", str(tmp_path / "seeker")),
        cwd=ROOT,
        env={"MESHFED_PING_INTERVAL_S": "0"},
        prefix=netns,
    )
    announcer = None
    try:
        started = quiet.read()
        seeker.read()
        script = str(Path(__file__).with_name("announce_ptr_txt.py"))
        announcer = subprocess.Popen(
            [*netns, sys.executable, script, started["listen"][0], "30"], cwd=ROOT
        )
        _status_until(
            seeker, lambda s: any(m["peer_id"] == started["peer_id"] for m in s["members"]), 30
        )
    finally:
        if announcer is not None:
            announcer.terminate()
            announcer.wait(20)
        for process in (quiet, seeker):
            process.popen.terminate()
            process.popen.wait(20)


def test_dials_are_budgeted_per_announcement_per_second_and_in_flight() -> None:
    me = Identity.generate().peer_id
    budget = DialBudget(me)
    strangers = [Identity.generate().peer_id for _ in range(200)]
    flood = [f"/ip4/10.9.9.9/tcp/{i + 1}/p2p/{peer}" for i, peer in enumerate(strangers)]
    first = budget.admit(flood, now=0.0)
    assert len(first) <= min(MAX_ADDRS_PER_ANNOUNCEMENT, MAX_PENDING_DIALS, DIAL_BURST)
    assert set(first) <= set(strangers[:MAX_ADDRS_PER_ANNOUNCEMENT])
    admitted = set(first)
    for t in range(1, 60):  # one announcement after another, every dial hanging
        admitted |= set(budget.admit(flood[8 * t :], now=t * 0.1))
        assert len(budget.pending) <= MAX_PENDING_DIALS
    assert len(admitted) == MAX_PENDING_DIALS
    for peer in list(budget.pending):
        budget.done(peer, None)
    later = budget.admit(flood[-8:], now=100.0)
    assert len(later) == MAX_ADDRS_PER_ANNOUNCEMENT  # the budget came back
    # an address that answered is not dialled again until our interfaces change
    peer, addrs = next(iter(later.items()))
    budget.done(peer, addrs[0])
    assert budget.admit(addrs, now=200.0) == {}
    budget.forget()
    assert budget.admit(addrs, now=300.0) == {peer: addrs}
    # ourselves and addresses naming no valid peer are never dialled
    assert budget.admit([f"/ip4/10.0.0.1/tcp/1/p2p/{me}", "/ip4/x", "/p2p/nope"], now=400.0) == {}
