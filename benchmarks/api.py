"""What serving the REST API and the dashboard costs.

1. ``GET /status`` and ``GET /metrics`` against a running node (a ``meshfed-node run`` process
   on 127.0.0.1, idle: no testnet trains meanwhile): ``status_rps`` (requests per second,
   ``--clients`` keep-alive clients at once), ``status_p99_ms`` and ``metrics_p99_ms`` (one
   client, requests one after another). The same while a node trains, as an operator runs it
   (after part 2): four ``meshfed-node run`` processes (one torch thread each, as the testnet
   starts them) win part 2's job from a buyer in this process. The first of them, and the
   client processes that ask it, have a core to themselves (``sched_setaffinity``; the other
   three trainers share the rest: as if it had a machine of its own and its peers were
   elsewhere; ``trainer_has_a_core``). A client asks it ``GET /status`` one request after
   another for ``--phase-s`` seconds before the job is posted (``status_p99_ms_before_training``:
   the reference, the same node on the same core not training), and again once it has
   trained ``--phase-s`` seconds (``status_p99_ms_training``, ``status_requests_training``,
   ``rounds_polled_training``: the rounds it reported meanwhile;
   ``status_p99_training_over_before``), then another asks ``GET /metrics``
   (``metrics_p99_ms_training``). Goal: ``status_p99_ms`` < 20, idle and training
   (``goal_status_p99_ms_below_20`` is the worse of the two). What this benchmark measured
   before, a trainer among part 2's five nodes, all in this one process (one event loop and
   one GIL: a request waits for the other four nodes' work too), is kept as
   ``status_p99_ms_training_inprocess`` and ``metrics_p99_ms_training_inprocess`` (asked after
   part 2's phases; ``rounds_polled_training_inprocess``: rounds per trainer meanwhile), with
   ``status_p99_training_inprocess_over_process``.
2. A training round with and without the dashboard watching, in one run: a 4-node testnet on
   libp2p (127.0.0.1; four nodes train one small job, a fifth buys it, in this process) trains
   a warm-up phase, then ``--phases`` phases of ``--phase-s`` seconds, unwatched and watched
   in the order idle, watched, watched, idle (so that a slow drift cancels); while
   watched, another process holds a dashboard stream (``GET /events``) open to each training
   node. ``round_s_idle`` and ``round_s_watched``: the median round time the training nodes
   reported in each kind of phase (rounds that ended in a phase's first 0.3 s, while streams
   open or close, are left out); goal: watched within 5 % of idle.

3. An idle core node: ``meshfed-node run`` (defaults: the API on, on loopback) in a process
   where torch, scikit-learn and dp-accounting cannot be imported (as in an install without
   the ``train`` extra: the node would fail, not load them). ``startup_s_core``: process start
   to its libp2p port accepting a TCP connection; ``ready_s_core``: to its ``started`` line
   (every service up, the API's URL known); ``idle_rss_mb_core``: its resident memory once idle
   (medians of ``--runs`` starts). Next to it, in the same run: the same node with ``--api
   off`` (``idle_rss_mb_core_api_off``), the same node with torch imported at its start
   (``idle_rss_mb_torch``: what an eager import of training cost every node), and the floor
   py-libp2p sets: a bare interpreter (``rss_mb_python``) and one that imports ``libp2p``
   and nothing else (``rss_mb_libp2p``, ``import_s_libp2p``). Goals: ``idle_rss_mb_core``
   < 80, ``startup_s_core`` < 1.5.

Prints one JSON line. ``--core-only`` runs part 3 alone.

Usage: python benchmarks/api.py [--requests N] [--clients C] [--phases P] [--phase-s S]
       [--runs R] [--core-only]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

ROOT = Path(__file__).resolve().parents[1]
JOB = {"dataset": "digits", "partition": "iid", "local_steps": 2, "rounds": 5000}
SETTLE_S = 0.3  # the start of a phase left out: streams open or close meanwhile
IDLE_S = 2.0  # how long a started node idles before its memory is read

#: a dashboard client in its own process (as a browser is): on "on" it opens a stream to each
#: URL and reads it to nowhere; on anything else every stream closes within 50 ms
WATCHER = """
import socket, sys, threading, urllib.parse
stop = threading.Event()
def watch(url, stop):
    where = urllib.parse.urlsplit(url)
    with socket.create_connection((where.hostname, where.port)) as s:
        s.sendall(b"GET /events HTTP/1.1\\r\\nHost: node\\r\\n\\r\\n")
        s.settimeout(0.05)
        while not stop.is_set():
            try:
                if not s.recv(65536):
                    return
            except TimeoutError:
                pass
for line in sys.stdin:
    stop.set()
    if line.strip() == "on":
        stop = threading.Event()
        for url in sys.argv[1:]:
            threading.Thread(target=watch, args=(url, stop), daemon=True).start()
"""

#: an API client in its own process: on "go" it asks ``GET <path>`` of the URL, one request
#: after another on one connection, until "stop"; then prints the p99 latency in ms and exits
POLLER = """
import http.client, sys, threading, time, urllib.parse
where = urllib.parse.urlsplit(sys.argv[1])
stop, times = threading.Event(), []
def poll():
    connection = http.client.HTTPConnection(where.hostname, where.port)
    while not stop.is_set():
        started = time.perf_counter()
        connection.request("GET", sys.argv[2])
        connection.getresponse().read()
        times.append(time.perf_counter() - started)
sys.stdin.readline()
worker = threading.Thread(target=poll)
worker.start()
sys.stdin.readline()
stop.set()
worker.join()
times.sort()
print(round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 3), len(times), flush=True)
"""


def _p99_ms(client: httpx.Client, path: str, requests: int) -> float:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        client.get(path).raise_for_status()
        times.append(time.perf_counter() - started)
    times.sort()
    return round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 3)


def _rps(url: str, requests: int, clients: int) -> float:
    def work() -> None:
        with httpx.Client(base_url=url) as client:
            for _ in range(requests // clients):
                client.get("/status").raise_for_status()

    threads = [threading.Thread(target=work) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return round(requests // clients * clients / (time.perf_counter() - started), 1)


async def _round_times(
    phases: int, phase_s: float, root: Path
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Round seconds the training nodes reported, by phase kind (``idle``, ``watched``); and,
    in a last phase, the p99 latency of ``GET /status`` and ``GET /metrics`` asked of a
    training node meanwhile (each by a client process of its own), with how many were
    asked."""
    from meshfed.testing import open_memory_mesh

    times: dict[str, list[float]] = {"idle": [], "watched": [], "warm-up": [], "polled": []}
    phase: dict[str, Any] = {"kind": "idle", "since": 0.0}
    trained = trio.Event()

    def observe(event: str, document: dict[str, Any]) -> None:
        if event != "round":
            return
        trained.set()
        if trio.current_time() - phase["since"] > SETTLE_S:
            times[phase["kind"]].append(float(document["seconds"]))

    async with open_memory_mesh(
        5, root, transport="libp2p", listen=["/ip4/127.0.0.1/tcp/0"], membership=True,
        gossip_interval_s=0.2, market_capacity=1,
    ) as nodes:  # fmt: skip
        buyer, trainers = nodes[0], nodes[1:]
        for node in trainers:
            await node.connect(buyer.listen_addrs[0])
        with trio.fail_after(60):
            while any(len([r for r in n.peers() if r.capabilities.prices]) < 4 for n in nodes):  # noqa: ASYNC110  # records come by gossip: no event
                await trio.sleep(0.1)
        for node in trainers:
            assert node.market is not None
            node.market.observers.append(observe)
        urls = [str(node.api_url) for node in trainers]
        watcher = await trio.lowlevel.open_process(
            [sys.executable, "-c", WATCHER, *urls], stdin=subprocess.PIPE
        )
        assert watcher.stdin is not None
        handle = await buyer.submit_training(
            {**JOB, "job_id": "round-time"}, budget=500, min_peers=4, max_peers=4
        )
        polled: dict[str, float] = {}
        try:
            with trio.fail_after(120):
                await trained.wait()  # the job started
            phase.update(kind="warm-up")
            await trio.sleep(phase_s)  # its first rounds are slower: not counted
            for index in range(phases):  # idle, watched, watched, idle, ...: drift cancels
                kind = ("idle", "watched", "watched", "idle")[index % 4]
                await watcher.stdin.send_all(b"on\n" if kind == "watched" else b"off\n")
                phase.update(kind=kind, since=trio.current_time())
                await trio.sleep(phase_s)
            await watcher.stdin.send_all(b"off\n")
            phase.update(kind="polled", since=trio.current_time())
            polled = await _poll_while_training(urls[0], phase_s, "training_inprocess")
            polled["rounds_polled_training_inprocess"] = len(times["polled"]) // len(trainers)
        finally:
            await handle.cancel()
            await watcher.stdin.aclose()
            with trio.fail_after(10):
                await watcher.wait()
    return times, polled


async def _poll_while_training(
    url: str,
    seconds: float,
    label: str = "training",
    paths: tuple[str, ...] = ("/status", "/metrics"),
    **process: Any,
) -> dict[str, float]:
    """``GET /status`` and ``GET /metrics`` (``paths``) of a node, for ``seconds`` each, one
    request after another from a client process: the p99 latency of each and how many were
    asked, as ``status_p99_ms_{label}``, ``status_requests_{label}``, ... (``process``: more
    arguments of the client's :func:`trio.lowlevel.open_process`)."""
    polled: dict[str, float] = {}
    for path in paths:
        poller = await trio.lowlevel.open_process(
            [sys.executable, "-c", POLLER, url, path], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, **process,
        )  # fmt: skip
        assert poller.stdin is not None and poller.stdout is not None
        await poller.stdin.send_all(b"go\n")
        await trio.sleep(seconds)
        await poller.stdin.send_all(b"stop\n")
        with trio.fail_after(10):
            answer = b""
            while not answer.endswith(b"\n"):
                answer += await poller.stdout.receive_some()
            await poller.wait()
        p99, count = answer.split()
        name = path.strip("/")
        polled[f"{name}_p99_ms_{label}"] = float(p99)
        polled[f"{name}_requests_{label}"] = int(count)
    return polled


#: a trainer as an operator runs it: ``meshfed-node run`` in a process of its own (as the
#: testnet starts its nodes: one torch thread each, since they share this machine's cores)
TRAINER_ENV = {
    "MESHFED_PING_INTERVAL_S": "0",
    "MESHFED_GOSSIP_INTERVAL_S": "0.2",
    "MESHFED_LOG_LEVEL": "warning",
    "OMP_NUM_THREADS": "1",
}


class _NodeProcess:
    """A ``meshfed-node run --json`` process and what its lines said: its ``started`` line,
    and when (trio time) each ``round`` line came."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.started: dict[str, Any] = {}
        self.ready = trio.Event()
        self.rounds: list[float] = []
        self.trained = trio.Event()

    async def read(self) -> None:
        from meshfed.testnet import json_lines

        assert self.process.stdout is not None
        async for document in json_lines(self.process.stdout):
            if document.get("event") == "started":
                self.started = document
                self.ready.set()
            elif document.get("event") == "round":
                self.rounds.append(trio.current_time())
                self.trained.set()


def _cores() -> tuple[set[int], set[int]] | None:
    """This process's cores, split into one for the trainer asked (and its client) and the
    rest; None with fewer than two (nothing is pinned then)."""
    cores = sorted(os.sched_getaffinity(0))
    return ({cores[-1]}, set(cores[:-1])) if len(cores) >= 2 else None


async def _poll_trainer_process(phase_s: float, root: Path, trainers: int = 4) -> dict[str, Any]:
    """Part 1, a node per process: ``trainers`` ``meshfed-node run`` processes, bootstrapping
    off a buyer in this process, win the same job as part 2. The first of them and its
    clients have a core to themselves, the other trainers share the rest (as on a machine of
    its own, its peers elsewhere). A client process asks it ``GET /status`` one request after
    another for ``phase_s`` seconds before the job is posted (the reference: the same node,
    process and core, not training), and again once it has trained ``phase_s`` seconds; then
    another asks ``GET /metrics``. Also the rounds it reported while its ``/status`` was asked
    (``rounds_polled_training``: it was training)."""
    from meshfed.testing import open_memory_mesh

    env = {**os.environ, "PYTHONPATH": str(ROOT), **TRAINER_ENV}
    cores = _cores()

    def on(index: int) -> dict[str, Any]:
        """Where process ``index`` runs (0: the trainer asked; -1: its clients)."""
        if cores is None:
            return {}
        return {"preexec_fn": functools.partial(os.sched_setaffinity, 0, cores[index > 0])}

    async with open_memory_mesh(
        1, root, transport="libp2p", listen=["/ip4/127.0.0.1/tcp/0"], membership=True,
        gossip_interval_s=0.2, market_capacity=1,
    ) as (buyer,), trio.open_nursery() as nursery:  # fmt: skip
        nodes: list[_NodeProcess] = []
        try:
            for index in range(trainers):
                command = [
                    sys.executable, "-m", "meshfed.cli", "run", "--json", "--no-mdns",
                    "--data-dir", str(root / f"node-{index}"),
                    "--bootstrap", buyer.listen_addrs[0],
                ]  # fmt: skip
                process = await trio.lowlevel.open_process(
                    command, stdout=subprocess.PIPE, env=env, **on(index)
                )
                nodes.append(_NodeProcess(process))
                nursery.start_soon(nodes[-1].read)
            with trio.fail_after(120):
                for node in nodes:
                    await node.ready.wait()
                while len([r for r in buyer.peers() if r.capabilities.prices]) < trainers:  # noqa: ASYNC110  # records come by gossip: no event
                    await trio.sleep(0.1)
            trainer = nodes[0]
            url = trainer.started["api"]
            polled: dict[str, Any] = {"trainer_has_a_core": cores is not None}
            polled |= await _poll_while_training(
                url, phase_s, "before_training", ("/status",), **on(-1)
            )
            handle = await buyer.submit_training(
                {**JOB, "job_id": "status-process"}, budget=500, min_peers=trainers,
                max_peers=trainers,
            )  # fmt: skip
            try:
                with trio.fail_after(120):
                    await trainer.trained.wait()  # the job started
                await trio.sleep(phase_s)  # its first rounds are slower: not measured
                before = len(trainer.rounds)
                polled |= await _poll_while_training(url, phase_s, paths=("/status",), **on(-1))
                polled["rounds_polled_training"] = len(trainer.rounds) - before
                polled |= await _poll_while_training(url, phase_s, paths=("/metrics",), **on(-1))
            finally:
                with trio.move_on_after(30) as cleanup:
                    cleanup.shield = True
                    await handle.cancel()
        finally:
            for node in nodes:
                if node.process.returncode is None:
                    node.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(30) as cleanup:
                cleanup.shield = True
                for node in nodes:
                    await node.process.wait()
            for node in nodes:
                if node.process.returncode is None:
                    node.process.kill()
    return polled


#: a node without the train extra: these modules cannot be imported (nor found) in it
CORE_NODE = """
import sys
for name in ("torch", "sklearn", "dp_accounting"):
    sys.modules[name] = None
if sys.argv[1] == "torch":
    del sys.modules["torch"]
    import torch
from meshfed.cli import main
sys.argv[0:2] = ["meshfed-node"]
main()
"""

#: a bare interpreter, or one that imports libp2p: prints its import time, then waits
FLOOR = """
import sys, time
started = time.perf_counter()
for name in sys.argv[1:]:
    __import__(name)
print(time.perf_counter() - started, flush=True)
sys.stdin.read()
"""


def _rss_mb(pid: int) -> float:
    rss: int = psutil.Process(pid).memory_info().rss
    return round(rss / 2**20, 1)


def _core_node(data_dir: str, *args: str, torch: bool = False) -> dict[str, float]:
    """Start a node without the train extra (``torch``: with torch imported first); the
    seconds to its libp2p port accepting and to its ``started`` line, and its idle RSS."""
    from meshfed.testing import free_port

    port = free_port()
    command = [
        sys.executable, "-c", CORE_NODE, "torch" if torch else "core", "run", "--json",
        "--no-mdns", "--data-dir", data_dir, "--log-level", "error",
        "--listen", f"/ip4/127.0.0.1/tcp/{port}", *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    node = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if node.poll() is not None or time.perf_counter() - started > 60:
                    raise RuntimeError("the node did not listen") from None
                time.sleep(0.002)
        listening = time.perf_counter() - started
        assert node.stdout is not None
        json.loads(node.stdout.readline())  # started
        ready = time.perf_counter() - started
        time.sleep(IDLE_S)
        return {"startup_s": listening, "ready_s": ready, "rss_mb": _rss_mb(node.pid)}
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=30)


def _floor(*modules: str) -> tuple[float, float]:
    """A bare interpreter importing ``modules``: seconds taken, and its RSS then."""
    process = subprocess.Popen(
        [sys.executable, "-c", FLOOR, *modules], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        seconds = float(process.stdout.readline())
        return seconds, _rss_mb(process.pid)
    finally:
        process.communicate("")


def core_figures(runs: int) -> dict[str, Any]:
    """Part 3: the idle core node beside its references (medians of ``runs``)."""
    samples: dict[str, list[dict[str, float]]] = {"core": [], "api_off": [], "torch": []}
    for _ in range(runs):  # interleaved: a slow spell of the machine hits every kind
        for kind in samples:
            with tempfile.TemporaryDirectory() as data_dir:
                args = ("--api", "off") if kind == "api_off" else ()
                samples[kind].append(_core_node(data_dir, *args, torch=kind == "torch"))
    floors = [(_floor(), _floor("libp2p")) for _ in range(runs)]

    def median(kind: str, key: str) -> float:
        return round(statistics.median(s[key] for s in samples[kind]), 3)

    rss, startup = median("core", "rss_mb"), median("core", "startup_s")
    return {
        "idle_rss_mb_core": rss,
        "startup_s_core": startup,
        "ready_s_core": median("core", "ready_s"),
        "idle_rss_mb_core_api_off": median("api_off", "rss_mb"),
        "ready_s_core_api_off": median("api_off", "ready_s"),
        "idle_rss_mb_torch": median("torch", "rss_mb"),
        "rss_mb_python": statistics.median(bare[1] for bare, _ in floors),
        "rss_mb_libp2p": statistics.median(libp2p[1] for _, libp2p in floors),
        "import_s_libp2p": round(statistics.median(libp2p[0] for _, libp2p in floors), 3),
        "core_runs": runs,
        "goal_idle_rss_core_below_80mb": rss < 80,
        "goal_startup_core_below_1_5s": startup < 1.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--phases", type=int, default=32)
    parser.add_argument("--phase-s", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3, help="Starts of each core node kind.")
    parser.add_argument("--core-only", action="store_true", help="Part 3 alone.")
    args = parser.parse_args()
    core = core_figures(args.runs)
    if args.core_only:
        print(json.dumps(core))
        return
    with tempfile.TemporaryDirectory() as data_dir:
        command = [
            sys.executable,
            "-m",
            "meshfed.cli",
            "run",
            "--json",
            "--no-mdns",
            "--data-dir",
            data_dir,
            "--log-level",
            "warning",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        node = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert node.stdout is not None
            url = json.loads(node.stdout.readline())["api"]
            with httpx.Client(base_url=url) as client:
                _p99_ms(client, "/status", 100)  # warm up
                status_p99 = _p99_ms(client, "/status", args.requests)
                metrics_p99 = _p99_ms(client, "/metrics", args.requests // 2)
            rps = _rps(url, args.requests, args.clients)
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=30)
    with tempfile.TemporaryDirectory() as root:
        times, inprocess = trio.run(_round_times, args.phases, args.phase_s, Path(root))
    with tempfile.TemporaryDirectory() as root:
        polled = trio.run(_poll_trainer_process, args.phase_s, Path(root))
    idle, watched = (statistics.median(times[k]) for k in ("idle", "watched"))
    status_training = polled["status_p99_ms_training"]
    print(
        json.dumps(
            {
                "status_rps": rps,
                "status_p99_ms": status_p99,
                "metrics_p99_ms": metrics_p99,
                "requests": args.requests,
                "clients": args.clients,
                **polled,
                **inprocess,
                "status_p99_training_over_before": round(
                    status_training / polled["status_p99_ms_before_training"], 2
                ),
                "status_p99_training_inprocess_over_process": round(
                    inprocess["status_p99_ms_training_inprocess"] / status_training, 2
                ),
                "goal_status_p99_ms_below_20": max(status_p99, status_training) < 20,
                "round_s_idle": round(idle, 4),
                "round_s_watched": round(watched, 4),
                "rounds_idle": len(times["idle"]),
                "rounds_watched": len(times["watched"]),
                "round_watched_over_idle": round(watched / idle, 3),
                "goal_round_watched_within_5pct": watched <= idle * 1.05,
                **core,
            }
        )
    )


if __name__ == "__main__":
    main()
