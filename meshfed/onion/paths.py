"""Choosing relays for a path: distinct, one per address prefix, weighted by reliability.

Pure: the caller gives the candidates (relays whose onion key for the epoch verified), the
peers a path must never hold (the sender, the destination), the peers to use only if nothing
else fits (the relays of a path that just failed), a weight per peer and the randomness.

Address prefixes: a relay's prefixes are the /24 (IPv4) and /48 (IPv6) networks of the
addresses in its record; two relays whose prefixes meet never share a path, so one operator
with one subnet holds at most one hop of it (a peer with no IP address in its record has no
prefix and is never excluded on that ground: DNS names say nothing about who runs them).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..errors import LocalProtocolError
from ..identity import PeerId

__all__ = ["NoRelayPath", "RelayCandidate", "Reliability", "address_prefixes", "select_path"]

_PREFIX_BITS = {"ip4": 24, "ip6": 48}


class NoRelayPath(LocalProtocolError):
    """Too few relays with a valid onion key and distinct address prefixes for the path."""


def address_prefixes(addrs: Iterable[str]) -> frozenset[str]:
    """The /24 and /48 networks of the IP addresses in ``addrs`` (multiaddrs)."""
    found = set()
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) < 3 or parts[1] not in _PREFIX_BITS:
            continue
        try:
            ip = ipaddress.ip_address(parts[2])
        except ValueError:
            continue
        found.add(str(ipaddress.ip_network(f"{ip}/{_PREFIX_BITS[parts[1]]}", strict=False)))
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class RelayCandidate:
    """A relay a path may use: its peer id, its onion key of the path's epoch, its prefixes."""

    peer: PeerId
    onion_key: bytes
    prefixes: frozenset[str]


class Reliability:
    """How often paths through each relay were answered: the weight of a relay is
    ``(answered + 1) / (tried + 2)`` (a new relay weighs 1/2), over its last ``memory`` paths."""

    def __init__(self, *, memory: int = 64) -> None:
        self.memory = memory
        self._outcomes: dict[PeerId, list[bool]] = {}

    def record(self, peers: Iterable[PeerId], answered: bool) -> None:
        """A path through ``peers`` was answered (or not)."""
        for peer in set(peers):
            outcomes = self._outcomes.setdefault(peer, [])
            outcomes.append(answered)
            del outcomes[: -self.memory]

    def weight(self, peer: PeerId) -> float:
        """The weight of ``peer`` in path selection, in (0, 1)."""
        outcomes = self._outcomes.get(peer, [])
        return (sum(outcomes) + 1) / (len(outcomes) + 2)


def select_path(
    candidates: Sequence[RelayCandidate],
    count: int,
    *,
    exclude: Iterable[PeerId],
    avoid: Iterable[PeerId] = (),
    weight: Callable[[PeerId], float],
    rng: random.Random,
) -> list[RelayCandidate]:
    """``count`` distinct relays in path order, drawn by ``weight`` without replacement.

    Never a peer of ``exclude``; a peer of ``avoid`` only when the others do not make up the
    path; never two relays whose address prefixes meet.

    Raises:
        NoRelayPath: the candidates cannot make up such a path.
    """
    excluded, avoided = set(exclude), set(avoid)
    unique = {c.peer: c for c in candidates if c.peer not in excluded}
    chosen: list[RelayCandidate] = []
    used: set[str] = set()
    for preferred in (True, False):
        pool = [c for c in unique.values() if (c.peer not in avoided) == preferred]
        while len(chosen) < count:
            eligible = [c for c in pool if c not in chosen and not c.prefixes & used]
            if not eligible:
                break
            pick = rng.choices(eligible, weights=[weight(c.peer) for c in eligible])[0]
            chosen.append(pick)
            used |= pick.prefixes
    if len(chosen) < count:
        raise NoRelayPath(
            f"{count} relays on distinct address prefixes are needed, {len(chosen)} found"
        )
    return chosen
