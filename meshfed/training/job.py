"""A training job and one peer's part in it: local training, then averaging in groups.

:class:`JobSpec` is what every peer of a job agrees on (until the market issue, the buyer hands
it to the roster, e.g. the testnet writes it to a file): the model by name, the data set and
its partition, rounds, local training, the algorithm, and how to average.

:class:`TrainingPeer` runs rounds on one node. A round: train locally (worker thread), then for
each averaging step of the round, find this peer's Moshpit group (:mod:`..averaging.groups`) and
average ``[w x, w]`` with it (``x`` the trained parameters, ``w`` this peer's example weight) by
secure aggregation (or a plain butterfly when ``secure`` is off), so that ``x`` becomes the
group's example-weighted mean; finally apply the strategy to the round's starting model and
that average. With the ``exact`` schedule and nobody dropping, every peer ends every round with
the same model: decentralized FedAvg. A peer whose group fails (deadline, too few) keeps its own
parameters for that step and rejoins at the next.

Given the node's store, a peer commits every round (metrics, checkpoint, spent privacy) before
reporting it, follows its :class:`~.checkpoints.ProgressPolicy` (roll back, stop early), and
resumes after a restart from the job's last checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import math
import os
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from ..arrays import ArrayHeader
from ..averaging.compression import ErrorFeedback, TopK, codec_named
from ..averaging.groups import Placement, check_secure_grid, secure_group
from ..averaging.pushsum import PushSumState, push_target
from ..averaging.robust import AGGREGATORS
from ..errors import (
    ConfigError,
    DataError,
    MeshfedError,
    PeerUnreachable,
    RemoteProtocolError,
    StoreError,
)
from ..identity import PeerId
from ..node import Node
from ..privacy import policy as dp_policy
from ..privacy.accountant import GaussianEvent, PrivacyAccountant, calibrate_noise
from ..privacy.dp import OwnNoise, clip_update
from ..privacy.dpsgd import DPSGDTrainer
from ..privacy.noise import SecureRandom
from ..secagg.driver import AggregationFailed, Aggregator, GroupResult
from ..secagg.protocol import GroupSpec
from ..secagg.ring import Quantizer
from ..stats import RejectReason
from ..store import Checkpoint, JobState, Store
from ..wire import Envelope
from .catchup import StateSync
from .checkpoints import Converged, Rollback
from .data import Dataset, own_weight
from .pooled import Counts, pool_counts
from .preflight import JobParts, prepare
from .roster import RosterChange, RosterSchedule
from .spec import JobSpec
from .sync import TrainingState, agreed_round, plausible_round
from .torch_adapter import LocalTrainer, evaluate, flatten, load_flat

__all__ = ["RoundReport", "TrainingPeer", "local_seed"]

log = logging.getLogger(__name__)

#: a peer catching up asks this many random roster peers (at least 2 collusion + 1) where the
#: job is, each for this long; a newcomer waits this long for the others to reach its round
CATCH_UP_ASKED = 8
CATCH_UP_QUERY_S = 2.0
JOIN_WAIT_S = 600.0
#: the fastest plausible round: no peer may claim a round the job could not have reached at
#: this rate since this peer first saw it
MIN_ROUND_S = 0.02
_STEPS_PER_ROUND = 64  # GroupSpec.round = round * 64 + step: a fresh context for every step
_WEIGHT_COPIES = 32  # secure int8: the weight rides as this many quantized copies
_POOL_STEPS = 32  # the validation counts' group rounds: round * 64 + 32 + step


@dataclass(frozen=True, slots=True)
class RoundReport:
    """What one peer saw in one round."""

    round: int
    accuracy: float
    loss: float
    train_loss: float
    seconds: float
    #: seconds from the end of local training to the averaged model in place
    averaging_s: float
    bytes_out: int
    #: survivors of each averaging step (0: this peer was left out of that step)
    groups: tuple[int, ...]
    #: epsilon this peer has spent so far (0 without differential privacy)
    epsilon: float = 0.0
    #: whether this peer's data went into this round (no: its privacy budget is spent)
    contributed: bool = True
    #: what the job did next: ``continue``, ``rollback`` (to ``rolled_back_to``), or stop
    #: early on ``target`` or ``plateau`` (:mod:`.checkpoints`)
    decision: str = "continue"
    rolled_back_to: int | None = None
    #: when this peer began averaging (Unix seconds): on one machine, a group's averaging
    #: phase proper begins when the last of its members began (the rest waited for it)
    averaging_at: float = 0.0
    #: with the peers' own data sets (else None, 0, 0): the example-weighted accuracy over
    #: the roster's validation parts (:mod:`.pooled`), how many examples and peers it covers
    pooled_accuracy: float | None = None
    pooled_examples: int = 0
    pooled_peers: int = 0
    #: the first 8 bytes of SHA-256 of the model after the round (float32 bytes), hex: peers
    #: that hold the same model show the same (with own data their accuracies differ)
    model_digest: str = ""
    #: the local batch size this round's training used: the job's, or smaller under the
    #: device's thermal pressure (SPEC 7g); 0 if this peer did not train this round
    batch_size: int = 0

    @property
    def score(self) -> float:
        """What the job's progress policy and checkpoints go by: the pooled accuracy when
        there is one (the same on every peer), else this peer's accuracy."""
        return self.accuracy if self.pooled_accuracy is None else self.pooled_accuracy


class TrainingPeer:
    """This node's part in ``spec``. Run with :meth:`run`.

    Args:
        store: where to commit every round and resume from (the CLI passes ``node.store``);
            without one nothing persists and rollback is impossible.
        joining: this peer joins a running job (it replaces a failed one): the change that
            put it in the roster, whose roster ``spec.roster`` must be. It takes the state
            of round ``joining.from_round`` by quorum before its first round (:meth:`run`).
        min_round_s: the fastest plausible round (:data:`MIN_ROUND_S`): a catch-up never
            takes a round the job could not have reached at that rate.

    Raises:
        ConfigError: this node is not in the roster, the job names an unknown model or data,
            or it asks for rollback without a store.
    """

    def __init__(
        self,
        node: Node,
        spec: JobSpec,
        aggregator: Aggregator | None = None,
        *,
        store: Store | None = None,
        joining: RosterChange | None = None,
        min_round_s: float = MIN_ROUND_S,
        parts: JobParts | None = None,
    ) -> None:
        me = str(node.peer_id)
        _refuse_early(node, spec, store, joining)
        if parts is None:  # before any training: data, shards, model (it fits), strategy
            parts = _prepare(node, spec)
        self.store = store
        self.policy = spec.progress.policy()
        #: the job's state on this node, and a note on its last event (also in the store)
        self.state, self.note = JobState.RUNNING, ""
        self.node = node
        self.spec = spec
        self._roster = tuple(PeerId.from_string(peer) for peer in spec.roster)
        self._job = spec.job_id.encode()
        self.test, self.model, self.strategy = parts.test, parts.model, parts.strategy
        shards = parts.shards
        self._index = spec.roster.index(me)
        #: this peer's weight in averages, <= 1 so that weighted parameters stay inside the
        #: quantization range: its share of the largest shard, or of own_data.max_examples
        if spec.data.own:
            self.shard = parts.train
            self.weight = own_weight(len(self.shard), spec.data.own_data)
        else:
            self.shard = parts.train.take(shards[self._index])
            self.weight = len(self.shard) / max(len(s) for s in shards)
        self.accountant = (
            PrivacyAccountant(budget_epsilon=spec.privacy.dp_epsilon, delta=spec.privacy.dp_delta)
            if spec.privacy.dp_clip
            else None
        )
        self.trainer: LocalTrainer | DPSGDTrainer
        if spec.privacy.dp_clip and spec.privacy.dp_mode == "sample":
            if self.strategy.prox_mu:
                raise ConfigError("DP-SGD (dp_mode sample) has no FedProx term")
            self.trainer = DPSGDTrainer(
                clip=spec.privacy.dp_clip,
                noise_multiplier=spec.privacy.dp_noise_multiplier or 1.0,
                epochs=spec.training.epochs,
                batch_size=spec.training.batch_size,
                lr=spec.training.lr,
            )
            if not spec.privacy.dp_noise_multiplier:  # the least noise that lasts the whole job
                examples = len(self.shard)
                try:
                    noise = calibrate_noise(
                        epsilon=spec.privacy.dp_epsilon,
                        delta=spec.privacy.dp_delta,
                        sampling_rate=self.trainer.sampling_rate(examples),
                        count=spec.rounds * self.trainer.steps(examples),
                    )
                except ValueError as exc:
                    raise ConfigError(f"job {spec.job_id!r}: {exc}") from None
                self.trainer = replace(self.trainer, noise_multiplier=noise)
        else:
            if spec.privacy.dp_clip:  # peer-level DP: every peer's update has the same sensitivity
                self.weight = 1.0
            self.trainer = LocalTrainer(
                epochs=spec.training.epochs,
                batch_size=spec.training.batch_size,
                lr=spec.training.lr,
                optimizer=spec.training.optimizer,
                prox_mu=self.strategy.prox_mu,
                steps=spec.training.local_steps,
            )
        if spec.averaging.secure and spec.averaging.compression == "int8":
            self.quantizer = Quantizer(clip=spec.averaging.clip, levels_bits=8, ring_bits=16)
        else:
            self.quantizer = Quantizer(
                clip=spec.averaging.clip, levels_bits=spec.averaging.levels_bits, ring_bits=32
            )
        self.codec = codec_named(spec.averaging.compression, topk_ratio=spec.averaging.topk_ratio)
        #: top-k's residuals, one per averaging step, kept across rounds
        self._feedback: dict[int, ErrorFeedback] = {}
        self._rng = np.random.default_rng(int.from_bytes(os.urandom(8), "big"))
        #: everything privacy depends on (DP noise and sampling) comes from here
        self._random = SecureRandom()
        self._push_state = PushSumState(flatten(self.model))
        #: push-sum ticks are short: the local optimizer and its momentum live across them
        self._tick_optimizer = (
            self.trainer.make_optimizer(self.model)
            if spec.averaging.schedule == "pushsum" and isinstance(self.trainer, LocalTrainer)
            else None
        )
        self._pushes: list[npt.NDArray[np.float32]] = []
        self._push_prefix = f"pushsum.{self._job.hex()}:"
        hops = self._hops = max(1, math.ceil(math.log2(len(self._roster))))
        self._pushes_per_tick = spec.averaging.gossip_pushes or hops
        #: who pushes to this peer (over a sweep of the exponential graph), the last tick each
        #: was heard pushing at, and those presumed gone; a peer hears from each of them
        #: every ``hops / pushes`` ticks, which the staleness bound allows for
        self._pushers = {
            self._roster[(self._index - (1 << m)) % len(self._roster)] for m in range(hops)
        } - {node.peer_id}
        self._heard: dict[PeerId, int] = {}
        self._gone: set[PeerId] = set()
        self._push_came = trio.Event()
        self._lag = spec.averaging.gossip_staleness + math.ceil(hops / self._pushes_per_tick) - 1
        # The node's handlers from here on, once nothing above can refuse the job (close()
        # unregisters them). A node runs a job once at a time: a new peer for the job takes
        # over its messages.
        self._own_aggregator = aggregator is None
        self.aggregator = aggregator or Aggregator(node, job=spec.job_id.encode(), replace=True)
        if spec.averaging.schedule == "pushsum":
            node.on_array(self._on_push, prefix=self._push_prefix, replace=True)
        #: the roster of each round: the spec's, then the changes handed in
        self.rosters = RosterSchedule(self._roster)
        self._joining = joining
        if joining is not None:
            self.rosters.version = joining.version
        #: peers presumed gone: they missed a step of ours (until they show up again), and
        #: those that asked for our state this round (they are catching up: not gone)
        self._absent: set[PeerId] = set()
        self._returning: set[PeerId] = set()
        self._sync = StateSync(
            node,
            job_id=spec.job_id,
            parameters=len(self._push_state.x),
            members=self.rosters.everyone,
            on_query=self._returned,
            query_s=CATCH_UP_QUERY_S,
            send_s=self.aggregator.deadlines.phase_max_s,
        )
        #: the state the next round starts from: offered to the roster, and kept to go back to
        self._round_start = TrainingState(0, flatten(self.model), self.strategy.state_dict())
        self._sync.offer_now(self._round_start)
        #: the job's clock: a round and when it was known to be reached (Unix seconds)
        self._clock = (joining.from_round if joining else 0, time.time())
        self._min_round_s = min_round_s
        self._jump: int | None = None  # a round a settled state starts, past the next one
        self._batch_size = 0  # the last local training's batch size

    @classmethod
    async def prepared(
        cls,
        node: Node,
        spec: JobSpec,
        aggregator: Aggregator | None = None,
        *,
        store: Store | None = None,
        joining: RosterChange | None = None,
        min_round_s: float = MIN_ROUND_S,
    ) -> TrainingPeer:
        """As the constructor, with the data read and the model built in a worker thread:
        a large data set takes seconds, and meanwhile the node's loop answers its peers (a
        node that stopped answering would be taken for dead). Raises as the constructor."""
        _refuse_early(node, spec, store, joining)
        # not abandoned on cancel: a job stopped meanwhile ends once its thread is done
        parts = await trio.to_thread.run_sync(_prepare, node, spec)
        return cls(
            node, spec, aggregator, store=store, joining=joining, min_round_s=min_round_s,
            parts=parts,
        )  # fmt: skip

    @property
    def parameters(self) -> npt.NDArray[np.float32]:
        """The current model as a flat vector."""
        return flatten(self.model)

    async def connect_roster(
        self,
        *,
        within: float,
        report_every: float = 5.0,
        on_wait: Callable[[list[PeerId], float], None] | None = None,
    ) -> None:
        """Wait until this node is connected to every other roster peer, dialling the ones that
        membership has addresses for.

        Args:
            within: how long to wait in all.
            report_every: how often ``on_wait`` hears who is still missing.
            on_wait: called with the roster peers not connected yet (roster order) and the
                seconds waited so far.

        Raises:
            PeerUnreachable: naming the roster peers still not connected after ``within``
                seconds, and whether membership knew an address for each.
        """
        me, began = self.node.peer_id, trio.current_time()
        next_report = began + report_every
        missing: list[PeerId] = []
        with trio.move_on_after(within):
            while True:
                connected = set(self.node.transport.connected_peers())
                missing = [peer for peer in self._roster if peer != me and peer not in connected]
                if not missing:
                    return
                if on_wait is not None and trio.current_time() >= next_report:
                    on_wait(missing, trio.current_time() - began)
                    next_report += report_every
                for peer, addrs in self._known_addrs().items():
                    if peer in missing and addrs:
                        # not up yet: try again on the next pass
                        with contextlib.suppress(MeshfedError):
                            await self.node.connect(addrs[0])
                await trio.sleep(0.2)
        known = self._known_addrs()
        raise PeerUnreachable(
            f"{len(missing)} of the job's {len(self._roster) - 1} other roster peers not "
            f"connected after {within:.0f} s: "
            + "; ".join(
                f"{peer} (at {known[peer][0]}, not answering)"
                if known.get(peer)
                else f"{peer} (no address known: not met through bootstrap or gossip)"
                for peer in missing
            )
        )

    def _known_addrs(self) -> dict[PeerId, list[str]]:
        """The addresses membership knows for each peer."""
        records = [] if self.node.membership is None else self.node.membership.peers()
        return {record.peer: list(record.addrs) for record in records}

    async def ended_before(self) -> bool:
        """Whether this node's store holds this job as ended (finished or converged): then
        :meth:`run` only reports it, with no need of the roster."""
        if self.store is None:
            return False
        job = await trio.to_thread.run_sync(self.store.job, self.spec.job_id)
        ended = (JobState.FINISHED, JobState.CONVERGED)
        return job is not None and job.state in ended and self._is_this_job(job.spec)

    def _is_this_job(self, stored: str) -> bool:
        """Whether ``stored`` (a job's JSON in the store: grouped, or flat as a node before the
        groups wrote it) is this job."""
        try:
            return JobSpec.from_json(stored) == self.spec
        except ConfigError:
            return False

    def close(self) -> None:
        """Let go of the node: this job's messages, arrays and state queries are no longer
        taken here (the node's handlers held this peer, its model and its data)."""
        if self._own_aggregator:
            self.aggregator.close()
        self._sync.close()
        self.node.off_array(self._on_push, prefix=self._push_prefix)

    async def run(self, on_round: Callable[[RoundReport], None] | None = None) -> list[RoundReport]:
        """Every round of the job, until the last or until the policy stops it early; returns
        every round's report. With a store, the job resumes after its last committed round (the
        reports of earlier rounds come from the store), and ``on_round`` sees each new report
        once it is committed; :attr:`state` says how the job ended.

        Raises:
            StoreError: the store holds this job id with another spec, or is unusable.
        """
        reports = await self._resume()
        try:
            number = reports[-1].round + 1 if reports else 0
            if reports:
                await self._offer_round(number)
            if self._joining is not None and not reports:
                number = await self._join(self._joining.from_round)
            elif reports and self.state is JobState.RUNNING:  # the others may have gone on
                number = await self._catch_up(number)
            while number < self.spec.rounds and self.state is JobState.RUNNING:
                if self.node.peer_id not in self.rosters.at(number):
                    self.note = (
                        f"left the roster at round {number} (version {self.rosters.version})"
                    )
                    break
                if self.spec.averaging.schedule == "pushsum":
                    report = await self.push_round(number)
                else:
                    report = await self.run_round(number)
                report = await self._decide(report)
                reports.append(report)
                if on_round is not None:
                    on_round(report)
                number, self._jump = self._jump or number + 1, None
                if report.decision == "rollback":
                    await self._offer_round(number)
                if not self._settles and not any(report.groups):  # maybe the others are ahead
                    number = await self._catch_up(number)
        except Exception as exc:
            await self._set_state(JobState.FAILED, repr(exc))
            raise
        await self._offer_round(self.spec.rounds)
        if self.state is JobState.RUNNING:
            last_event = f"; {self.note}" if self.note else ""
            await self._set_state(JobState.FINISHED, f"all {len(reports)} rounds{last_event}")
        return reports

    def change_roster(self, change: RosterChange) -> bool:
        """Plan the groups of round ``change.from_round`` on over ``change.roster`` (the
        market replacing a failed winner; the caller checked its signatures). A change whose
        version is not above the last one taken is ignored; returns whether it was taken. A
        peer not in the roster of a round stops before it; a newcomer joins by catch-up
        (``joining``). Give every peer of the job the same changes: they plan the same groups.

        Raises:
            ConfigError: a bad roster (:meth:`.RosterChange.peers`), one too small for the
                job's secure groups, or a ``pushsum`` job (no rounds to change it at).
        """
        if self.spec.averaging.schedule == "pushsum":
            raise ConfigError("a pushsum job has no round boundaries to change its roster at")
        peers = change.peers()
        if self.spec.averaging.secure:
            check_secure_grid(
                len(peers), self.spec.averaging.max_group, self.spec.averaging.collusion
            )
        taken = self.rosters.take(change)
        if taken:
            log.info("roster changed", extra={"from_round": change.from_round, "peers": len(peers)})
        return taken

    @property
    def _settles(self) -> bool:
        """Whether a round that went wrong here is settled by quorum (:meth:`_settle`): only
        ``exact`` without ``robust`` gives every peer that completes a round the same state."""
        return self.spec.averaging.schedule == "exact" and self.spec.robustness.robust == "none"

    @property
    def _quorum(self) -> int:
        """How many asked peers must agree on a state: one more than may collude."""
        return self.spec.averaging.collusion + 1

    def _askable(self, number: int) -> list[PeerId]:
        """A random sample of round ``number``'s other roster peers to ask where the job is,
        those presumed gone only if fewer than ``2 collusion + 1`` others are left (enough
        for an honest quorum beside ``collusion`` liars; a dead peer's silence costs a
        query's wait)."""
        others = [p for p in self.rosters.at(number) if p != self.node.peer_id]
        asked = min(max(CATCH_UP_ASKED, 2 * self.spec.averaging.collusion + 1), len(others))
        here = [p for p in others if p not in self._absent]
        random = secrets.SystemRandom()
        sample = random.sample(here, min(asked, len(here)))
        if len(sample) >= min(asked, 2 * self.spec.averaging.collusion + 1):
            return sample
        gone = [p for p in others if p in self._absent]
        return sample + random.sample(gone, asked - len(sample))

    def _most(self) -> int:
        """The furthest round a claim may name: the job's rounds, and its clock."""
        known_round, known_at = self._clock
        return plausible_round(
            known_round=known_round, known_at=known_at, now=time.time(),
            min_round_s=self._min_round_s, rounds=self.spec.rounds,
        )  # fmt: skip

    async def _offer_round(self, number: int) -> None:
        """Round ``number`` starts from the current model: offer it, and keep it to go back to."""
        self._round_start = TrainingState(
            number, flatten(self.model), copy.deepcopy(self.strategy.state_dict())
        )
        await self._sync.offer(self._round_start)

    def _load(self, state: TrainingState) -> bool:
        """Go on from ``state`` (not its privacy); False if its strategy state does not fit."""
        try:
            self.strategy.load_state_dict(copy.deepcopy(state.strategy))
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("a peer's strategy state does not fit", extra={"error": repr(exc)})
            return False
        load_flat(self.model, state.model)
        self._push_state.move_to(state.model)
        return True

    async def _catch_up(self, start: int) -> int:
        """Take the furthest state a quorum of the roster agrees on, if past round ``start``
        (or at it, but not ours) (:mod:`.sync`); with ``moshpit``, whose peers hold different
        models, only the round a quorum has reached. Returns the round to go on with."""
        if self.spec.averaging.schedule == "pushsum":
            return start  # no rounds to be behind in
        peers = self._askable(max(start - 1, 0))
        if self.spec.averaging.schedule == "moshpit":
            claims = await self._sync.claims(peers)
            ahead = agreed_round(claims, quorum=self._quorum, least=start + 1, most=self._most())
            if ahead is None:
                return start
            await self._set_state(self.state, f"caught up at round {ahead} (own model kept)")
            return ahead
        own = self._sync.offered
        found = await self._sync.find(
            peers, quorum=self._quorum, least=start, most=self._most(),
            own=own.digest if own.next_round == start else b"",
        )  # fmt: skip
        if found is None or found.state is None or not self._load(found.state):
            return start
        await self._offer_round(found.state.next_round)
        await self._set_state(self.state, f"caught up at round {found.state.next_round}")
        return found.state.next_round

    async def _join(self, number: int) -> int:
        """A newcomer's start: wait until a quorum of the roster agrees on a state at round
        ``number`` or later, and take it.

        Raises:
            PeerUnreachable: no quorum within :data:`JOIN_WAIT_S`.
        """
        found = await self._sync.find(
            self._askable(number), quorum=self._quorum, least=number, most=self._most(),
            own=b"", wait_s=JOIN_WAIT_S, poll_s=0.25,
        )  # fmt: skip
        if found is None or found.state is None or not self._load(found.state):
            raise PeerUnreachable(
                f"no {self._quorum} roster peers agreed on the job's state at round {number} or "
                f"later within {JOIN_WAIT_S:.0f} s"
            )
        await self._offer_round(found.state.next_round)
        await self._set_state(self.state, f"joined at round {found.state.next_round}")
        return found.state.next_round

    def _short(self, number: int, groups: list[int]) -> bool:
        """Whether a step of ``exact`` round ``number`` went on without members, so that this
        peer may hold another model than the others: a step after the first without one (its
        sum lacks the aggregate that member held, unless every group of the step lacks the
        same one), or a plain first step with half of its group or fewer (a butterfly re-run
        goes on with the members this peer heard from; sets that complete are disjoint, as
        each member runs one at a time, so one with more than half is the one the settling
        peers take; secure groups agree on their survivors)."""
        placement, me = self._placement(number), self.node.peer_id

        def short(step: int, size: int) -> bool:
            members = len(placement.group(me, step)[1])
            if step or self.spec.averaging.secure:
                return 0 < size < members
            return size > 0 and 2 * size <= members

        return any(short(step, size) for step, size in enumerate(groups))

    async def _settle(self, number: int, *, failed: bool) -> None:
        """After a round that went wrong here (a step ``failed`` or was sat out, or a later
        group was short), take the state a quorum of the roster ended it with. The others may
        still be at it (each of their steps may wait ``join_s`` for a member that sat out).
        With none after ``join_s + grace_s`` per step and one more, a peer that failed goes
        back to the round's starting model (every peer that failed does the same, so that
        with ``exact`` all peers still hold one model); a short one keeps its result."""
        ended = TrainingState(number + 1, flatten(self.model), self.strategy.state_dict())
        _, own = await self._sync.digest(ended)
        deadlines = self.aggregator.deadlines
        steps = self._placement(number).steps + 1
        self._sync.settling = failed
        try:
            found = await self._sync.find(
                self._askable(number), quorum=self._quorum, least=number + 1,
                most=max(self._most(), number + 1), own=own,
                wait_s=steps * (deadlines.join_s + deadlines.grace_s), poll_s=0.05,
            )  # fmt: skip
        finally:
            self._sync.settling = False
        if found is None:
            if failed:
                self._load(self._round_start)
                self.note = f"round {number}: no quorum on its result, back to its start"
        elif found.state is not None and self._load(found.state):
            ahead = found.state.next_round
            if ahead > number + 1:
                self._jump = ahead
                self.note = f"caught up at round {ahead} after round {number}"
            else:
                self.note = f"round {number}: settled on the state of {self._quorum}+ peers"

    async def _resume(self) -> list[RoundReport]:
        """Register the job in the store, or pick it up where the store left it."""
        if self.store is None:
            return []
        job_id, spec = self.spec.job_id, self.spec.to_json()
        job = await trio.to_thread.run_sync(self.store.put_job, job_id, spec)
        if not self._is_this_job(job.spec):
            raise StoreError(f"the store holds another job called {job_id!r}: use a new job_id")
        if self._joining is None:
            self._clock = (0, min(job.created, time.time()))  # when this node first saw it
        records = await trio.to_thread.run_sync(self.store.rounds, job_id)
        try:
            reports = [
                RoundReport(**{**r.metrics, "groups": tuple(r.metrics["groups"])}) for r in records
            ]
        except (TypeError, KeyError) as exc:
            raise StoreError(
                f"job {job_id!r} has a round this meshfed cannot read: {exc}"
            ) from None
        for report in reports:  # the policy's state is a function of the accuracies
            self.policy.observe(report.round, report.score)
        self.state, self.note = job.state, job.note
        if job.state is JobState.FAILED:  # try again from the last checkpoint
            await self._set_state(JobState.RUNNING, f"resumed after: {job.note}")
        # every charge committed so far, those of rounds cut short by a crash included
        privacy = await trio.to_thread.run_sync(self.store.privacy, job_id)
        if self.accountant is not None and privacy is not None:
            self.accountant.load_state_dict(privacy)
        if reports:
            checkpoint = await trio.to_thread.run_sync(self.store.load_checkpoint, job_id)
            if checkpoint is None or checkpoint.round != reports[-1].round:
                raise StoreError(f"job {job_id!r} has no checkpoint of its last round")
            self._restore(checkpoint)
        return reports

    def _restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``'s model and strategy state (not its privacy)."""
        load_flat(self.model, checkpoint.model)
        self.strategy.load_state_dict(checkpoint.strategy)
        self._push_state.move_to(checkpoint.model)

    async def _decide(self, report: RoundReport) -> RoundReport:
        """Ask the policy what next, carry it out, and commit the round to the store."""
        decision = self.policy.observe(report.round, report.score)
        score = report.score
        if isinstance(decision, Rollback):
            assert self.store is not None  # rollback_drop needs a store (checked at start)
            best = await trio.to_thread.run_sync(
                self.store.load_checkpoint, self.spec.job_id, decision.to_round
            )
            if best is None:
                raise StoreError(f"the checkpoint of round {decision.to_round} is gone")
            self._restore(best)
            score = best.score
            report = replace(report, decision="rollback", rolled_back_to=decision.to_round)
            self.note = f"rolled back to round {decision.to_round} after round {report.round}"
        elif isinstance(decision, Converged):
            report = replace(report, decision=decision.reason)
            self.state = JobState.CONVERGED
            self.note = f"converged ({decision.reason}) at round {report.round}"
        if self.store is not None:
            privacy = None if self.accountant is None else self.accountant.state_dict()
            checkpoint = Checkpoint(
                job_id=self.spec.job_id,
                round=report.round,
                model=flatten(self.model),
                score=score,
                metrics=asdict(report),
                strategy=self.strategy.state_dict(),
                privacy=privacy,
            )
            save = functools.partial(
                self.store.save_round,
                checkpoint,
                privacy=privacy,
                keep=self.spec.progress.keep_checkpoints,
            )
            await trio.to_thread.run_sync(save)
            if report.decision != "continue":
                await self._set_state(self.state, self.note)
        return report

    async def _set_state(self, state: JobState, note: str) -> None:
        self.state, self.note = state, note
        if self.store is not None:
            await trio.to_thread.run_sync(self.store.set_job_state, self.spec.job_id, state, note)

    async def run_round(self, number: int) -> RoundReport:
        """Train locally, average in this round's groups, apply the strategy, evaluate."""
        began, sent_before = time.monotonic(), self.node.stats.bytes_out
        self._returning.clear()
        base = flatten(self.model)
        contributes = await self._charge(number)
        train_loss = await self._train_locally(number) if contributes else float("nan")
        averaging_began, averaging_at = time.monotonic(), time.time()
        trained = self._clipped(base, flatten(self.model)) if contributes else base
        if self._index in self.spec.robustness.attackers:
            factor = self.spec.robustness.attack_scale * (
                -1 if self.spec.robustness.attack == "sign_flip" else 1
            )
            trained = (base + factor * (trained - base)).astype(np.float32)
        averaged = await self._average_unless_left_behind(
            trained, number, weight=self.weight * contributes, base=base
        )
        average, groups = averaged or (trained, [0] * len(self._steps(number)))
        load_flat(self.model, self.strategy.apply(base, average))
        if self._settles and (0 in groups or self._short(number, groups)):
            failed = 0 in groups
            if not failed:  # a result all the same: others may hold it too
                await self._offer_round(number + 1)
            await self._settle(number, failed=failed)
        await self._offer_round(self._jump or number + 1)
        # settled on a state past this round: the report is of the round that state ended
        return await self._report(
            number if self._jump is None else self._jump - 1,
            began=began,
            averaging_s=time.monotonic() - averaging_began,
            averaging_at=averaging_at,
            sent_before=sent_before,
            train_loss=train_loss,
            groups=tuple(groups),
            contributed=contributes,
        )

    async def _average_unless_left_behind(
        self,
        trained: npt.NDArray[np.float32],
        number: int,
        *,
        weight: float,
        base: npt.NDArray[np.float32],
    ) -> tuple[npt.NDArray[np.float32], list[int]] | None:
        """:meth:`average`, given up (None) once a quorum of the roster claims to have ended
        the round after this one: its groups went on without this peer (it came late, or
        was presumed gone), which a phase would otherwise learn only at ``phase_max_s``,
        each re-run again, while the others finish the job and leave. Asked after ``join_s``,
        then every ``join_s``: a healthy round never asks."""
        outcome: list[tuple[npt.NDArray[np.float32], list[int]]] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_left_behind, number, nursery.cancel_scope)
                outcome.append(await self.average(trained, number, weight=weight, base=base))
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # what average() raised, as it would alone
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        if not outcome:
            self.note = f"round {number}: the others ended it without this peer"
            return None
        return outcome[0]

    async def _stop_when_left_behind(self, number: int, scope: trio.CancelScope) -> None:
        every = self.aggregator.deadlines.join_s
        while True:
            await trio.sleep(every)
            claims = await self._sync.claims(self._askable(number))
            ahead = agreed_round(claims, quorum=self._quorum, least=number + 2, most=self._most())
            if ahead is not None:
                scope.cancel()
                return

    async def push_round(self, number: int) -> RoundReport:
        """One tick of push-sum: absorb the pushes that came, train from the estimate, push
        half of the mass to this tick's peers (kept if a push fails), evaluate. After the
        job's last tick come ``ceil(log2 n)`` ticks of mixing alone (no training), so that the
        peers end close to one model, then the pushers' last pushes."""
        began, sent_before = time.monotonic(), self.node.stats.bytes_out
        if number >= self._lag:
            await self._wait_for_pushers(number - self._lag)
        contributes = await self._charge(number)
        self._absorb_pushes()
        estimate = self._push_state.estimate()
        load_flat(self.model, estimate)
        train_loss = await self._train_locally(number) if contributes else float("nan")
        trained = self._clipped(estimate, flatten(self.model)) if contributes else estimate
        noise = self._own_noise(len(trained))
        if noise is not None and contributes:  # pushes are plain: the whole noise
            noise.top_up(dp_policy.share_std(self.spec, 1, first=False))
            trained = noise.release(trained)
        self._push_state.move_to(trained)
        pushing, pushing_at = time.monotonic(), time.time()
        pushed = await self._push(number)
        if number == self.spec.rounds - 1:
            last = number + self._hops
            for tick in range(number + 1, last + 1):
                await self._wait_for_pushers(tick - self._lag)
                self._absorb_pushes()
                pushed += await self._push(tick)
            await self._wait_for_pushers(last)
        self._absorb_pushes()  # what came meanwhile: the estimate to report and keep
        load_flat(self.model, self._push_state.estimate())
        return await self._report(
            number,
            began=began,
            averaging_s=time.monotonic() - pushing,
            averaging_at=pushing_at,
            sent_before=sent_before,
            train_loss=train_loss,
            groups=(pushed,),
            contributed=contributes,
        )

    async def _push(self, number: int) -> int:
        """Tick ``number``'s pushes (one sweep of the exponential graph by default); returns
        how many went out (a failed one is absorbed back: a dead peer must not swallow mass)."""
        pushed, pushes = 0, self._pushes_per_tick
        for hop in range(pushes):
            message = self._push_state.split()
            tick = number * pushes + hop
            target = self._roster[push_target(self._index, len(self._roster), tick)]
            try:
                await self.node.send_array(
                    target,
                    message,
                    name=f"{self._push_prefix}{tick}",
                    within=self.aggregator.deadlines.phase_max_s,
                )
                pushed += 1
            except MeshfedError:
                self._push_state.absorb(message)
        return pushed

    async def _wait_for_pushers(self, tick: int) -> None:
        """Until every pusher not presumed gone has pushed at ``tick`` or later, for at most
        the aggregator's ``join_s``; those still silent then are presumed gone."""
        deadline = trio.current_time() + self.aggregator.deadlines.join_s

        def missing() -> set[PeerId]:
            return {p for p in self._pushers - self._gone if self._heard.get(p, -1) < tick}

        while missing():
            self._push_came = trio.Event()
            with trio.move_on_at(deadline):
                await self._push_came.wait()
                continue
            self._gone |= missing()
            log.info("pushers silent", extra={"tick": tick, "peers": len(missing())})

    def _absorb_pushes(self) -> None:
        for message in self._pushes:
            self._push_state.absorb(message)
        self._pushes.clear()

    async def _train_locally(self, number: int) -> float:
        """One round of local training. Under the device's thermal pressure (SPEC 7g) the
        batches shrink by its ``batch_scale``, except with DP-SGD, whose privacy accounting
        rests on the batch size it was calibrated for."""
        x, y = self.shard.x, self.shard.y
        seed = local_seed(self.spec, number)
        trainer = self.trainer
        device = self.node.device
        scale = 1.0 if device is None else device.batch_scale()
        if isinstance(trainer, LocalTrainer) and scale < 1:
            batch_size = max(1, round(trainer.batch_size * scale))
            trainer = replace(trainer, batch_size=batch_size)
        self._batch_size = trainer.batch_size
        train = functools.partial(trainer.train, self.model, x, y, seed=seed)
        if isinstance(self.trainer, DPSGDTrainer):
            train = functools.partial(train, random=self._random)
        if self._tick_optimizer is not None:
            train = functools.partial(train, optimizer=self._tick_optimizer)
        return await trio.to_thread.run_sync(train)

    async def _report(
        self,
        number: int,
        *,
        began: float,
        averaging_s: float,
        averaging_at: float,
        sent_before: int,
        train_loss: float,
        groups: tuple[int, ...],
        contributed: bool,
    ) -> RoundReport:
        """Evaluate the model on the test split (the validation part of this peer's own data)
        and say how round ``number`` went; with own data, pool the counts over the roster
        (not after a jump: the others pooled that round's counts as they ended it)."""
        loss, accuracy = await trio.to_thread.run_sync(
            lambda: evaluate(self.model, self.test.x, self.test.y)
        )
        pooled = None
        if self.spec.data.own and self.spec.averaging.schedule != "pushsum" and self._jump is None:
            mine = Counts(round(accuracy * len(self.test)), len(self.test))
            pooled = await pool_counts(
                self.aggregator, self._placement(number), self.node.peer_id, mine,
                job=self._job, round=number * _STEPS_PER_ROUND + _POOL_STEPS,
                secure=self.spec.averaging.secure, collusion=self.spec.averaging.collusion,
            )  # fmt: skip
        now = time.monotonic()
        return RoundReport(
            round=number,
            accuracy=accuracy,
            loss=loss,
            train_loss=train_loss,
            seconds=now - began,
            averaging_s=averaging_s,
            averaging_at=averaging_at,
            bytes_out=self.node.stats.bytes_out - sent_before,
            groups=groups,
            epsilon=0.0 if self.accountant is None else self.accountant.epsilon(),
            contributed=contributed,
            pooled_accuracy=None if pooled is None else pooled.accuracy,
            pooled_examples=0 if pooled is None else pooled.examples,
            pooled_peers=0 if pooled is None else pooled.peers,
            model_digest=hashlib.sha256(self.parameters.tobytes()).hexdigest()[:16],
            batch_size=self._batch_size if contributed else 0,
        )

    async def _on_push(self, envelope: Envelope, header: ArrayHeader, array: Any) -> None:
        """Keep a push for the next tick, if it comes from the roster and makes sense."""
        if envelope.sender not in self._roster:
            raise RemoteProtocolError(
                "a push from outside the roster", reason=RejectReason.NOT_A_MEMBER
            )
        suffix = header.name[len(self._push_prefix) :]
        if not (suffix.isascii() and suffix.isdigit()):
            raise RemoteProtocolError("a push names no tick", reason=RejectReason.BAD_FIELD)
        if len(self._pushes) >= 4 * len(self._roster):
            raise RemoteProtocolError("too many pushes waiting", reason=RejectReason.RATE_LIMITED)
        probe = PushSumState(np.zeros(len(self._push_state.x), np.float32))
        try:
            probe.absorb(array)  # the same checks absorb() will make at the next tick
        except ValueError as exc:
            raise RemoteProtocolError(str(exc), reason=RejectReason.BAD_ARRAY) from None
        self._pushes.append(array)
        tick = int(suffix) // self._pushes_per_tick
        self._heard[envelope.sender] = max(tick, self._heard.get(envelope.sender, -1))
        self._gone.discard(envelope.sender)
        self._push_came.set()

    def _round_cost(self) -> tuple[GaussianEvent, int]:
        """The privacy events one round of this peer's data goes through."""
        if isinstance(self.trainer, DPSGDTrainer):
            return self.trainer.event(len(self.shard))
        return GaussianEvent(self.spec.privacy.dp_noise_multiplier), 1

    async def _charge(self, number: int) -> bool:
        """Whether this peer's data goes into round ``number``; if so, the round's charge is
        committed to the store first (write-ahead: a crash after the release finds it there).
        Not once the charge would take the peer past its budget, nor in a round charged before
        a restart (its release may have happened: one release per charge)."""
        if self.accountant is None:
            return True
        if self.accountant.charged(number):
            self.note = f"round {number} was charged before a restart: it runs without our data"
            return False
        cost = self._round_cost()
        if self.accountant.would_exceed(*cost):
            return False
        self.accountant.charge(number, *cost)
        assert self.store is not None  # a DP job needs one (checked at start)
        state = self.accountant.state_dict()
        await trio.to_thread.run_sync(self.store.commit_privacy, self.spec.job_id, state)
        return True

    def _clipped(
        self, base: npt.NDArray[np.float32], trained: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        """``trained`` with its update clipped to ``dp_clip`` for peer-level DP (DP-SGD clipped
        in training; without DP, ``trained``)."""
        if not self.spec.privacy.dp_clip or self.spec.privacy.dp_mode != "update":
            return trained
        return base + clip_update(trained - base, self.spec.privacy.dp_clip)

    def _own_noise(self, size: int) -> OwnNoise | None:
        """Fresh noise for a vector of this peer's own, under peer-level DP (else None: DP-SGD
        noised in training)."""
        if not self.spec.privacy.dp_clip or self.spec.privacy.dp_mode != "update":
            return None
        return OwnNoise(size, self._random)

    def _release(
        self,
        values: npt.NDArray[np.float32],
        noise: OwnNoise | None,
        size: int,
        *,
        first: bool,
        data: bool,
    ) -> npt.NDArray[np.float32]:
        """``values`` (this peer's own, with its data if ``data``) as they may enter a sum in
        a group of ``size``: with the noise it needs (:func:`..privacy.policy.share_std`),
        clamped so that a share survives the quantizer. Without data, a vector still brings
        its share to the round's first secure sum (the honest count includes it)."""
        if noise is None or not (data or (self.spec.averaging.secure and first)):
            return values
        noise.top_up(dp_policy.share_std(self.spec, size, first=first))
        if noise.std < self.spec.privacy.dp_noise_multiplier * self.spec.privacy.dp_clip:  # a share
            bound = dp_policy.clamp_bound(self.spec, noise.std)
            values = np.clip(values, -bound, bound)
        return noise.release(values)

    def _returned(self, peer: PeerId) -> None:
        """``peer`` asked for our state: it is back (or catching up to be), not gone."""
        self._absent.discard(peer)
        self._returning.add(peer)

    def _note_absent(self, members: tuple[PeerId, ...], survivors: tuple[PeerId, ...]) -> None:
        """Presume gone the members that missed a step of ours, unless they asked for our
        state this round (they come back at the next); those present are not."""
        self._absent.difference_update(survivors)
        self._absent.update(set(members) - set(survivors) - self._returning)

    def _placement(self, number: int) -> Placement:
        return Placement.of(
            self.rosters.at(number),
            job=self._job,
            round=number,
            max_group=self.spec.averaging.max_group,
        )

    async def average(
        self,
        params: npt.NDArray[np.float32],
        number: int,
        *,
        weight: float | None = None,
        base: npt.NDArray[np.float32] | None = None,
    ) -> tuple[npt.NDArray[np.float32], list[int]]:
        """Round ``number``'s averaging steps on ``params`` (this peer's trained model, counted
        with ``weight``, by default :attr:`weight`): returns the weighted average and each
        step's number of survivors (0: left out). When the job averages updates, ``base`` is
        the round's starting model: the groups average ``params - base``."""
        origin = base if self.spec.averaging.averages_updates and base is not None else None
        if origin is not None:
            params = params - origin
        placement = self._placement(number)
        steps = self._steps(number)
        weight, sizes = self.weight if weight is None else weight, []
        own = self.spec.averaging.secure  # params are still this peer's own, which masks must hide
        # peer-level DP: the noise of this peer's own vector, until it is an aggregate
        noise, data = self._own_noise(len(params)), weight > 0
        me = self.node.peer_id
        for step in steps:
            index, members = placement.group(me, step)
            if len(members) < 2:
                sizes.append(1)
                continue
            if (own and len(members) < 3) or (self._settles and 0 in sizes):
                # a sum of two would show the other member this peer's model; after a failed
                # step, what this peer holds is not what its group holds: it would spread
                sizes.append(0)
                continue
            first = step == steps[0]
            absent = len(self._absent.intersection(members))
            if self.spec.robustness.robust != "none":
                mine = self._release(params, noise, len(members), first=first, data=data)
                try:
                    params, count = await self._robust_step(
                        mine, number, step, index, members, absent
                    )
                    noise = None
                except (AggregationFailed, MeshfedError, trio.TooSlowError):
                    count = 0
                sizes.append(count)
                continue
            vector = np.empty(len(params) + 1, np.float32)
            np.multiply(params, weight, out=vector[:-1])
            vector[:-1] = self._release(vector[:-1], noise, len(members), first=first, data=data)
            vector[-1] = weight
            rng = self._rng
            if self._settles and step:  # what this peer holds, others of other groups hold
                rng = _public_rng(self._job, number, step, placement.group(me, step - 1)[0])
            try:
                result = await self._group_mean(
                    vector, number * _STEPS_PER_ROUND + step, index, members, step, absent, rng
                )
            except (AggregationFailed, MeshfedError, trio.TooSlowError) as exc:
                if isinstance(exc, AggregationFailed) and exc.silent:  # it knows who is gone
                    self._note_absent(members, tuple(set(members) - set(exc.silent)))
                sizes.append(0)
                continue
            self._note_absent(members, result.survivors)
            total = float(result.value[-1])
            if total <= 0:  # nobody in the group contributed: nothing to learn from it
                sizes.append(len(result.survivors))
                continue
            params, noise = (result.value[:-1] / total).astype(np.float32), None
            # the group's weight, scaled by the axis so that it stays <= 1 at the next step
            weight = total * len(result.survivors) / placement.shape[step % placement.steps]
            sizes.append(len(result.survivors))
            own = own and len(result.survivors) < 3
        if noise is not None and data:  # never aggregated: the model kept may leave later
            params = self._release(params, noise, 1, first=False, data=True)
        return (params if origin is None else origin + params), sizes

    def _steps(self, number: int) -> list[int]:
        """The grid axes round ``number`` averages over: all of them with ``exact``."""
        axes = self._placement(number).steps
        return list(range(axes)) if self.spec.averaging.schedule == "exact" else [number % axes]

    async def _robust_step(
        self,
        params: npt.NDArray[np.float32],
        number: int,
        step: int,
        index: int,
        members: tuple[PeerId, ...],
        absent: int,
    ) -> tuple[npt.NDArray[np.float32], int]:
        """Gather the group's models and aggregate them robustly (uniform weights); returns
        the aggregate and how many models it came from."""
        gathered = await self.aggregator.gather(
            params, job=self._job, round=number * _STEPS_PER_ROUND + step, group=index,
            roster=members, absent=absent,
        )  # fmt: skip
        self._note_absent(members, gathered.survivors)
        aggregate = AGGREGATORS[self.spec.robustness.robust]
        options = dict(self.spec.robustness.robust_options)
        if self.spec.robustness.robust == "centered_clip":
            options["center"] = params

        def run() -> npt.NDArray[np.float32]:
            result: npt.NDArray[np.float32] = aggregate(gathered.value, **options)
            return result

        return await trio.to_thread.run_sync(run), len(gathered.survivors)

    async def _group_mean(
        self,
        vector: npt.NDArray[np.float32],
        round: int,
        index: int,
        members: tuple[PeerId, ...],
        step: int,
        absent: int,
        rng: np.random.Generator,
    ) -> GroupResult:
        """The group's mean of ``[w v, w]`` (``v``: the model, or the update when the job
        :attr:`~.spec.AveragingSpec.averages_updates`), the way the job's ``secure`` and
        ``compression`` say; ``absent`` members are presumed gone (a short probe, not the join
        floor)."""
        where: dict[str, Any] = {"job": self._job, "round": round, "group": index}
        if isinstance(self.codec, TopK):
            feedback = self._feedback.setdefault(step, ErrorFeedback(self.codec, len(vector)))
            before = feedback.residual
            try:
                return await self.aggregator.gather_mean(
                    vector, **where, roster=members, compression=feedback, rng=rng,
                    absent=absent,
                )  # fmt: skip
            except BaseException:
                feedback.rewind(before, vector)  # nothing was sent: all of it is carried
                raise
        if not self.spec.averaging.secure:
            return await self.aggregator.plain_mean(
                vector, **where, roster=members, compression=self.codec, rng=rng,
                absent=absent,
            )  # fmt: skip
        spec = GroupSpec(
            **where,
            roster=members,
            **secure_group(len(members), self.spec.averaging.collusion),
            ring_bits=self.quantizer.ring_bits,
        )
        if self.quantizer.ring_bits == 32:
            return await self.aggregator.secure_mean(
                spec, vector, self.quantizer, rng=rng, absent=absent
            )
        # 8 bits: the update is clipped to [-clip, clip] like any value, and the weight w <= 1
        # travels as copies of w clip, each off by at most one level (2 clip / 255), unbiased:
        # their mean over copies and peers is within ~1 / (255 sqrt(copies x peers)) of the
        # mean weight, far below what the update itself loses to 8 bits
        clip = self.quantizer.clip
        wide = np.concatenate([vector[:-1], np.full(_WEIGHT_COPIES, vector[-1] * clip, np.float32)])
        result = await self.aggregator.secure_mean(
            spec, wide, self.quantizer, rng=rng, absent=absent
        )
        weight = float(result.value[-_WEIGHT_COPIES:].mean()) / clip
        noise = 4 / (255 * math.sqrt(_WEIGHT_COPIES * len(result.survivors)))
        value = np.append(
            result.value[:-_WEIGHT_COPIES], np.float32(weight if weight > noise else 0)
        )
        return GroupResult(value, result.survivors, result.attempts)


def _refuse_early(
    node: Node, spec: JobSpec, store: Store | None, joining: RosterChange | None
) -> None:
    """The refusals that need no data (see :class:`TrainingPeer`)."""
    if joining is not None and joining.roster != spec.roster:
        raise ConfigError("a joining peer's spec lists the roster of the change it joins by")
    if str(node.peer_id) not in spec.roster:
        raise ConfigError("this node is not in the job's roster")
    if spec.progress.rollback_drop and store is None:
        raise ConfigError("rollback_drop needs the node's store (config store_file)")
    if spec.privacy.dp_clip and store is None:
        raise ConfigError(
            "differential privacy needs the node's store (config store_file): each round's "
            "charge is committed before the data is used, and must survive a restart"
        )


def _prepare(node: Node, spec: JobSpec) -> JobParts:
    """This peer's data, shards, model (it fits) and strategy for ``spec`` (:func:`prepare`).

    Raises:
        ConfigError (a DataError stays one): naming the job.
    """
    try:
        return prepare(spec, _own_data(node, spec))
    except ConfigError as exc:
        raise type(exc)(f"job {spec.job_id!r}: {exc}") from None


def _own_data(node: Node, spec: JobSpec) -> tuple[Dataset, Dataset, int] | None:
    """This peer's registered copy of the job's data set: ``(train, validation, classes)``
    (None for a bundled data set, which the job partitions).

    Raises:
        ConfigError: the node has no store; DataError: no such data set, or its file changed
            or cannot be read.
    """
    if not spec.data.own:
        return None
    if node.datasets is None:
        raise ConfigError(
            f"dataset: {spec.data.dataset!r} is a registered data set: it needs the node's store "
            "(config store_file)"
        )
    try:
        train, validation = node.datasets.load(
            spec.data.dataset, validation=spec.data.own_data.validation
        )
    except DataError as exc:
        raise DataError(f"dataset: {exc}") from None
    return train, validation, node.datasets.get(spec.data.dataset).classes


def _public_rng(job: bytes, number: int, step: int, held: int) -> np.random.Generator:
    """The stochastic rounding of what a peer brings to step ``step`` of an ``exact`` round:
    the aggregate of its group ``held`` at the step before, which the other members of that
    group bring to other groups at the same position. Drawn from public values, the same
    aggregate is rounded the same way everywhere, so the groups of the step get identical sums
    and every peer ends the round with the same bytes (what catch-up's digests compare). It
    hides nothing: the value is an aggregate, and DP noise has its own secret source."""
    seed = hashlib.sha256(b"meshfed.rounding.v1" + job + struct.pack(">QQQ", number, step, held))
    return np.random.default_rng(int.from_bytes(seed.digest()[:16], "big"))


def local_seed(spec: JobSpec, number: int) -> int:
    """The seed of round ``number``'s local shuffling (the same formula on every peer, so a
    centralized reference can replay a job exactly). Public: DP-SGD's sampling ignores it."""
    return spec.training.seed * 1_000_003 + number
