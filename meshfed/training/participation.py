"""Taking part in a job, start to end, as one event stream: what ``meshfed-node run --job``
does for a job file and the market does for a job it won.

:func:`take_part` reaches the roster (saying every few seconds whom it waits for), runs every
round (resuming from the node's store), and reports ``job_started``, ``waiting``, ``round``,
``job_done`` or ``job_failed`` to its caller. A job this node's store holds as ended is
reported at once. A job that cannot run, or fails in any way while it runs, ends as
``job_failed`` with the reason; the node keeps serving.

A peer whose job ended keeps answering the job's state queries and late messages (a slower
roster peer may still settle on its final state) until :data:`KEEP_FINISHED` jobs have ended
on the node after it; then it lets go of the node, and with it of its model and data.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary, ref

from ..audit import AuditKind
from ..errors import MeshfedError, leaves
from ..identity import PeerId

if TYPE_CHECKING:
    from ..node import Node
    from .job import RoundReport, TrainingPeer
    from .roster import RosterChange
    from .spec import JobSpec

__all__ = ["KEEP_FINISHED", "JobEvents", "failure_reason", "take_part"]

log = logging.getLogger(__name__)

#: ``events(name, document)``: the job's events, as the CLI prints them in JSON
JobEvents = Callable[[str, dict[str, Any]], None]
_WAIT_REPORT_S = 5.0
#: ended jobs whose peers a node keeps serving (the newest); older ones let go of it
KEEP_FINISHED = 4
#: each node's ended jobs, newest last (weakly: the node's handlers hold them until closed;
#: a strong reference here would keep a node that stopped, and them, alive for good)
_finished: WeakKeyDictionary[Node, deque[ref[TrainingPeer]]] = WeakKeyDictionary()


async def take_part(
    node: Node,
    spec: JobSpec,
    events: JobEvents,
    *,
    roster_wait: float,
    joining: RosterChange | None = None,
    on_peer: Callable[[TrainingPeer], None] | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
) -> TrainingPeer | None:
    """Take part in ``spec``; returns the peer (None if it could not be made).

    Args:
        events: gets every event with its JSON document.
        roster_wait: seconds to wait for every roster peer to connect.
        joining: the roster change that brings this node into a running job (it takes the
            roster's state by quorum at the change's round instead of starting from round 0).
        on_peer: gets the training peer once it exists (to change its roster, read its state).
        on_round: gets each round's report (after its ``round`` event).
    """
    from .job import TrainingPeer

    def waiting(missing: list[PeerId], waited: float) -> None:
        missing_ids = [str(peer) for peer in missing]
        document = {"job_id": spec.job_id, "missing": missing_ids, "waited_s": round(waited, 1)}
        events("waiting", document)

    def reported(report: RoundReport) -> None:
        if not report.contributed:  # the privacy budget would have been exceeded: audited
            node.audit(
                AuditKind.PRIVACY_REFUSED, job=spec.job_id, round=report.round,
                epsilon=report.epsilon,
            )  # fmt: skip
        events("round", {"job_id": spec.job_id, **asdict(report)})
        if on_round is not None:
            on_round(report)

    def failed(exc: Exception) -> None:  # the job's end, never the node's
        if not all(isinstance(leaf, MeshfedError) for leaf in leaves(exc)):  # a bug to see
            log.exception("training job failed", extra={"job": spec.job_id})
        events("job_failed", {"job_id": spec.job_id, "error": failure_reason(exc)})

    try:
        peer = await TrainingPeer.prepared(node, spec, store=node.store, joining=joining)
    except Exception as exc:  # it cannot run here (nothing of it stays registered)
        failed(exc)
        return None
    try:
        if on_peer is not None:
            on_peer(peer)
        if not await peer.ended_before():
            await peer.connect_roster(
                within=roster_wait, report_every=_WAIT_REPORT_S, on_wait=waiting
            )
        events("job_started", {"job_id": spec.job_id, "examples": len(peer.shard)})
        reports = await peer.run(reported)
    except Exception as exc:
        failed(exc)
        return peer
    finally:
        _retire(node, peer)
    events(
        "job_done",
        {
            "job_id": spec.job_id,
            "accuracy": reports[-1].accuracy,
            "rounds": len(reports),
            "state": peer.state.value,
            "note": peer.note,
        },
    )
    return peer


def failure_reason(error: BaseException) -> str:
    """What went wrong, in one line per leaf of an exception group."""
    return "; ".join(
        str(leaf) if isinstance(leaf, MeshfedError) else f"{type(leaf).__name__}: {leaf}"
        for leaf in leaves(error)
    )


def _retire(node: Node, peer: TrainingPeer) -> None:
    """``peer``'s job ended: it joins the node's newest ended jobs; the oldest beyond
    :data:`KEEP_FINISHED` lets go of the node."""
    finished = _finished.setdefault(node, deque())
    finished.append(ref(peer))
    while len(finished) > KEEP_FINISHED:
        oldest = finished.popleft()()
        if oldest is not None:
            oldest.close()
