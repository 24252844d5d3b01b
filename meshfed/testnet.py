"""A local testnet: N ``meshfed-node run`` processes on 127.0.0.1 that a buyer's
``meshfed-node submit training`` process hires, by auction, to train one job together.

Each node is its own OS process talking libp2p over loopback. The testnet cuts the bundled
data set (``--dataset``) into one shard per node (``--partition``), writes each shard as a
``.npz`` file in that node's data directory and registers it there the way ``meshfed-node data
add`` does, and writes the job (:class:`~meshfed.training.spec.JobSpec` fields without a roster,
naming the registered data set) to a file. It starts the nodes (the first alone, then the others
at once with its address as their bootstrap peer: membership gossip connects them all), then a
buyer node that posts the job with a budget: the nodes bid, the auction awards
them, and each winner trains on its own non-IID shard, evaluates on the part of it it holds
out and averages with the others by secure aggregation, printing a JSON line per round (with
the roster's pooled accuracy and a digest of its model), and is paid round by round. This
module shows the bids, the award and its clearing price and the rounds live (rich), stops the
nodes with SIGTERM (a graceful stop) once the buyer settled, prints a summary per round and
each node's ledger, and writes the whole run as JSON.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .config import NodeConfig
from .data.registry import open_registry
from .errors import MeshfedError
from .identity import Identity, PeerId, load_or_create_identity
from .market.ledger import Ledger
from .market.terms import credits
from .node import STORE_KEY_PURPOSE
from .store import Store
from .training.data import OwnData
from .training.preflight import prepare
from .training.spec import JobSpec, flattened

__all__ = ["TestnetError", "run_testnet"]

_STARTUP_S = 60.0
_STOP_S = 15.0
#: how long killed nodes, started again, have to settle with the buyer
_REVIVE_S = 60.0


@dataclass
class _Child:
    index: int
    process: trio.Process
    started: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    outcome: dict[str, Any] = field(default_factory=dict)
    stopped: dict[str, Any] = field(default_factory=dict)
    ready: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)


async def json_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects ``stream`` (a node process's output) carries, one a line, until it
    ends; lines that are not one (the process's other output) are skipped."""
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            try:
                document = json.loads(line)
            except ValueError:
                continue
            if isinstance(document, dict):
                yield document


async def _read_lines(child: _Child, on_round: Callable[[], None]) -> None:
    assert child.process.stdout is not None
    async for document in json_lines(child.process.stdout):
        event = document.pop("event", None)
        if event == "started":
            child.started = document
            child.ready.set()
        elif event == "round":
            child.rounds.append(document)
            on_round()
        elif event in ("job_done", "job_failed"):
            child.outcome = {"event": event, **document}
            child.finished.set()
        elif event == "stopped":
            child.stopped = document
    child.finished.set()  # the process ended


@dataclass
class _Buyer:
    """The buyer's process and what it reported: the job's market events, its statement."""

    process: trio.Process | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    statement: dict[str, Any] = field(default_factory=dict)
    ended: trio.Event = field(default_factory=trio.Event)
    #: the roster's peer ids as the job started (the first roster the buyer announced)
    roster: list[str] = field(default_factory=list)
    #: the rounds at which the buyer was stopped and started again (``pause_buyer_at``)
    stopped_at: int | None = None
    restarted_at: int | None = None

    def market_line(self) -> str:
        """Bids, the award and its clearing price, what was paid: one line."""
        kinds = [event.get("event") for event in self.events]
        if not self.events:
            return "market: the buyer waits for the nodes' records"
        line = f"market: {kinds.count('bid')} bids, {kinds.count('decline')} declines"
        prices = [event["price"] for event in self.events if event.get("event") == "award"]
        if prices:
            line += f"; {len(prices)} awarded at {credits(min(prices))}"
            line += "" if len(set(prices)) == 1 else f"-{credits(max(prices))}"
            line += " per round (clearing price)"
        paid = sum(event["amount"] for event in self.events if event.get("event") == "round")
        line += f"; paid {credits(paid)} for {kinds.count('round')} rounds"
        ended = next((e for e in self.events if e.get("event") == "ended"), None)
        if ended is not None:
            line += f"; {ended['reason']}" + (f" ({ended['error']})" if ended["error"] else "")
        return line


async def _read_buyer(buyer: _Buyer, process: trio.Process) -> None:
    """Read one buyer process's lines; the buyer ended when its last process's output did."""
    assert process.stdout is not None
    async for document in json_lines(process.stdout):
        if document.get("event") == "statement":
            buyer.statement = document
        elif "job_id" in document:  # the job's events (not the process's own lines)
            buyer.events.append(document)
            if document.get("event") == "started" and not buyer.roster:
                buyer.roster = list(document["roster"])
    if process is buyer.process and (buyer.stopped_at is None or buyer.restarted_at is not None):
        buyer.ended.set()  # not the process the chaos test killed, to start it again


def _live_table(
    children: list[_Child], spec: JobSpec, elapsed: float, buyer: _Buyer | None = None
) -> Table:
    mode = "secure" if spec.averaging.secure else "plain"
    table = Table(
        title=f"meshfed testnet: {len(children)} nodes, {spec.training.model} on each node's own "
        f"{spec.data.dataset}, {mode} averaging, {elapsed:.0f} s"
    )
    table.caption = "accuracy: on the node's held-out part; pooled: over every node's part"
    if buyer is not None:
        table.caption += "\n" + buyer.market_line()
    columns = ["node", "peer id", "round", "accuracy", "pooled", "loss", "round s", "avg s"]
    columns.append("MB out")
    for column in columns + (["epsilon"] if spec.privacy.dp_clip else []):
        table.add_column(column, justify="right")
    if spec.privacy.dp_clip:
        table.caption += (
            f"\n* privacy budget (epsilon {spec.privacy.dp_epsilon}) spent: data no longer used"
        )
    for child in children:
        last = child.rounds[-1] if child.rounds else {}
        state = child.outcome.get("event", "")
        privacy = [f"{last['epsilon']:.2f}" if last else "-"] if spec.privacy.dp_clip else []
        stopped = "*" if last and not last.get("contributed", True) else ""
        table.add_row(
            str(child.index),
            child.started.get("peer_id", "starting")[-8:],
            f"{len(child.rounds)}/{spec.rounds}{stopped}"
            + (" failed" if state == "job_failed" else "")
            + (" converged" if child.outcome.get("state") == "converged" else ""),
            f"{last['accuracy']:.3f}" if last else "-",
            _pooled(last),
            f"{last['loss']:.3f}" if last else "-",
            f"{last['seconds']:.2f}" if last else "-",
            f"{last['averaging_s']:.2f}" if last else "-",
            f"{sum(r['bytes_out'] for r in child.rounds) / 1e6:.1f}",
            *privacy,
        )
    return table


def _pooled(report: dict[str, Any]) -> str:
    pooled = report.get("pooled_accuracy")
    return "-" if pooled is None else f"{pooled:.3f}"


def _summary(children: list[_Child], spec: JobSpec) -> tuple[Table, list[dict[str, Any]]]:
    table = Table(title="per round, over all nodes")
    table.caption = "accuracy: pooled over the nodes' held-out parts; spread: between nodes' own"
    for column in ("round", "accuracy", "spread", "models", "round s", "avg s", "kB out / node"):
        table.add_column(column, justify="right")
    rows = []
    for number in range(spec.rounds):  # a node that joined the job late has its later rounds
        reports = [r for c in children for r in c.rounds if r["round"] == number]
        if not reports:
            break
        accuracies = [r["accuracy"] for r in reports]
        pooled = [r["pooled_accuracy"] for r in reports if r.get("pooled_accuracy") is not None]
        row = {
            "round": number,
            "nodes": len(reports),
            # the roster's example-weighted accuracy (each node's own part, when not pooled)
            "accuracy": statistics.mean(pooled or accuracies),
            "accuracy_spread": max(accuracies) - min(accuracies),
            "models": len({r.get("model_digest") for r in reports}),
            "seconds": statistics.mean(r["seconds"] for r in reports),
            "averaging_s": statistics.mean(r["averaging_s"] for r in reports),
            "averaging_phase_s": _averaging_phase(reports),
            "bytes_out": statistics.mean(r["bytes_out"] for r in reports),
        }
        rows.append(row)
        table.add_row(
            str(number + 1),  # on screen rounds count from 1 (the live table's 1/N too)
            f"{row['accuracy']:.3f}",
            f"{row['accuracy_spread']:.3f}",
            str(row["models"]),
            f"{row['seconds']:.2f}",
            f"{row['averaging_s']:.2f}",
            f"{row['bytes_out'] / 1e3:.0f}",
        )
    return table, rows


def _averaging_phase(reports: list[dict[str, Any]]) -> float:
    """Mean seconds the nodes averaged after the last of them began (before that, the early
    ones only waited for it): the averaging phase proper, from the wall clocks of one machine."""
    last_began = max(r["averaging_at"] for r in reports)
    return statistics.fmean(
        max(0.0, r["averaging_at"] + r["averaging_s"] - last_began) for r in reports
    )


class TestnetError(MeshfedError):
    """A node of the testnet could not start."""


async def _first(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _unfinished(children: list[_Child]) -> trio.Event | None:
    """The end still awaited of a node that worked on the job (None: all of them ended)."""
    working = [c.finished for c in children if c.rounds or c.outcome]
    return next((finished for finished in working if not finished.is_set()), None)


def _failures(children: list[_Child]) -> list[str]:
    """A line for each node that did not finish its job, with its reason."""
    lines = []
    for child in children:
        outcome, code = child.outcome, child.process.returncode
        if outcome.get("event") == "job_failed":
            lines.append(f"node {child.index} failed: {outcome['error']}")
        elif not outcome:
            why = "did not finish in time" if code in (None, 0) else f"exited with code {code}"
            lines.append(f"node {child.index} {why}, after {len(child.rounds)} round(s)")
    return lines


def _make_job(
    workdir: Path, nodes: int, options: dict[str, Any], *, own_data: bool = True
) -> JobSpec:
    """Create each node's identity in its data directory (the roster follows from them), and
    give each node its shard of the bundled data set as a registered data set of its own
    (``own_data``; else the job cuts the bundled data set at every node, as a private
    federation's may).

    Raises:
        ConfigError: the job cannot run (checked on the bundled data set before any file is
            written), or a node's shard cannot be registered.
    """
    roster = []
    for index in range(nodes):
        data_dir = workdir / f"node-{index}"
        data_dir.mkdir(mode=0o700)
        identity = Identity.generate()
        identity.save(data_dir / "identity.key")
        roster.append(str(identity.peer_id))
    job_id = f"testnet-{os.urandom(4).hex()}"
    bundled = JobSpec.from_document({"job_id": job_id, "roster": roster, **options})
    parts = prepare(bundled)  # a job that cannot run is refused before any node starts
    if not own_data:
        return bundled
    name = f"{bundled.data.dataset}-shard"
    for index, shard in enumerate(parts.shards):
        data_dir = workdir / f"node-{index}"
        path = data_dir / f"{name}.npz"
        mine = parts.train.take(shard)
        np.savez(path, x=mine.x, y=mine.y)
        with open_registry(NodeConfig.load(overrides={"data_dir": data_dir})) as registry:
            registry.register(name, path, classes=int(parts.train.y.max()) + 1)
    own = OwnData(max_examples=max(len(shard) for shard in parts.shards))
    cut = ("dataset", "partition", "alpha")  # how the testnet cut the shards, not the job's
    rest = {key: value for key, value in flattened(options).items() if key not in cut}
    return JobSpec.from_document(
        {"job_id": job_id, "roster": roster, "dataset": name, "own_data": own, **rest}
    )


async def _revive(
    nursery: trio.Nursery, workdir: Path, children: list[_Child], env: dict[str, str]
) -> list[trio.Process]:
    """Start the killed nodes again, and the buyer's as a plain node, until each killed node's
    ledger holds what the buyer's paid it (or ``_REVIVE_S`` passed).

    A node killed between the buyer's payment and its acknowledgement's arrival has not
    learnt of it: the restarted node replays its journal, sends its unacknowledged debit notes
    again, and the buyer's node answers them from its own journal with the same
    acknowledgements (the operator restarting a crashed node, as a supervisor would)."""
    alive = [c.started["listen"][0] for c in children if c.outcome.get("event") != "killed"]
    killed = [c for c in children if c.outcome.get("event") == "killed"]
    processes = []
    for name in ["buyer", *(f"node-{c.index}" for c in killed)]:
        command = [sys.executable, "-m", "meshfed.cli", "run", "--data-dir", str(workdir / name)]
        for addr in alive:
            command += ["--bootstrap", addr]
        launch = functools.partial(
            trio.run_process, command, stdout=subprocess.DEVNULL, env=env, check=False
        )
        processes.append(await nursery.start(launch))
    names = [f"node-{c.index}" for c in killed]
    with trio.move_on_after(_REVIVE_S):
        while True:
            ledgers = await trio.to_thread.run_sync(_ledgers, workdir, ["buyer", *names])
            paid = _by_counterpart(ledgers["buyer"], "paid:")
            owed = [paid.get(PeerId.from_string(c.started["peer_id"]).raw.hex(), 0) for c in killed]
            earned = [sum(_by_counterpart(ledgers[name], "earned:").values()) for name in names]
            if owed == earned:
                break
            await trio.sleep(0.5)
    return processes


def _by_counterpart(accounts: dict[str, int], prefix: str) -> dict[str, int]:
    """The balances of ``prefix<job>:<peer>`` accounts by peer (hex), over every job."""
    totals: dict[str, int] = {}
    for account, balance in accounts.items():
        if account.startswith(prefix):
            peer = account.rsplit(":", 1)[-1]
            totals[peer] = totals.get(peer, 0) + balance
    return totals


def _ledgers(workdir: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """Each node's accounts, read from its store (read-only, under its key) after it stopped
    (empty for a node without a store)."""
    ledgers: dict[str, dict[str, int]] = {}
    for name in names:
        data_dir = workdir / name
        path = NodeConfig.load(overrides={"data_dir": data_dir}).store_path
        if path is None or not path.exists():
            ledgers[name] = {}
            continue
        key = load_or_create_identity(data_dir).derive_key(STORE_KEY_PURPOSE)
        with Store.open(path, key=key, readonly=True) as store:
            ledgers[name] = Ledger(store).accounts()
    return ledgers


def _ledger_table(ledgers: dict[str, dict[str, int]], peers: dict[str, str]) -> Table:
    table = Table(title="ledgers at the end (credits)")
    for column in ("node", "peer id", "available", "paid", "earned"):
        table.add_column(column, justify="right")
    for name, accounts in ledgers.items():
        paid = sum(v for k, v in accounts.items() if k.startswith("paid:"))
        earned = sum(v for k, v in accounts.items() if k.startswith("earned:"))
        table.add_row(
            name, peers.get(name, "")[-8:], credits(accounts.get("available", 0)),
            credits(paid), credits(earned),
        )  # fmt: skip
    return table


async def run_testnet(
    nodes: int,
    out: Path,
    *,
    limit_s: float,
    console: Console | None = None,
    kill: int = 0,
    kill_at_round: int = 1,
    hire: int = 0,
    pause_buyer_at: int = 0,
    pause_rounds: int = 2,
    revive: bool = False,
    budget: float = 5.0,
    own_data: bool = True,
    **job_options: Any,
) -> int:
    """Run the testnet (showing it on ``console``, stdout by default); returns 0 if every node
    that worked on the job to its end finished it with the same model.

    ``hire``: the buyer hires this many nodes (0: every node; the rest are standby bids).
    ``kill`` winners (the last ones of the roster) are killed with SIGKILL once every winner
    has reported round ``kill_at_round - 1``: the buyer replaces them from the other bids, or
    the others go on without them (the chaos test). ``pause_buyer_at``: once every winner
    reported that round, the buyer's process is killed (SIGKILL), and started again (the same
    command: it follows the job it posted) once they reported ``pause_rounds`` more.
    ``revive``: once the buyer settled, the killed nodes are started again, and the buyer's as a
    plain node, until their ledgers agree (:func:`_revive`).
    ``budget``: the buyer's, in credits. ``own_data``: each node trains on a shard registered
    as its own (else on the job's cut of the bundled data set: what the training benchmark
    compares with centralized FedAvg, evaluated on the same test set)."""
    console = console or Console(stderr=False)
    # The nodes bootstrap off each other; mDNS stays off so that two testnets (or a testnet and
    # other meshfed nodes on this host) never merge. One torch thread per node: N processes
    # share this machine's cores.
    env = {
        **os.environ,
        "MESHFED_PING_INTERVAL_S": "0",
        "MESHFED_LOG_LEVEL": "warning",
        "MESHFED_MDNS": "0",
        "OMP_NUM_THREADS": "1",
    }
    children: list[_Child] = []
    with tempfile.TemporaryDirectory(prefix="meshfed-testnet-") as tmp:
        workdir = Path(tmp)
        spec = _make_job(workdir, nodes, job_options, own_data=own_data)
        job_file = workdir / "job.json"
        fields = json.loads(spec.to_json())
        del fields["roster"]  # the auction picks it
        job_file.write_text(json.dumps(fields))
        buyer = _Buyer()
        began = trio.current_time()

        def hired() -> list[_Child]:
            by_peer = {c.started.get("peer_id"): c for c in children}
            return [by_peer[peer] for peer in buyer.roster if peer in by_peer]

        def reached(number: int) -> bool:
            winners = [c for c in hired() if c.outcome.get("event") != "killed"]
            return bool(winners) and all(len(c.rounds) >= number for c in winners)

        def chaos() -> None:
            """SIGKILL the last ``kill`` winners the moment every winner reported the round
            before ``kill_at_round`` (so they die in that round, and the rounds after it show
            the others carrying on); stop and start the buyer (``pause_buyer_at``)."""
            victims = hired()[-kill:] if kill else []
            if victims and not any(v.outcome for v in victims) and reached(kill_at_round - 1):
                for victim in victims:
                    victim.process.kill()
                    victim.outcome = {"event": "killed"}
            if pause_buyer_at and buyer.stopped_at is None and reached(pause_buyer_at):
                assert buyer.process is not None
                buyer.stopped_at = pause_buyer_at
                buyer.process.kill()
            elif (
                buyer.restarted_at is None
                and buyer.stopped_at is not None
                and reached(buyer.stopped_at + pause_rounds)
            ):
                buyer.restarted_at = buyer.stopped_at + pause_rounds
                nursery.start_soon(start_buyer)

        async def start_buyer() -> None:
            launch = functools.partial(
                trio.run_process, buyer_command, stdout=subprocess.PIPE, env=env, check=False
            )
            buyer.process = await nursery.start(launch)
            nursery.start_soon(_read_buyer, buyer, buyer.process)

        def start_node(index: int, bootstrap: list[str]) -> Callable[..., Any]:
            command = [sys.executable, "-m", "meshfed.cli", "run", "--json"]
            command += ["--data-dir", str(workdir / f"node-{index}")]
            for addr in bootstrap:
                command += ["--bootstrap", addr]
            return functools.partial(
                trio.run_process, command, stdout=subprocess.PIPE, env=env, check=False
            )

        async def until_started(child: _Child) -> None:
            with trio.move_on_after(_STARTUP_S):
                async with trio.open_nursery() as starting:  # started, or ended, or late
                    starting.start_soon(_first, child.ready, starting.cancel_scope)
                    starting.start_soon(_first, child.finished, starting.cancel_scope)
            if not child.ready.is_set():
                with trio.move_on_after(_STOP_S if child.finished.is_set() else 0):
                    await child.process.wait()  # its output ended: so does it, soon
                for started in children:
                    started.process.kill()
                code = child.process.returncode
                ended = f"ended with code {code}" if code is not None else "gave no sign"
                raise TestnetError(
                    f"node {child.index} {ended} before it started (its error is printed above)"
                )

        async with trio.open_nursery() as nursery:
            # the first node alone; then the others all at once (their start-up is mostly
            # imports: side by side they take the machine's cores), bootstrapping off it
            for index in range(nodes):
                bootstrap = [children[0].started["listen"][0]] if children else []
                child = _Child(index, await nursery.start(start_node(index, bootstrap)))
                children.append(child)
                nursery.start_soon(_read_lines, child, chaos)
                if index == 0:
                    await until_started(child)
            for child in children[1:]:
                await until_started(child)
            hiring = hire or nodes
            buyer_command = [
                sys.executable, "-m", "meshfed.cli", "submit", "training", str(job_file),
                "--budget", str(budget), "--json", "--data-dir", str(workdir / "buyer"),
                "--min-peers", str(max(4 if spec.averaging.secure else 2, hiring - kill)),
                "--max-peers", str(hiring), "--bid-window", "5", "--wait-peers", "60",
            ]  # fmt: skip
            for child in children:
                buyer_command += ["--bootstrap", child.started["listen"][0]]
            await start_buyer()
            with Live(
                _live_table(children, spec, 0, buyer), console=console, refresh_per_second=4
            ) as live:
                with trio.move_on_after(limit_s):
                    # the buyer settles, then every node that worked on the job ends it (the
                    # others only bid: they serve until stopped)
                    waited: trio.Event | None = buyer.ended
                    while waited is not None:
                        if waited.is_set():
                            waited = _unfinished(children)
                            continue
                        elapsed = trio.current_time() - began
                        live.update(_live_table(children, spec, elapsed, buyer))
                        with trio.move_on_after(0.25):
                            await waited.wait()
                assert buyer.process is not None
                revived: list[trio.Process] = []
                if revive and any(c.outcome.get("event") == "killed" for c in children):
                    with trio.move_on_after(_STOP_S):
                        await buyer.process.wait()  # it settled: its store is free again
                    revived = await _revive(nursery, workdir, children, env)
                    for process in revived:  # their ledgers are durable: no graceful stop
                        process.kill()
                        await process.wait()
                for process in [buyer.process, *(c.process for c in children)]:
                    if process.returncode is None:
                        process.send_signal(signal.SIGTERM)
                with trio.move_on_after(_STOP_S):
                    for child in children:
                        await child.process.wait()
                    await buyer.process.wait()
                live.update(_live_table(children, spec, trio.current_time() - began, buyer))
            for process in [buyer.process, *(child.process for child in children)]:
                if process.returncode is None:
                    process.kill()
        names = [*(f"node-{c.index}" for c in children), "buyer"]
        ledgers = await trio.to_thread.run_sync(_ledgers, workdir, names)
    # who worked on the job to its end: not killed, and hired (every node without an auction)
    survivors = [
        c for c in children if c.outcome.get("event") != "killed" and (c.rounds or c.outcome)
    ]
    table, rows = _summary(survivors, spec)
    console.print()
    console.print(table)
    console.print(buyer.market_line(), markup=False)
    peers = {f"node-{c.index}": c.started.get("peer_id", "") for c in children}
    console.print(_ledger_table(ledgers, peers))
    # a job may stop early (converged); every survivor must have said job_done
    lasts = [c.rounds[-1] for c in survivors if c.rounds]
    finals = [
        r["accuracy"] if r.get("pooled_accuracy") is None else r["pooled_accuracy"] for r in lasts
    ]
    done = len(lasts) == len(survivors) and all(
        c.outcome.get("event") == "job_done" for c in survivors
    )
    # gossip only brings models close (each node evaluates on its own part: not compared);
    # every other schedule makes them identical
    digests = {r["model_digest"] for r in lasts}
    same = done and (spec.averaging.schedule == "pushsum" or len(digests) == 1)
    clean = all(c.process.returncode == 0 for c in survivors)
    summary = {
        "job": json.loads(spec.to_json()),
        "seconds": trio.current_time() - began,
        "finished": done,
        "killed": [c.index for c in children if c.outcome.get("event") == "killed"],
        "buyer_stopped_at": buyer.stopped_at,
        "buyer_restarted_at": buyer.restarted_at,
        "same_model_everywhere": same,
        "final_accuracy": statistics.mean(finals) if finals else None,
        "rounds": rows,
        "market": {"events": buyer.events, "statement": buyer.statement, "ledgers": ledgers},
        "nodes": [
            {
                "index": c.index,
                "peer_id": c.started.get("peer_id"),
                "returncode": c.process.returncode,
                "outcome": c.outcome,
                "rounds": c.rounds,
                "stats": c.stopped.get("stats", {}),
            }
            for c in children
        ],
    }
    await trio.Path(out).write_text(json.dumps(summary, indent=2))
    killed = len(summary["killed"])
    who = f"every hired node ({killed} killed)" if kill or hire else "every node"
    model = "close models (gossip)" if spec.averaging.schedule == "pushsum" else "the same model"
    if same:
        verdict = f"{who} finished with {model}"
    elif done:
        verdict = f"{who} finished, but with {len(digests)} different models"
    else:
        verdict = "NOT every node finished"
        for line in _failures(survivors):
            console.print(line, markup=False)
    accuracy = f"final accuracy {summary['final_accuracy']:.3f}" if finals else "no accuracy"
    console.print(
        f"{verdict}, {accuracy}, {'clean stop' if clean else 'UNCLEAN stop'}; run written to {out}"
    )
    return 0 if same and clean else 1
