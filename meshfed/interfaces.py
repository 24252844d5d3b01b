"""This host's interface addresses, and listen addresses made dialable.

A node that listens on a wildcard (``/ip4/0.0.0.0/tcp/N``, ``/ip6/::/tcp/N``) is reachable at
the addresses of its interfaces, never at the wildcard itself, and those come and go (Wi-Fi
joins, a cable is pulled, a VPN starts). :func:`host_addresses` reads them now (psutil);
:func:`dialable` puts them in place of the wildcards, so the node's signed record and its mDNS
announcement name addresses a peer can use.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import psutil

__all__ = ["IPAddress", "dialable", "host_addresses"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_WILDCARDS = {"ip4": "0.0.0.0", "ip6": "::"}


def host_addresses() -> tuple[IPAddress, ...]:
    """The addresses of the interfaces that are up, non-loopback first. IPv6 link-local
    addresses are left out: they need a zone, which a multiaddr of another host cannot name."""
    stats = psutil.net_if_stats()
    found: set[IPAddress] = set()
    for name, addrs in psutil.net_if_addrs().items():
        if name not in stats or not stats[name].isup:
            continue
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(addr.address.split("%")[0])
                if not (ip.version == 6 and ip.is_link_local):
                    found.add(ip)
    return tuple(sorted(found, key=lambda ip: (ip.is_loopback, ip.version, int(ip))))


def dialable(addrs: Sequence[str], host: Sequence[IPAddress]) -> list[str]:
    """``addrs`` with each wildcard replaced by ``host``'s addresses of its IP version
    (loopback ones only when the host has no other of that version)."""
    result: list[str] = []
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) < 3 or _WILDCARDS.get(parts[1]) != parts[2]:
            result.append(addr)
            continue
        version = 4 if parts[1] == "ip4" else 6
        same = [ip for ip in host if ip.version == version]
        outward = [ip for ip in same if not ip.is_loopback] or same
        result.extend("/".join([*parts[:2], str(ip), *parts[3:]]) for ip in outward)
    return list(dict.fromkeys(result))
