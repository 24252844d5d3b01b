"""Run groups of sans-IO secure-aggregation peers against each other, with no network.

Messages are delivered in order through one queue; when nothing is in flight, the waiting peer
in the earliest phase has its deadline expire (the way real deadlines fire one peer at a time).
A peer can die after its n-th send (a crash in the middle of a broadcast included), and chosen
messages can be held back and delivered only once the run is over (a straggler), and a
dishonest member's messages rewritten on their way (it signs whatever it likes).
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field
from typing import Any

from meshfed.errors import RemoteProtocolError
from meshfed.identity import PeerId
from meshfed.secagg.protocol import (
    Aborted,
    Action,
    Finished,
    GroupSpec,
    Phase,
    Rejected,
    SecAggSession,
    Send,
    SendSlice,
)
from meshfed.secagg.ring import Levels


@dataclass
class Trace:
    """Everything that happened in one simulated run."""

    outcomes: dict[PeerId, Finished | Aborted] = field(default_factory=dict)
    #: (sender, receiver, action) of every delivered message, in order
    delivered: list[tuple[PeerId, PeerId, Send | SendSlice]] = field(default_factory=list)
    rejected: list[tuple[PeerId, PeerId, str]] = field(default_factory=list)
    dead: dict[PeerId, Phase] = field(default_factory=dict)
    sessions: dict[PeerId, SecAggSession] = field(default_factory=dict)
    held_back: list[tuple[PeerId, PeerId, Send | SendSlice]] = field(default_factory=list)


def run_once(
    spec: GroupSpec,
    inputs: dict[PeerId, Levels],
    *,
    die_after_sends: dict[PeerId, int] | None = None,
    hold_back: Any = None,
    rewrite: Any = None,
    max_attempts: int = 1,
    seed: int = 0,
) -> Trace:
    """Run ``spec`` (with up to ``max_attempts`` attempts). ``hold_back(sender, receiver,
    action) -> bool`` delays a message until the end of the run; ``rewrite(sender, receiver,
    action) -> action`` replaces what ``sender`` sends."""
    trace = Trace()
    budget = dict(die_after_sends or {})
    queue: collections.deque[tuple[PeerId, Send | SendSlice]] = collections.deque()

    def dispatch(peer: PeerId, actions: list[Action]) -> None:
        for action in actions:
            if peer in trace.dead:
                return
            if isinstance(action, Send | SendSlice):
                if rewrite is not None:
                    action = rewrite(peer, action.to, action)
                if peer in budget:
                    if budget[peer] <= 0:
                        trace.dead[peer] = trace.sessions[peer].current.phase
                        return
                    budget[peer] -= 1
                if hold_back is not None and hold_back(peer, action.to, action):
                    trace.held_back.append((peer, action.to, action))
                else:
                    queue.append((peer, action))
            elif isinstance(action, Rejected):
                trace.rejected.append((action.peer, peer, str(action.reason)))
            else:
                trace.outcomes[peer] = action

    def deliver(sender: PeerId, action: Send | SendSlice) -> None:
        receiver = action.to
        if receiver in trace.dead or receiver not in trace.sessions:
            return
        session = trace.sessions[receiver]
        trace.delivered.append((sender, receiver, action))
        try:
            if isinstance(action, Send):
                actions = session.receive(sender, action.message)
            else:
                actions = session.receive_slice(sender, action.kind, action.context, action.array)
        except RemoteProtocolError as exc:
            trace.rejected.append((sender, receiver, str(exc.reason)))
            return
        dispatch(receiver, actions)

    for peer in spec.roster:
        if peer in inputs:  # a roster peer without input never shows up
            randomness = random.Random(f"{seed}/{peer}")  # reproducible runs
            trace.sessions[peer] = SecAggSession(
                spec,
                peer,
                inputs[peer],
                max_attempts=max_attempts,
                random_bytes=randomness.randbytes,
            )
            if budget.get(peer) == 0:
                trace.dead[peer] = Phase.KEYS
    for peer, session in trace.sessions.items():
        if peer not in trace.dead:
            dispatch(peer, session.start())
    while True:
        while queue:
            deliver(*queue.popleft())
        waiting = [
            (session.attempt, session.current.phase, peer)
            for peer, session in trace.sessions.items()
            if peer not in trace.dead and peer not in trace.outcomes
        ]
        if not waiting:
            break
        *_, earliest = min(waiting, key=lambda entry: entry[:2])
        dispatch(earliest, trace.sessions[earliest].expire())
    for sender, _, action in trace.held_back:
        deliver(sender, action)
    return trace
