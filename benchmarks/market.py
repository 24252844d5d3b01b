"""An auction from the request for quotes to the signed award in the winners' hands, next to
one plain request round trip on the same transport, same run.

Prints one JSON line:

- ``award_ms_N`` (memory transport, ``N`` bidders in this process) and ``award_ms_libp2p_P``
  (``P`` OS processes on 127.0.0.1: one buyer, ``P - 1`` bidders): from the buyer's call to
  ``Node.submit_training`` until the *last* winner's lease book turned its award into a lease
  (``Market.seller_observers``: the instant its ``SellerBook`` produced ``StartTraining``);
  ``award_first_ms_*`` until the first winner's;
- ``rtt_ms_memory``, ``rtt_ms_libp2p``: the median round trip of one signed request (Ping,
  answered by a signed Pong) from the buyer to a bidder on the same transport, measured just
  before each auction; ``award_rtts_*`` = award time / round trip;
- ``release_ms_*``: from the buyer sending its awards (and, with them, the releases) until
  the last loser's lease book holds no reservation (observed at the loser as it takes the
  release, not by polling);
- ``rfq_out_ms_*``, ``bids_in_ms_*``, ``award_out_ms_*``: where the time goes, at the buyer:
  its RFQs sent, the last answer in, its awards sent (from the submit); ``buyer_cpu_ms_*``:
  CPU time of the buyer's process from the submit until every winner accepted (on the memory
  transport that process runs every node);
- ``fsync_ms_disk``: the median write + fsync of a small file on the disk the libp2p nodes
  keep their stores on (each market event a node takes is journaled, one fsync per batch,
  before it acts on it; a quote's is written with the next event that waits for the disk);
- ``goal_*``: the issue's goals (award within 1 s with the most bidders on memory, within 20
  round trips over libp2p, every reservation released within 1 s), met or not.

Each case runs ``--repeats`` auctions (default 3) on the same nodes and reports the fastest
auction's figures and the fastest round trip (each a median of 50), as ``timeit`` does: the
machine is shared, other load only adds time, and the first auction of a process pays
first-use costs. The job bought is one round of a small plain (not secure) job; the buyer
cancels it as soon as every winner holds its lease, so nothing is paid, and the settlement
stops the winners' training; the next auction waits until it stopped. Every bidder asks its
own price (seeded) and states its own throughput. Before the clock starts the buyer holds
every bidder's signed record: on the memory transport it is handed them (what membership
gossip converges to, without gossiping 500 full views in one process), over libp2p it learns
them by gossip and the run waits for its full view. The memory-transport nodes keep their
stores in ``--memory-dir`` (``/dev/shm``): 501 nodes journaling on one disk would measure that
disk, where each real node has its own; the libp2p nodes keep theirs on disk. Meshfed's
training module (and torch) is imported before any clock starts, as on a node that trained
before.

Usage: python benchmarks/market.py [--bidders 50,500] [--procs 8] [--winners 4]
       [--repeats 3] [--seed 0] [--memory-dir /dev/shm]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from meshfed.config import NodeConfig
from meshfed.control import Ping
from meshfed.identity import PeerId
from meshfed.logs import configure_logging
from meshfed.market.driver import JobHandle, Market
from meshfed.market.lease import LeaseAction, StartTraining
from meshfed.market.messages import MarketMessage, Release
from meshfed.market.pricing import AskPolicy
from meshfed.market.terms import WorkKind
from meshfed.node import Node, open_node
from meshfed.testing import open_memory_mesh

#: one round of a small plain job: enough to be auctioned, cancelled before it is paid for
JOB = {"rounds": 1, "dataset": "synthetic", "secure": False, "partition": "iid"}
BUDGET = 1.0  # credits: a reserve far above every ask, so every bidder is eligible
RTT_SAMPLES = 50
#: what a lease's training ends in (``Market.work[job].state``)
STOPPED = ("finished", "converged", "failed", "stopped", "ended")


def prices(count: int, seed: int) -> list[tuple[int, float]]:
    """Each bidder's base price (micro-credits per unit) and throughput (examples/s)."""
    rng = random.Random(seed)
    return [(rng.randint(8_000, 12_000), rng.uniform(100.0, 1_000.0)) for _ in range(count)]


async def sell(market: Market, price: int, throughput: float) -> None:
    """Ask ``price`` for training and state ``throughput``, in a newly signed record."""
    policy = AskPolicy(base={WorkKind.TRAINING: price})
    market.config = replace(market.config, asks=policy, throughput=throughput)
    await market.publish_asks()


def on_outcome(market: Market, report: Callable[[str, str, float], None]) -> None:
    """Call ``report(job, "leased" | "released", wall_time)`` the instant ``market``'s lease
    book turns an award into a lease, or a release leaves it holding no reservation."""

    def seen(sender: PeerId, message: MarketMessage, actions: list[LeaseAction]) -> None:
        now = time.time()
        if any(isinstance(action, StartTraining) for action in actions):
            report(message.job, "leased", now)
        elif isinstance(message, Release) and market.seller.reserved(now) == 0:
            report(message.job, "released", now)

    market.seller_observers.append(seen)


async def until_idle(market: Market) -> None:
    """Wait until the training of every lease ``market`` won stopped (between auctions)."""
    with trio.fail_after(120):
        # no event marks the end of a lease's training: look every 0.1 s
        while any(work.state not in STOPPED for work in market.work.values()):  # noqa: ASYNC110
            await trio.sleep(0.1)


async def round_trip_ms(node: Node, peer: PeerId, n: int = RTT_SAMPLES) -> float:
    """The median of ``n`` signed request round trips to ``peer`` (after ``n // 5`` warm-ups)."""
    samples = []
    for index in range(n + n // 5):
        started = time.perf_counter()
        await node.request(peer, Ping(sent_ms=time.time_ns() // 1_000_000))
        if index >= n // 5:
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def buy(node: Node, job_id: str, winners: int) -> dict[str, Any]:
    """Post a job, wait until every winner accepted, cancel it; when things happened."""
    submitted, cpu = time.time(), time.process_time()
    handle = await node.submit_training(
        {**JOB, "job_id": job_id}, budget=BUDGET, min_peers=winners, max_peers=winners
    )
    roster: list[str] = []
    with trio.fail_after(60):
        async for event in handle.watch():
            if event["event"] == "ended":
                raise RuntimeError(f"the auction ended without a roster: {event}")
            if event["event"] == "started":
                roster = list(event["roster"])
                break
    cpu = time.process_time() - cpu
    await handle.cancel()
    with trio.fail_after(60):
        await handle.wait()
    return {
        "submitted": submitted,
        "cpu_s": cpu,
        "milestones": milestones(handle),
        "roster": roster,
        "bidders": [e["peer"] for e in handle.events if e["event"] == "bid"],
    }


def milestones(handle: JobHandle) -> dict[str, float]:
    """When (wall clock) the buyer sent its RFQs, had the last answer and sent its awards."""
    names = {"rfq": "rfq_out", "bid": "bids_in", "decline": "bids_in", "award": "award_out"}
    at: dict[str, float] = {}
    for event in handle.events:
        key = names.get(event["event"])
        if key is not None and (key == "bids_in" or key not in at):
            at[key] = event["at"]  # the first RFQ and award, the last answer
    return at


def figures(
    suffix: str, bought: dict[str, Any], outcomes: dict[str, tuple[str, float]]
) -> dict[str, float]:
    """One auction's figures in milliseconds (see the module docstring); ``outcomes`` holds
    what each bidder said (``leased`` or ``released``) and when."""
    submitted, marks = bought["submitted"], bought["milestones"]
    losers = set(bought["bidders"]) - set(bought["roster"])
    said = {peer: "leased" for peer in bought["roster"]} | {peer: "released" for peer in losers}
    assert {peer: outcomes[peer][0] for peer in said} == said, outcomes
    leased = [outcomes[peer][1] for peer in bought["roster"]]
    released = [outcomes[peer][1] for peer in losers]
    award_ms = (max(leased) - submitted) * 1000
    result = {
        f"award_ms_{suffix}": round(award_ms, 1),
        f"award_first_ms_{suffix}": round((min(leased) - submitted) * 1000, 1),
        f"buyer_cpu_ms_{suffix}": round(bought["cpu_s"] * 1000, 1),
        f"release_ms_{suffix}": round(
            (max(released, default=marks["award_out"]) - marks["award_out"]) * 1000, 1
        ),
    }
    for key, at in marks.items():
        result[f"{key}_ms_{suffix}"] = round((at - submitted) * 1000, 1)
    return result


def fastest(suffix: str, attempts: list[dict[str, float]], rtts: list[float]) -> dict[str, float]:
    """The fastest attempt's figures, the fastest round trip (each a median of its samples),
    and the one over the other."""
    best = min(attempts, key=lambda figures: figures[f"award_ms_{suffix}"])
    rtt_ms = min(rtts)
    return {
        **best,
        f"rtt_ms_{suffix}": round(rtt_ms, 3),
        f"award_rtts_{suffix}": round(best[f"award_ms_{suffix}"] / rtt_ms, 1),
    }


# -- memory transport, one process ---------------------------------------------------------------


class Outcomes:
    """When each bidder leased its award or released its reservation, per job."""

    def __init__(self) -> None:
        self.at: dict[str, dict[str, tuple[str, float]]] = defaultdict(dict)
        self._changed = trio.Event()

    def reporter(self, peer: str) -> Callable[[str, str, float], None]:
        def report(job: str, what: str, at: float) -> None:
            self.at[job][peer] = (what, at)
            self._changed.set()
            self._changed = trio.Event()

        return report

    async def wait(self, job: str, count: int) -> None:
        """Until ``count`` bidders of ``job`` leased or released."""
        while len(self.at[job]) < count:
            await self._changed.wait()


async def memory_case(
    bidders: int, winners: int, repeats: int, root: Path, seed: int
) -> dict[str, float]:
    # every node writes its store from worker threads: one process's default of 40 for all of
    # them would queue each node's writes behind the others', which nodes of their own do not
    trio.to_thread.current_default_thread_limiter().total_tokens = bidders + 40
    async with open_memory_mesh(
        bidders + 1, root, membership=True, gossip_interval_s=3600.0, market_capacity=1
    ) as nodes:
        buyer, sellers = nodes[0], nodes[1:]
        assert buyer.membership is not None
        outcomes = Outcomes()
        for seller, (price, throughput) in zip(sellers, prices(bidders, seed), strict=True):
            assert seller.market is not None and seller.membership is not None
            await sell(seller.market, price, throughput)
            on_outcome(seller.market, outcomes.reporter(str(seller.peer_id)))
            signed = seller.membership.table.signed(seller.peer_id)
            assert signed is not None
            buyer.membership.table.apply(signed, now_ms=time.time_ns() // 1_000_000)
            buyer.membership.introduce(seller.peer_id)
        assert sum(1 for r in buyer.peers() if r.capabilities.prices) == bidders
        attempts, rtts = [], []
        for attempt in range(repeats):
            rtts.append(await round_trip_ms(buyer, sellers[attempt % bidders].peer_id))
            job = f"bench-memory-{bidders}-{attempt}"
            bought = await buy(buyer, job, winners)
            with trio.fail_after(60):
                await outcomes.wait(job, len(bought["bidders"]))
            attempts.append(figures(str(bidders), bought, outcomes.at[job]))
        return fastest(str(bidders), attempts, rtts)


# -- libp2p, one OS process per node --------------------------------------------------------------


async def worker(data_dir: Path) -> None:
    """One node of the libp2p case, driven by JSON lines on stdin (see :class:`Workers`)."""
    import meshfed.training.job  # noqa: F401  (a node that trained before has torch loaded)

    config = NodeConfig.load(
        overrides={
            "data_dir": data_dir,
            "ping_interval_s": 0.0,
            "mdns": False,
            "gossip_interval_s": 0.2,
        }
    )

    def say(document: dict[str, Any]) -> None:
        print(json.dumps(document), flush=True)

    async with open_node(config) as node:
        market = node.market
        assert market is not None
        on_outcome(market, lambda job, what, at: say({"event": what, "job": job, "at": at}))
        say({"listen": node.listen_addrs, "peer": str(node.peer_id)})
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                command = json.loads(line)
                cmd = command["cmd"]
                if cmd == "stop":
                    return
                if cmd == "connect":
                    say({"peer": str(await node.connect(command["addr"]))})
                elif cmd == "sell":
                    await sell(market, command["price"], command["throughput"])
                    say({"selling": True})
                elif cmd == "sellers":
                    say({"sellers": sum(1 for r in node.peers() if r.capabilities.prices)})
                elif cmd == "rtt":
                    peer = PeerId.from_string(command["peer"])
                    say({"rtt_ms": await round_trip_ms(node, peer)})
                elif cmd == "buy":
                    say(await buy(node, command["job"], command["winners"]))
                elif cmd == "idle":
                    await until_idle(market)
                    say({"idle": True})


class Workers:
    """``count`` worker processes (this script with ``--worker``)."""

    def __init__(self, count: int, tmp: Path) -> None:
        self.processes = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(tmp / f"w{i}")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(count)
        ]
        hellos = [self.read(process) for process in self.processes]
        self.ids = [hello["peer"] for hello in hellos]
        self.addrs = [hello["listen"][0] for hello in hellos]

    @staticmethod
    def call(process: subprocess.Popen[str], **command: Any) -> dict[str, Any]:
        assert process.stdin is not None
        process.stdin.write(json.dumps(command) + "\n")
        process.stdin.flush()
        return Workers.read(process)

    @staticmethod
    def read(process: subprocess.Popen[str]) -> dict[str, Any]:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker ended (exit {process.wait()})")
        document: dict[str, Any] = json.loads(line)
        return document

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                assert process.stdin is not None
                process.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                process.stdin.flush()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def libp2p_case(count: int, winners: int, repeats: int, tmp: Path, seed: int) -> dict[str, float]:
    workers = Workers(count, tmp)
    suffix = f"libp2p_{count}"
    attempts, rtts = [], []
    try:
        buyer, sellers = workers.processes[0], workers.processes[1:]
        for process, (price, throughput) in zip(sellers, prices(count - 1, seed), strict=True):
            workers.call(process, cmd="sell", price=price, throughput=throughput)
            workers.call(process, cmd="connect", addr=workers.addrs[0])
        deadline = time.monotonic() + 60
        while workers.call(buyer, cmd="sellers")["sellers"] < count - 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the buyer did not learn every seller's record in 60 s")
            time.sleep(0.2)
        by_id = dict(zip(workers.ids, workers.processes, strict=True))
        for attempt in range(repeats):
            peer = workers.ids[1 + attempt % (count - 1)]
            rtts.append(workers.call(buyer, cmd="rtt", peer=peer)["rtt_ms"])
            job = f"bench-libp2p-{attempt}"
            bought = workers.call(buyer, cmd="buy", job=job, winners=winners)
            outcomes: dict[str, tuple[str, float]] = {}
            for bidder in bought["bidders"]:  # each says once: leased, or released
                said = workers.read(by_id[bidder])
                assert said["job"] == job, said
                outcomes[bidder] = (said["event"], said["at"])
            attempts.append(figures(suffix, bought, outcomes))
            for process in sellers:
                workers.call(process, cmd="idle")
    finally:
        workers.stop()
    return fastest(suffix, attempts, rtts)


def fsync_ms(directory: Path, n: int = 30) -> float:
    """The median time to write and fsync a small file in ``directory`` (the disk the libp2p
    nodes keep their stores on: every journaled market event waits for one)."""
    samples = []
    with open(directory / "fsync-probe", "wb") as probe:
        for _ in range(n):
            started = time.perf_counter()
            probe.write(b"x" * 256)
            probe.flush()
            os.fsync(probe.fileno())
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bidders", default="50,500", help="memory-transport auctions")
    parser.add_argument("--procs", type=int, default=8, help="libp2p processes (0: none)")
    parser.add_argument("--winners", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="auctions per case; the fastest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory-dir",
        type=Path,
        default=Path("/dev/shm"),
        help="where the memory-transport nodes keep their stores (the default tmp if absent)",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging("error")
    if args.worker:
        trio.run(worker, args.worker)
        return
    import meshfed.training.job  # noqa: F401  (before any clock starts)

    bidders = [int(n) for n in args.bidders.split(",") if n]
    result: dict[str, Any] = {"benchmark": "market", "cores": os.cpu_count()}
    result.update(winners=args.winners, repeats=args.repeats)
    memory_dir = args.memory_dir if args.memory_dir.is_dir() else None
    with tempfile.TemporaryDirectory(dir=memory_dir) as tmp:
        for n in bidders:
            result.update(
                trio.run(memory_case, n, args.winners, args.repeats, Path(tmp) / f"m{n}", args.seed)
            )
    with tempfile.TemporaryDirectory() as tmp:
        result["fsync_ms_disk"] = round(fsync_ms(Path(tmp)), 2)
        if args.procs:
            result.update(libp2p_case(args.procs, args.winners, args.repeats, Path(tmp), args.seed))
    top, procs = max(bidders, default=0), args.procs
    if top:
        result["rtt_ms_memory"] = result[f"rtt_ms_{top}"]
        result[f"goal_award_{top}_within_1s"] = result[f"award_ms_{top}"] <= 1000
    if procs:
        result["rtt_ms_libp2p"] = result[f"rtt_ms_libp2p_{procs}"]
        result[f"goal_libp2p_{procs}_within_20_rtts"] = result[f"award_rtts_libp2p_{procs}"] <= 20
    releases = [value for key, value in result.items() if key.startswith("release_ms_")]
    result["goal_release_within_1s"] = bool(releases) and max(releases) <= 1000
    print(json.dumps(result))


if __name__ == "__main__":
    main()
