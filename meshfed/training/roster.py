"""Which peers a job's round is planned over: the spec's roster, then the changes the caller
hands in (the market replacing a failed winner), each taking effect at a round boundary.

A change is plain data (:class:`RosterChange`: the new roster, the first round it plans, a
version); whoever hands it in has checked its signatures (training never imports the market).
Versions are monotone: a change whose version is not above the last one taken is ignored, so
replayed or reordered changes move nothing. A newer change rewrites the plan from its round on
(its ``from_round`` may be earlier than an older change's). Every peer given the same changes
plans the same groups: :meth:`RosterSchedule.at` is a pure function of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..identity import PeerId

__all__ = ["RosterChange", "RosterSchedule"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RosterChange:
    """From round ``from_round`` on, the job's roster is ``roster`` (peer id strings, in the
    order that gives each its position), as of ``version``."""

    roster: tuple[str, ...]
    from_round: int
    version: int

    def peers(self) -> tuple[PeerId, ...]:
        """The roster as peer ids.

        Raises:
            ConfigError: fewer than 2 distinct peers, a peer id that does not parse, or a
                negative round or version.
        """
        if len(self.roster) < 2 or len(set(self.roster)) != len(self.roster):
            raise ConfigError("a roster change lists at least 2 distinct peers")
        if self.from_round < 0 or self.version < 0:
            raise ConfigError("a roster change's from_round and version are >= 0")
        try:
            return tuple(PeerId.from_string(peer) for peer in self.roster)
        except ValueError as exc:
            raise ConfigError(f"a roster change names a bad peer id: {exc}") from None


class RosterSchedule:
    """The roster of each round: ``initial`` until the changes taken say otherwise."""

    def __init__(self, initial: Sequence[PeerId]) -> None:
        self._plan: list[tuple[int, tuple[PeerId, ...]]] = [(0, tuple(initial))]
        self.version = -1

    def take(self, change: RosterChange) -> bool:
        """Plan ``change``'s roster from its round on, unless its version is not newer than
        the last one taken; returns whether it was taken.

        Raises:
            ConfigError: as :meth:`RosterChange.peers`.
        """
        peers = change.peers()
        if change.version <= self.version:
            return False
        self.version = change.version
        self._plan = [(r, p) for r, p in self._plan if r < change.from_round]
        self._plan.append((change.from_round, peers))
        return True

    def at(self, number: int) -> tuple[PeerId, ...]:
        """The roster of round ``number``."""
        return next(peers for start, peers in reversed(self._plan) if start <= number)

    def everyone(self) -> frozenset[PeerId]:
        """Every peer of any round still planned (who may ask this peer for its state)."""
        return frozenset(peer for _, peers in self._plan for peer in peers)
