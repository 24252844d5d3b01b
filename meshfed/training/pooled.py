"""The roster's example-weighted accuracy, from counts no peer reveals.

After each round every peer evaluates the model on the validation part it holds out of its own
data set and gets ``(correct, examples)``. :func:`pool_counts` sums ``[correct, examples, 1]``
over the roster along the round's placement grid (the same groups as the model's averaging:
:class:`~meshfed.averaging.groups.Placement`), by secure aggregation when the job is secure
(exact ring sums in Z_2^32) or by the plain butterfly otherwise; the pooled accuracy is
``sum(correct) / sum(examples)``, over the ``sum(1)`` peers whose counts arrived. As for the
model, a peer whose counts are still its own sits out groups of two (the other member would
read them), and the sum covers every peer when the grid is full and nobody drops; a group that
fails leaves this peer with the counts it held (the report says how many peers they cover).

The counts are not differentially private: a job with DP accounts for the models it releases,
not for this sum (SPEC "Peers' own data").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trio

from ..averaging.groups import Placement, secure_group
from ..errors import MeshfedError
from ..identity import PeerId
from ..secagg.driver import AggregationFailed, Aggregator
from ..secagg.protocol import GroupSpec

__all__ = ["Counts", "pool_counts"]


@dataclass(frozen=True, slots=True)
class Counts:
    """Validation counts: correct predictions, examples, and the peers they come from."""

    correct: int
    examples: int
    peers: int = 1

    @property
    def accuracy(self) -> float | None:
        """``correct / examples`` (None without examples)."""
        return self.correct / self.examples if self.examples else None


async def pool_counts(
    aggregator: Aggregator,
    placement: Placement,
    me: PeerId,
    mine: Counts,
    *,
    job: bytes,
    round: int,
    secure: bool,
    collusion: int,
) -> Counts:
    """``mine`` summed with the other peers' along every axis of ``placement``; step ``s``
    runs as group round ``round + s``.

    Raises:
        ValueError: counts beyond what a ring element holds (2^32 - 1).
    """
    held = np.array([mine.correct, mine.examples, mine.peers], np.int64)
    if held.min() < 0 or held.max() >= 2**32:
        raise ValueError(f"counts {held.tolist()} do not fit in 32 bits")
    own = secure
    for step in range(placement.steps):
        index, members = placement.group(me, step)
        if len(members) < 2 or (own and len(members) < 3):
            continue
        padded = np.zeros(max(len(held), len(members)), np.int64)  # a slice for each member
        padded[: len(held)] = held
        try:
            if secure:
                spec = GroupSpec(
                    job=job, round=round + step, group=index, roster=members,
                    **secure_group(len(members), collusion),
                )  # fmt: skip
                result = await aggregator.secure_sum(spec, padded.astype(np.uint32))
                held = result.value[: len(held)].astype(np.int64)
            else:
                result = await aggregator.plain_mean(
                    padded.astype(np.float32), job=job, round=round + step, group=index,
                    roster=members,
                )  # fmt: skip
                total = result.value[: len(held)].astype(np.float64) * len(members)
                held = np.rint(total).astype(np.int64)
        except (AggregationFailed, MeshfedError, trio.TooSlowError):
            continue
        own = own and len(result.survivors) < 3
    return Counts(int(held[0]), int(held[1]), int(held[2]))
