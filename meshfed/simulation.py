"""The testnet's job for hundreds of peers in one process, on the memory transport.

``meshfed-node testnet --simulate N`` runs the same :class:`~meshfed.training.spec.JobSpec` as
the multi-process testnet, with N nodes on one simulated network (:mod:`meshfed.transports.
memory`): the same nodes, envelopes, secure aggregation and Moshpit groups, without sockets.
It shows the round reports live (means over the peers), and writes the run as JSON with the
process's peak memory and the CPU seconds of each round (all threads: on a shared machine, a
steadier figure than the wall clock).
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .device.simulator import PROFILES, SimulatedDevice
from .errors import ConfigError
from .heap import long_lived_heap
from .identity import Identity
from .node import Node
from .secagg.driver import Aggregator, DeadlinePolicy
from .testing import open_memory_mesh
from .training.job import RoundReport, TrainingPeer
from .training.preflight import JobParts, prepare
from .training.spec import JobSpec

__all__ = ["run_simulation"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _table(spec: JobSpec, peers: int, rows: list[dict[str, Any]], elapsed: float) -> Table:
    mode = "secure" if spec.averaging.secure else "plain"
    table = Table(
        title=f"meshfed simulation: {peers} peers in one process, {spec.training.model} on "
        f"{spec.data.dataset} ({spec.data.partition}), {mode} averaging, {elapsed:.0f} s"
    )
    for column in ("round", "accuracy", "spread", "round s", "CPU s", "groups", "peak MB"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["round"] + 1),  # counted from 1 here, as everywhere on screen
            f"{row['accuracy']:.3f}",
            f"{row['accuracy_spread']:.3f}",
            f"{row['seconds']:.2f}",
            f"{row['cpu_s']:.2f}",
            str(row["group_sizes"]),
            f"{row['peak_rss_mb']:.0f}",
        )
    return table


async def run_simulation(
    peers: int,
    out: Path,
    *,
    console: Console | None = None,
    devices: Sequence[str] = (),
    **job_options: Any,
) -> int:
    """Run the job on ``peers`` simulated nodes; returns 0 if every peer finished.

    ``devices``: profile names (:data:`~meshfed.device.simulator.PROFILES`) given to the peers
    in turn, each a :class:`~meshfed.device.simulator.SimulatedDevice` seeded by its index and
    loaded while it trains; each round's row says how many of them their device policy would
    pause (``device_paused``: this simulation still runs every peer every round) and their mean
    battery (default: every peer reads this machine)."""
    console = console or Console()
    # Hundreds of tiny models train in worker threads: torch's intra-op threads only spin
    # against each other there (6x the CPU of one thread per call, measured), and worker
    # threads beyond the cores only take turns at the GIL with the loop (trio's default of 40:
    # ~3% more CPU per round and 35 MB more memory than one per core, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    workers = trio.to_thread.current_default_thread_limiter()
    tokens = workers.total_tokens
    workers.total_tokens = max(2, os.cpu_count() or 2)
    try:
        return await _simulate(peers, out, console, devices, job_options)
    finally:
        torch.set_num_threads(threads)
        workers.total_tokens = tokens


async def _simulate(
    peers: int, out: Path, console: Console, profiles: Sequence[str], job_options: dict[str, Any]
) -> int:
    unknown = sorted(set(profiles) - set(PROFILES))
    if unknown:
        raise ConfigError(f"devices: unknown profiles {unknown}; known: {sorted(PROFILES)}")
    began = time.monotonic()
    rows: list[dict[str, Any]] = []
    # The job is checked whole (fields, data for this many peers, model against data) before
    # any node opens: its roster comes from identities made first.
    identities = [Identity.generate() for _ in range(peers)]
    roster = tuple(str(identity.peer_id) for identity in identities)
    spec = JobSpec.from_document(
        {"job_id": f"sim-{os.urandom(4).hex()}", "roster": roster, **job_options}
    )
    parts = prepare(spec)
    advice = _few_steps(spec, parts)
    if advice:
        console.print(advice)
    devices = [
        SimulatedDevice(PROFILES[profiles[i % len(profiles)]], seed=i, start=trio.current_time())
        for i in range(peers if profiles else 0)
    ]
    with tempfile.TemporaryDirectory(prefix="meshfed-sim-") as tmp:
        async with open_memory_mesh(
            peers, Path(tmp), identities=identities, devices=devices or None
        ) as nodes:
            # One process carries every peer: a phase waits for stragglers that only this
            # process's own load delays, so the deadlines are generous (nobody dies here).
            patient = DeadlinePolicy(join_s=30.0, grace_s=10.0, slack=10.0, phase_max_s=600.0)
            trainers = [
                TrainingPeer(
                    node,
                    spec,
                    Aggregator(node, deadlines=patient),
                    store=node.store if spec.privacy.dp_clip else None,  # DP commits each charge
                )
                for node in nodes
            ]
            reports: dict[int, list[RoundReport]] = {}
            with (
                long_lived_heap(),
                Live(_table(spec, peers, rows, 0), console=console, refresh_per_second=2) as live,
            ):
                for number in range(spec.rounds):
                    round_began, cpu_began = time.monotonic(), time.process_time()
                    paused, batteries = await _devices_at_round_start(nodes, devices)

                    async def one(i: int, number: int = number) -> None:
                        reports.setdefault(i, []).append(await trainers[i].run_round(number))

                    async with trio.open_nursery() as nursery:
                        for i in range(peers):
                            nursery.start_soon(one, i)
                    for device in devices:
                        device.set_load(0.0)
                    latest = [reports[i][-1] for i in range(peers)]
                    accuracies = [r.accuracy for r in latest]
                    rows.append(
                        {
                            "round": number,
                            "accuracy": statistics.mean(accuracies),
                            "accuracy_spread": max(accuracies) - min(accuracies),
                            "seconds": time.monotonic() - round_began,
                            "cpu_s": time.process_time() - cpu_began,
                            "group_sizes": sorted({s for r in latest for s in r.groups}),
                            "bytes_out": statistics.mean(r.bytes_out for r in latest),
                            "peak_rss_mb": _peak_rss_mb(),
                            "device_paused": paused,
                            "battery_pct": statistics.mean(batteries) if batteries else None,
                        }
                    )
                    live.update(_table(spec, peers, rows, time.monotonic() - began))
    later = rows[1:] or rows
    summary = {
        "job": json.loads(spec.to_json()),
        "peers": peers,
        "seconds": time.monotonic() - began,
        "round_s": statistics.mean(r["seconds"] for r in later),
        "round_cpu_s": statistics.mean(r["cpu_s"] for r in later),
        "peak_rss_mb": _peak_rss_mb(),
        "final_accuracy": rows[-1]["accuracy"],
        "rounds": rows,
    }
    await trio.Path(out).write_text(json.dumps(summary, indent=2))
    console.print()
    console.print(
        f"{peers} simulated peers, final accuracy {summary['final_accuracy']:.3f}, "
        f"{summary['round_s']:.2f} s per round, peak {summary['peak_rss_mb']:.0f} MB; "
        f"run written to {out}"
    )
    if advice and summary["final_accuracy"] < 2 / _classes(parts):
        console.print(f"accuracy near chance: {advice.removeprefix('note: ')}")
    return 0


async def _devices_at_round_start(
    nodes: Sequence[Node], devices: Sequence[SimulatedDevice]
) -> tuple[int, list[int]]:
    """With simulated devices: read each one (its node decides), then load it for the round;
    returns how many nodes their device policy would pause, and the batteries read."""
    if not devices:
        return 0, []
    services = [node.device for node in nodes if node.device is not None]
    for service in services:
        await service.refresh()
        service.set_load(1.0)
    paused = sum(1 for service in services if not service.allows_work())
    readings = [service.readings.battery_pct for service in services]
    return paused, [battery for battery in readings if battery is not None]


def _classes(parts: JobParts) -> int:
    return int(parts.train.y.max()) + 1


def _few_steps(spec: JobSpec, parts: JobParts) -> str:
    """Advice when the peers' shards are so small that a round is only a step or two of SGD
    per peer (then many rounds stay near chance accuracy), else ''."""
    sizes = [len(shard) for shard in parts.shards]
    typical = statistics.median(sizes)
    steps = spec.training.local_steps or spec.training.epochs * math.ceil(
        typical / spec.training.batch_size
    )
    if steps > 2:
        return ""
    return (
        f"note: {len(sizes)} peers share {len(parts.train)} training examples ({typical:.0f} "
        f"each, typically): {steps} SGD step(s) per peer per round, so the first rounds stay "
        "near chance accuracy; give more --epochs or --local-steps, fewer peers, or "
        "--dataset synthetic"
    )
