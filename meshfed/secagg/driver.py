"""Group sums over a node: the trio driver of the secure and the plain butterfly sessions.

:class:`Aggregator` registers the secure-aggregation messages and the butterfly arrays with a
:class:`~meshfed.node.Node` and runs one session per call (:meth:`Aggregator.secure_sum`,
:meth:`Aggregator.secure_mean`, :meth:`Aggregator.plain_mean`). For each session it

- quantizes, feeds the sans-IO session what arrives (one call at a time) and rescales, in a
  worker thread for long vectors (masking ten million elements must not stall the node's
  loop; for short ones the thread hop would cost more than the work);
- carries out the actions: the messages and short arrays one call produces go out together,
  each sealed once however many peers get it, as one task in the session's nursery with a
  deadline (a long array streams in a task of its own); a send that fails is only logged,
  since the protocol's deadlines deal with silent peers;
- ends a phase that waits too long, with a deadline that adapts to the arrivals it saw
  (:class:`DeadlinePolicy`): once most answers are in, the rest get as long again as those took;
- keeps messages and arrays that arrive for a run this node has not started yet (another peer
  finished training first) for ``pending_ttl_s``, and rejects those of runs that ended as late.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import trio

from ..arrays import INLINE_ARRAY_BYTES, ArrayHeader
from ..averaging.butterfly import ButterflySession
from ..averaging.compression import Codec
from ..averaging.gather import GatherSession
from ..errors import MeshfedError, RemoteProtocolError
from ..identity import PeerId
from ..node import Node
from ..stats import RejectReason
from ..wire import Envelope, Message, Scope
from .messages import AdvertiseKeys, InputsReceived, RollCall, ShareKeys, Survivors, Unmask
from .pending import Item, PendingStore
from .protocol import (
    Aborted,
    AbortReason,
    Action,
    Finished,
    GroupSpec,
    Progress,
    Rejected,
    SecAggSession,
    Send,
    SendSlice,
    SliceKind,
)
from .ring import Levels, Quantizer, check_capacity

__all__ = ["AggregationFailed", "Aggregator", "DeadlinePolicy", "GroupResult"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_UNLOCKED = nullcontext()

#: vectors up to this many elements are masked in the event loop (a millisecond or two);
#: longer ones in a worker thread, so that the node keeps serving meanwhile
_INLINE_ELEMENTS = 1 << 18
_MESSAGES: tuple[type[Message], ...] = (
    AdvertiseKeys,
    ShareKeys,
    RollCall,
    InputsReceived,
    Survivors,
    Unmask,
)
#: the names of the arrays an aggregator takes (slices, summed slices, gathered vectors)
_ARRAY_PREFIXES = ("secagg.", "butterfly.", "gather.")


class AggregationFailed(MeshfedError):
    """A group run ended without a sum; ``reason`` says why (an :class:`AbortReason`), and
    ``silent`` names the members whose arrays never came when it knows them (a plain
    butterfly's last run), else it is empty."""

    def __init__(
        self, message: str, *, reason: AbortReason, silent: tuple[PeerId, ...] = ()
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.silent = silent


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadlinePolicy:
    """How long a phase waits for its stragglers.

    Attributes:
        join_s: least wait of a run's first phase (peers start runs at different times), and
            of any phase whose answers stopped coming before most were in.
        grace_s: least wait of any other phase once most answers are in.
        slack: once most answers are in, the rest get ``slack`` times as long as those took.
        phase_max_s: no phase waits longer; also the deadline of each send.
        probe_s: least wait of a run's first phase, once every member but those the caller
            presumes absent has answered (``absent=`` of the runs; a peer that missed a
            round, SPEC 7c): the absent get a short probe, not ``join_s``.

    Without a majority, a phase still ends ``max(join_s, slack x elapsed)`` after its last
    answer: when most of a group is dead or elsewhere (another attempt, another round), waiting
    the full ``phase_max_s`` would only delay the abort and the re-run.
    """

    join_s: float = 3.0
    grace_s: float = 0.5
    slack: float = 2.0
    phase_max_s: float = 60.0
    probe_s: float = 0.05

    def deadline(
        self,
        *,
        started: float,
        majority_at: float | None,
        last_at: float | None = None,
        first: bool,
        present_at: float | None = None,
    ) -> float:
        """When a phase that began at ``started`` gives up on the answers still missing (most
        of them came at ``majority_at``; the latest one at ``last_at``; all but the presumed
        absent at ``present_at``, first phase only)."""
        latest = started + self.phase_max_s
        if present_at is not None and first:
            latest = min(
                latest, present_at + max(self.probe_s, self.slack * (present_at - started))
            )
        if majority_at is not None:
            floor = self.join_s if first else self.grace_s
            return min(latest, majority_at + max(floor, self.slack * (majority_at - started)))
        if last_at is not None:
            return min(latest, last_at + max(self.join_s, self.slack * (last_at - started)))
        return latest


@dataclass(frozen=True, slots=True)
class GroupResult:
    """A group's sum (or mean): whose inputs are in it, how many attempts it took, and how
    many of this peer's values the quantizer clipped to ``[-clip, clip]`` (secure means)."""

    value: npt.NDArray[Any]
    survivors: tuple[PeerId, ...]
    attempts: int
    clipped: int = 0


class _Session(Protocol):
    @property
    def contexts(self) -> tuple[bytes, ...]: ...

    def progress(self) -> Progress: ...

    def start(self) -> list[Action]: ...

    def receive(self, sender: PeerId, message: Message) -> list[Action]: ...

    def receive_slice(
        self, sender: PeerId, kind: SliceKind, context: bytes, array: npt.NDArray[Any]
    ) -> list[Action]: ...

    def expire(self) -> list[Action]: ...


class _Run:
    """One session being driven: its lock, its nursery, and what the deadlines need."""

    def __init__(
        self,
        session: _Session,
        scope: Scope,
        nursery: trio.Nursery,
        *,
        in_thread: bool,
        absent: int = 0,
    ) -> None:
        self.session = session
        #: members the caller presumes absent, and when all the others were in (first phase)
        self.absent = absent
        self.present_at: float | None = None
        self.in_thread = in_thread
        self.scope = scope
        self.nursery = nursery
        self.lock = trio.Lock()
        self.outcome: Finished | Aborted | None = None
        self.changed = trio.Event()
        self.step: tuple[int, int] = (-1, -1)
        self.started = trio.current_time()
        self.majority_at: float | None = None
        self.last_at: float | None = None
        self.arrived = self.expected = 0

    def may_end_step(self) -> bool:
        """Whether the next answer could end the current step (it is the last one due)."""
        return self.arrived + 1 >= self.expected

    def observe(self, progress: Progress, call_started: float) -> bool:
        """Note the session's progress after a call that began at ``call_started``; True if it
        took a new step. A step counts from the start of the call that entered it, so the work
        that call did (masking a vector) is part of what the stragglers are allowed too.

        The waiter wakes only when the deadline may come sooner (a new step, the first answer,
        the majority); a later answer only pushes it back, which the waiter sees when it
        fires (one wake-up per phase instead of one per message)."""
        now = trio.current_time()
        new_step = progress.step != self.step
        previous, sooner = self.arrived, new_step
        self.arrived, self.expected = progress.arrived, progress.expected
        if new_step:
            self.step, self.started, self.majority_at = progress.step, call_started, None
            self.last_at = now if progress.arrived else None  # answers that came early
            self.present_at = None
        elif progress.arrived > previous:
            sooner = sooner or self.last_at is None
            self.last_at = now
        if self.majority_at is None and progress.arrived >= math.ceil(progress.expected / 2):
            self.majority_at, sooner = now, True
        if (
            self.absent
            and self.present_at is None
            and progress.arrived >= progress.expected - self.absent
        ):
            self.present_at, sooner = now, True
        if sooner:
            self.changed.set()
        return new_step


class _Buffers:
    """Vector-sized scratch arrays kept between runs. A fresh 40 MB array costs more in page
    faults here than masking it does, and every training round needs the same shapes."""

    def __init__(self, keep: int = 3) -> None:
        self._keep = keep
        self._free: dict[tuple[int, str], list[npt.NDArray[Any]]] = {}

    @contextmanager
    def lend(self) -> Iterator[Callable[[int, np.dtype[Any]], Levels]]:
        """``take(size, dtype)`` hands out arrays until the block ends, then takes them back
        (so keep the block open until nothing reads them: sends included)."""
        lent: list[npt.NDArray[Any]] = []

        def take(size: int, dtype: np.dtype[Any]) -> Levels:
            free = self._free.get((size, dtype.str))
            array = free.pop() if free else np.empty(size, dtype)
            lent.append(array)
            return array

        try:
            yield take
        finally:
            for array in lent:
                free = self._free.setdefault((array.size, array.dtype.str), [])
                if len(free) < self._keep:
                    free.append(array)


class Aggregator:
    """Secure and plain group sums over ``node``; create one per node.

    Args:
        node: the node whose transport carries the runs.
        deadlines: how long phases wait (:class:`DeadlinePolicy`).
        max_attempts: runs of one secure group per round (re-runs after early dropouts).
        pending_ttl_s: how long messages and arrays for a run not started here yet are kept.
        max_pending: how many such messages and arrays are kept at most, and
            ``max_pending_bytes`` how many array bytes; when full, the sender holding the most
            makes room for one holding less (:class:`~meshfed.secagg.pending.PendingStore`).
        max_pending_per_peer: how many of them one sender may have kept (then they are
            rejected).
        on_progress: called with each session's :class:`Progress` whenever it takes a new
            step (for status displays; it must not block).
        job: serve only the runs of this job (envelope scope ``job[:64]``), beside other
            jobs' aggregators on the same node; ``None``: every run no such aggregator takes.
        replace: take over from an earlier aggregator of the same ``job`` on ``node``
            (otherwise a second one is a ``LocalProtocolError``).
    """

    def __init__(
        self,
        node: Node,
        *,
        deadlines: DeadlinePolicy | None = None,
        max_attempts: int = 3,
        pending_ttl_s: float = 30.0,
        max_pending: int = 4096,
        max_pending_bytes: int = 1 << 30,
        max_pending_per_peer: int = 64,
        on_progress: Callable[[Progress], None] | None = None,
        job: bytes | None = None,
        replace: bool = False,
    ) -> None:
        self._node = node
        self._on_progress = on_progress
        self.deadlines = deadlines or DeadlinePolicy()
        self._max_attempts = max_attempts
        self._pending_ttl_s = pending_ttl_s
        self._runs: dict[bytes, _Run] = {}
        self._buffers = _Buffers()
        self._ended: dict[bytes, float] = {}
        self._pending = PendingStore(
            ttl_s=pending_ttl_s,
            max_items=max_pending,
            max_bytes=max_pending_bytes,
            per_sender=max_pending_per_peer,
        )
        self._scope = None if job is None else job[:64]
        for message_type in _MESSAGES:
            node.handle(message_type, self._on_message, job=self._scope, replace=replace)
        for prefix in _ARRAY_PREFIXES:
            node.on_array(self._on_array, prefix=prefix, job=self._scope, replace=replace)

    def close(self) -> None:
        """Stop taking messages and arrays (the node lets go of this aggregator and what it
        holds); an aggregator that replaced this one keeps its own."""
        for message_type in _MESSAGES:
            self._node.unhandle(message_type, self._on_message, job=self._scope)
        for prefix in _ARRAY_PREFIXES:
            self._node.off_array(self._on_array, prefix=prefix, job=self._scope)

    # -- public API ------------------------------------------------------------------------------

    async def secure_sum(self, spec: GroupSpec, levels: Levels, *, absent: int = 0) -> GroupResult:
        """The ring sum of the group's levels, by secure aggregation; ``absent`` members are
        presumed gone (the first phase waits only :attr:`DeadlinePolicy.probe_s` for them once
        the others are in; the same in every run below).

        Raises:
            AggregationFailed: the run (and every allowed re-run) ended without a sum.
        """
        with self._buffers.lend() as take:
            outcome, attempts = await self._secure(spec, levels, take, absent)
            return GroupResult(outcome.total, outcome.survivors, attempts)

    async def secure_mean(
        self,
        spec: GroupSpec,
        values: npt.NDArray[np.float32],
        quantizer: Quantizer,
        *,
        rng: np.random.Generator,
        absent: int = 0,
    ) -> GroupResult:
        """The mean of the survivors' float vectors, quantized, summed securely, rescaled.

        Values beyond ``quantizer.clip`` are clipped to it (the mean is of the clipped
        vectors): their count is logged as a warning and returned as ``clipped``. The group
        itself is checked when ``spec`` is built (:class:`GroupSpec`: no group in which
        colluders could read one member's input).

        Raises:
            ValueError: the quantizer's ring differs from the spec's, or the group's sum could
                wrap around the ring (:func:`~meshfed.secagg.ring.check_capacity`).
            AggregationFailed: as for :meth:`secure_sum`.
        """
        if quantizer.ring_bits != spec.ring_bits:
            raise ValueError("the quantizer and the group spec use different rings")
        check_capacity(len(spec.roster), quantizer.levels_bits, spec.ring_bits)
        with self._buffers.lend() as take:
            levels = take(values.size, spec.dtype)
            _, clipped = await _off_loop(
                lambda: quantizer.quantize_clipped(values, rng, out=levels), values.size
            )
            if clipped:
                log.warning(
                    "%d of %d values beyond the quantizer's clip %g were clipped to it",
                    clipped, values.size, quantizer.clip,
                )  # fmt: skip
            outcome, attempts = await self._secure(spec, levels, take, absent)
            count = len(outcome.survivors)

            def rescale() -> npt.NDArray[np.float32]:
                mean = np.empty(len(levels), np.float32)
                for part, bounds in _placed(outcome.parts):
                    quantizer.decode(part, count, mean=True, out=mean[bounds])
                return mean

            mean = await _off_loop(rescale, values.size)
            return GroupResult(mean, outcome.survivors, attempts, clipped)

    async def _secure(
        self,
        spec: GroupSpec,
        levels: Levels,
        take: Callable[[int, np.dtype[Any]], Levels],
        absent: int,
    ) -> tuple[Finished, int]:
        session = SecAggSession(
            spec,
            self._node.peer_id,
            levels,
            max_attempts=self._max_attempts,
            new_buffer=lambda: take(len(levels), spec.dtype),
        )
        scope = Scope(spec.job[:64], spec.round)
        outcome = await self._drive(session, scope, len(levels), absent)
        return outcome, session.attempt + 1

    async def plain_mean(
        self,
        values: npt.NDArray[np.float32],
        *,
        job: bytes,
        round: int,
        group: int,
        roster: tuple[PeerId, ...],
        compression: Codec | None = None,
        rng: np.random.Generator | None = None,
        absent: int = 0,
    ) -> GroupResult:
        """The mean of the group's float vectors by a plain (unmasked) butterfly all-reduce,
        its slices sent with ``compression`` (fp16, int8; default: float32 as they are).

        A member missing (dead, or elsewhere) makes the run end without a sum; the group is
        then re-run with the members whose arrays came, up to ``max_attempts`` runs in all
        (:meth:`.ButterflySession.present`): ``survivors`` says who the mean is over.
        ``absent`` members are presumed gone (a probe, as in :meth:`secure_sum`).

        Raises:
            ValueError: a top-k codec (use :meth:`gather_mean`).
            AggregationFailed: the last run ended without a sum (``silent``: whom it missed).
        """
        members, rng = roster, _rng(compression, rng)
        for attempt in range(1, self._max_attempts + 1):
            session = ButterflySession(
                job=job, round=round, group=group, roster=members, me=self._node.peer_id,
                values=values, codec=compression, rng=rng,
            )  # fmt: skip
            try:
                outcome = await self._drive(session, Scope(job[:64], round), len(values), absent)
                break
            except AggregationFailed as exc:
                present = session.present()
                if present is not None:
                    exc.silent = tuple(peer for peer in members if peer not in present)
                if attempt == self._max_attempts or present is None or len(present) < 2:
                    raise
                log.info("butterfly re-run", extra={"members": len(present), "of": len(members)})
                members, absent = present, 0
        mean = np.empty(len(values), np.float32)
        for part, bounds in _placed(outcome.parts):
            np.multiply(part, np.float32(1 / len(members)), out=mean[bounds])
        return GroupResult(mean, outcome.survivors, attempt)

    async def gather(
        self,
        values: npt.NDArray[np.float32],
        *,
        job: bytes,
        round: int,
        group: int,
        roster: tuple[PeerId, ...],
        absent: int = 0,
    ) -> GroupResult:
        """Every member's vector (an all-gather, for robust aggregation): ``value`` is the
        stacked vectors of ``survivors``, in roster order.

        Raises:
            AggregationFailed: fewer than a majority of the vectors arrived.
        """
        session = GatherSession(
            job=job, round=round, group=group, roster=roster, me=self._node.peer_id, values=values
        )
        outcome = await self._drive(session, Scope(job[:64], round), len(values), absent)
        return GroupResult(np.stack(outcome.parts), outcome.survivors, 1)

    async def gather_mean(
        self,
        values: npt.NDArray[np.float32],
        *,
        job: bytes,
        round: int,
        group: int,
        roster: tuple[PeerId, ...],
        compression: Codec,
        rng: np.random.Generator | None = None,
        absent: int = 0,
    ) -> GroupResult:
        """The mean of the group's vectors by an all-gather of their ``compression`` payloads
        (for top-k, whose payloads cannot be summed slice by slice): every member sums the same
        decoded vectors in roster order, so all get the same mean.

        Raises:
            AggregationFailed: a member's vector missed the deadline.
        """
        session = GatherSession(
            job=job, round=round, group=group, roster=roster, me=self._node.peer_id,
            values=values, codec=compression, rng=_rng(compression, rng), everyone=True,
        )  # fmt: skip
        outcome = await self._drive(session, Scope(job[:64], round), len(values), absent)
        total = np.zeros(len(values), np.float32)
        for part in outcome.parts:
            total += part
        total *= np.float32(1 / len(roster))
        return GroupResult(total, outcome.survivors, 1)

    # -- the loop ----------------------------------------------------------------------------------

    async def _drive(self, session: _Session, scope: Scope, size: int, absent: int = 0) -> Finished:
        self._forget_old()
        contexts = tuple(session.contexts)
        if any(context in self._runs for context in contexts):
            raise ValueError("this run is already in progress on this node")
        async with trio.open_nursery() as nursery:
            run = _Run(session, scope, nursery, in_thread=size > _INLINE_ELEMENTS, absent=absent)
            for context in contexts:
                self._runs[context] = run
            try:
                await self._feed(run, session.start)
                for context in contexts:
                    for sender, item in self._pending.take(context):
                        await self._feed_quietly(run, sender, context, item)
                while run.outcome is None:
                    await self._wait_or_expire(run)
            finally:  # before the nursery closes: nothing may be fed to the run after it
                now = trio.current_time()
                for context in contexts:
                    self._runs.pop(context, None)
                    self._ended[context] = now
        if isinstance(run.outcome, Aborted):
            raise AggregationFailed(run.outcome.detail, reason=run.outcome.reason)
        return run.outcome

    def _deadline(self, run: _Run) -> float:
        return self.deadlines.deadline(
            started=run.started,
            majority_at=run.majority_at,
            last_at=run.last_at,
            first=run.step[1] == 1,
            present_at=run.present_at,
        )

    async def _wait_or_expire(self, run: _Run) -> None:
        step = run.step
        run.changed = trio.Event()
        with trio.move_on_at(self._deadline(run)):
            await run.changed.wait()
            return
        if run.step == step and self._deadline(run) > trio.current_time():
            return  # answers since pushed the deadline back: wait again
        log.info("phase deadline", extra={"step": step})
        await self._feed(run, run.session.expire, only_at=step)

    async def _feed(
        self,
        run: _Run,
        call: Callable[[], list[Action]],
        *,
        only_at: tuple[int, int] | None = None,
    ) -> None:
        """Run one session call and carry out its actions; with ``only_at``, only if the
        session is still at that step once it is our turn (a deadline must not end the phase
        that a concurrent call has just begun). A call that may end a step (the step's last
        answer, a deadline) runs in a worker thread for long vectors: ending a step is where
        masks are computed; the other calls are quicker than a thread hop. Only such runs take
        the run's lock: without a thread, a call never yields, so calls cannot interleave."""
        async with run.lock if run.in_thread else _UNLOCKED:
            if only_at is not None and (run.step != only_at or run.outcome is not None):
                return
            if run.outcome is not None:
                raise RemoteProtocolError("the run has ended", reason=RejectReason.LATE)
            call_started = trio.current_time()
            if run.in_thread and (only_at is not None or run.may_end_step()):
                actions = await trio.to_thread.run_sync(call)
            else:
                actions = call()
            progress = run.session.progress()
            if run.observe(progress, call_started) and self._on_progress is not None:
                self._on_progress(progress)
        frames: dict[object, bytes] = {}  # a message to many peers is signed once
        sends: list[tuple[PeerId, bytes]] = []
        slices: dict[str, list[SendSlice]] = {}
        for action in actions:
            self._act(run, action, frames, sends, slices)
        parts: list[tuple[PeerId, bytes]] = []
        for name, group in slices.items():
            self._seal_slices(run, name, group, sends, parts)
        if sends:
            run.nursery.start_soon(self._send_each, sends, False)
        if parts:
            run.nursery.start_soon(self._send_each, parts, True)

    async def _feed_quietly(self, run: _Run, sender: PeerId, context: bytes, item: Item) -> None:
        """Hand over something kept before the run began; count it if it is rejected now."""
        try:
            await self._feed(run, _delivery(run.session, sender, context, item))
        except RemoteProtocolError as exc:
            self._node.stats.reject(exc.reason)

    def _act(
        self,
        run: _Run,
        action: Action,
        frames: dict[object, bytes],
        sends: list[tuple[PeerId, bytes]],
        slices: dict[str, list[SendSlice]],
    ) -> None:
        """Carry out one action; a message joins ``sends`` (sent together), sealed once for
        all its receivers (``frames`` keeps what this batch sealed); a short array joins
        ``slices`` under its name (see :meth:`_seal_slices`)."""
        if isinstance(action, Send):
            frame = frames.get(id(action.message))
            if frame is None:
                frame = frames[id(action.message)] = self._node.sealed(
                    action.message, scope=run.scope
                )
            sends.append((action.to, frame))
        elif isinstance(action, SendSlice):
            name = f"{action.kind}:{action.context.hex()}"
            if action.array.nbytes > INLINE_ARRAY_BYTES:
                run.nursery.start_soon(self._send_slice, run.scope, action, name)
                return
            slices.setdefault(name, []).append(action)
        elif isinstance(action, Rejected):
            self._node.stats.reject(action.reason)
            log.info("rejected", extra={"peer": action.peer.short(), "why": action.detail})
        else:
            run.outcome = action
            run.changed.set()

    def _seal_slices(
        self,
        run: _Run,
        name: str,
        group: list[SendSlice],
        sends: list[tuple[PeerId, bytes]],
        parts: list[tuple[PeerId, bytes]],
    ) -> None:
        """The short arrays of one name: one array for everyone (a slice sum) is sealed once
        into ``sends``; different ones (input slices, one per owner) go under one signature
        into ``parts``."""
        if len(group) > 1 and len({id(action.array) for action in group}) > 1:
            pairs = [(action.to, action.array) for action in group]
            parts.extend(self._node.sealed_parts(pairs, name=name, scope=run.scope))
            return
        frame = self._node.sealed_array(group[0].array, name=name, scope=run.scope)
        sends.extend((action.to, frame) for action in group)

    async def _send_each(self, sends: list[tuple[PeerId, bytes]], parts: bool) -> None:
        errors = await self._node.send_each(sends, within=self.deadlines.phase_max_s, parts=parts)
        for (to, _), error in zip(sends, errors, strict=True):
            if error is not None:
                log.info("send failed", extra={"peer": to.short(), "error": repr(error)})

    async def _send_slice(self, scope: Scope, action: SendSlice, name: str) -> None:
        try:
            await self._node.send_array(
                action.to, action.array, name=name, scope=scope, within=self.deadlines.phase_max_s
            )
        except MeshfedError as exc:
            log.info("slice send failed", extra={"peer": action.to.short(), "error": repr(exc)})

    # -- what arrives ------------------------------------------------------------------------------

    async def _on_message(self, envelope: Envelope, message: Message) -> None:
        await self._deliver(envelope.sender, getattr(message, "context", b""), message)

    async def _on_array(
        self, envelope: Envelope, header: ArrayHeader, array: npt.NDArray[Any]
    ) -> None:
        kind, _, context_hex = header.name.partition(":")
        try:
            slice_kind = SliceKind(kind)
            context = bytes.fromhex(context_hex)
        except ValueError:
            raise RemoteProtocolError(
                f"bad array name {header.name!r}", reason=RejectReason.BAD_FIELD
            ) from None
        await self._deliver(envelope.sender, context, (slice_kind, array))

    async def _deliver(self, sender: PeerId, context: bytes, item: Item) -> None:
        """Feed ``item`` to its run; keep it if the run has not started here yet (another
        peer got there first), within the pending limits.

        Raises:
            RemoteProtocolError: ``late`` for a run that ended, ``rate_limited`` past the
                limits, or whatever the session rejects.
        """
        run = self._runs.get(context)
        if run is not None:
            await self._feed(run, _delivery(run.session, sender, context, item))
            return
        if context in self._ended:
            raise RemoteProtocolError("for a run that has ended", reason=RejectReason.LATE)
        self._forget_old()
        self._pending.keep(trio.current_time(), context, sender, item)

    def _forget_old(self) -> None:
        now = trio.current_time()
        self._pending.forget_old(now)
        self._ended = {c: t for c, t in self._ended.items() if t >= now - 10 * self._pending_ttl_s}


def _delivery(
    session: _Session, sender: PeerId, context: bytes, item: Item
) -> Callable[[], list[Action]]:
    """The session call that takes ``item``."""
    if isinstance(item, tuple):
        kind, array = item
        return lambda: session.receive_slice(sender, kind, context, array)
    return lambda: session.receive(sender, item)


def _rng(codec: Codec | None, rng: np.random.Generator | None) -> np.random.Generator | None:
    """The randomness a codec needs: ``rng``, or fresh from the OS."""
    return rng if rng is not None or codec is None else np.random.default_rng()


async def _off_loop(work: Callable[[], T], size: int) -> T:
    """``work()`` on a vector of ``size`` elements: in a worker thread if the vector is long,
    else right here (a thread hop costs more than quantizing a short vector)."""
    if size > _INLINE_ELEMENTS:
        return await trio.to_thread.run_sync(work)
    await trio.lowlevel.checkpoint()
    return work()


def _placed(parts: tuple[npt.NDArray[Any], ...]) -> list[tuple[npt.NDArray[Any], slice]]:
    """Each part with the slice of the whole vector it fills."""
    placed, start = [], 0
    for part in parts:
        placed.append((part, slice(start, start + len(part))))
        start += len(part)
    return placed
