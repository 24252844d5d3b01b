"""Listen addresses made dialable: wildcards become the host's interface addresses."""

from __future__ import annotations

import ipaddress

from meshfed.interfaces import dialable, host_addresses

HOST = tuple(
    ipaddress.ip_address(a) for a in ("192.168.1.7", "10.0.0.2", "fd00::7", "127.0.0.1", "::1")
)
SUFFIX = "/tcp/4001/p2p/12D3KooWtest"


def test_a_wildcard_becomes_every_outward_address_of_its_version() -> None:
    assert dialable([f"/ip4/0.0.0.0{SUFFIX}", f"/ip6/::{SUFFIX}"], HOST) == [
        f"/ip4/192.168.1.7{SUFFIX}",
        f"/ip4/10.0.0.2{SUFFIX}",
        f"/ip6/fd00::7{SUFFIX}",
    ]


def test_loopback_is_used_only_when_the_host_has_nothing_else() -> None:
    alone = tuple(ipaddress.ip_address(a) for a in ("127.0.0.1", "::1"))
    assert dialable([f"/ip4/0.0.0.0{SUFFIX}"], alone) == [f"/ip4/127.0.0.1{SUFFIX}"]
    assert dialable([f"/ip6/::{SUFFIX}"], alone[:1]) == []  # no IPv6 at all: not dialable


def test_specific_addresses_stay_as_they_are() -> None:
    addrs = [f"/ip4/127.0.0.1{SUFFIX}", f"/ip6/::1{SUFFIX}", "/dns4/example.org/tcp/1"]
    assert dialable(addrs, HOST) == addrs


def test_this_host_has_its_loopback_and_no_link_local_addresses() -> None:
    found = host_addresses()
    assert ipaddress.ip_address("127.0.0.1") in found
    assert not any(ip.version == 6 and ip.is_link_local for ip in found)
    assert [ip.is_loopback for ip in found] == sorted(ip.is_loopback for ip in found)
