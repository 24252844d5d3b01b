"""Honest requests between two libp2p nodes, calm and while a third process floods one of them.

Prints one JSON line:

- ``honest_rps_calm``: signed request/answer pairs per second from an honest node (this
  process, ``--workers`` concurrent requesters) to the target node (its own OS process) over
  libp2p on 127.0.0.1, nobody else talking;
- ``honest_rps_flooded``: the same while ``tests/procs/hostile.py --flood`` (a third process)
  floods the target: ~200 unauthenticated sealed-port connections held open, each sent a
  13-byte header claiming 2 GiB (a quarter with a replayed session id first), authenticated
  stream connections whose first header claims 1 GiB, junk envelopes (malformed, forged,
  stale, replayed, oversized), SWIM pings of 64 updates and Cyclon shuffles of fresh signed
  records; ``flood_ratio = flooded / calm``;
- ``flood_rss_mb``: the target's peak RSS over the whole run; ``flood``: what the flooder's
  requests met, by kind; ``target_rejected``: the target's reject counters afterwards;
- ``cpu_s``: CPU seconds (user + system) each process used in each phase (``calm``,
  ``flooded``: ``target``, ``honest``, ``flooder``), to tell the target's own work from the
  CPU the flooder takes from the two nodes on a small machine.

With ``FLOOD_PROFILE=FILE`` the target runs cProfile during the flooded phase and
writes its ``pstats`` to FILE (read it with ``python -m pstats FILE``).

Goal (security review): ``honest_rps_flooded >= 0.5 x honest_rps_calm``, ``flood_rss_mb <
500``.

Usage: python benchmarks/flood.py [--seconds 20] [--workers 8]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from meshfed import Envelope, NodeConfig, PeerId, open_node
from meshfed.control import Text
from meshfed.errors import RequestFailed

ROOT = Path(__file__).resolve().parents[1]


def _config(data_dir: Path) -> NodeConfig:
    return NodeConfig.load(
        overrides={
            "data_dir": data_dir,
            "listen": ["/ip4/127.0.0.1/tcp/0"],
            "mdns": False,
            "ping_interval_s": 0.0,
        }
    )


# -- the target process --------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def serve(data_dir: Path) -> None:
    """Serve echo requests. Each stdin line is a command answered with one JSON line:
    ``status`` (peak RSS and reject counters), ``profile`` (start cProfile if
    ``FLOOD_PROFILE`` names a file), ``unprofile`` (stop it, write the file)."""
    profile_to = os.environ.get("FLOOD_PROFILE")
    profiler = cProfile.Profile()
    async with open_node(_config(data_dir)) as node:

        async def echo(envelope: Envelope, text: Text) -> Text:
            return text

        node.handle(Text, echo)
        print(json.dumps({"addr": node.listen_addrs[0]}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        lines = b""
        while data := await stdin.receive_some():
            lines += data
            while b"\n" in lines:
                command, lines = lines.split(b"\n", 1)
                if command == b"profile" and profile_to:
                    profiler.enable()
                elif command == b"unprofile" and profile_to:
                    profiler.disable()
                    profiler.dump_stats(profile_to)
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                rejected = {str(k): v for k, v in node.stats.rejected.items()}
                print(json.dumps({"rss_mb": peak, "rejected": rejected}), flush=True)


# -- the measuring process -----------------------------------------------------------------------


async def honest_rps(node: Any, target: PeerId, seconds: float, workers: int) -> float:
    """Answered requests per second; a request refused as rate_limited (the target's
    per-peer bucket, ``requests_per_second``) is not counted and its worker pauses 10 ms."""
    done = 0

    async def worker(n: int) -> None:
        nonlocal done
        while True:
            try:
                await node.request(target, Text(text=f"honest {n}"))
                done += 1
            except RequestFailed as exc:
                if exc.reason != "rate_limited":
                    raise
                await trio.sleep(0.01)

    started = time.perf_counter()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for n in range(workers):
                nursery.start_soon(worker, n)
    return done / (time.perf_counter() - started)


def _line(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    while True:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"{process.args!r} ended ({process.wait()})")
        if line.startswith("{"):
            document: dict[str, Any] = json.loads(line)
            return document


def _start_flooder(addr: str, seconds: float, only: list[str]) -> subprocess.Popen[str]:
    hostile = ROOT / "tests" / "procs" / "hostile.py"
    kinds = ["--only", *only] if only else []
    return subprocess.Popen(
        [sys.executable, str(hostile), addr, "--flood", str(seconds), *kinds],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _command(server: subprocess.Popen[str], command: str) -> dict[str, Any]:
    assert server.stdin is not None
    server.stdin.write(command + "\n")
    server.stdin.flush()
    return _line(server)


class _Clocks:
    """CPU seconds of a phase, per process (``None`` for this one)."""

    def __init__(self, processes: dict[str, int | None]) -> None:
        self.processes = processes
        self.started = {name: self._now(pid) for name, pid in processes.items()}

    @staticmethod
    def _now(pid: int | None) -> float:
        return _cpu_s(os.getpid() if pid is None else pid)

    def spent(self) -> dict[str, float]:
        return {
            name: round(self._now(pid) - self.started[name], 2)
            for name, pid in self.processes.items()
        }


async def measure(
    server: subprocess.Popen[str],
    addr: str,
    root: Path,
    seconds: float,
    workers: int,
    only: list[str],
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    async with open_node(_config(root / "honest")) as node:
        target = await node.connect(addr)
        await honest_rps(node, target, 2, workers)  # warm-up
        clocks = _Clocks({"target": server.pid, "honest": None})
        result["honest_rps_calm"] = round(await honest_rps(node, target, seconds, workers), 1)
        result["cpu_s"] = {"calm": clocks.spent()}
        flooder = _start_flooder(addr, seconds + 4, only)
        try:
            assert (await trio.to_thread.run_sync(_line, flooder))["event"] == "flooding"
            await trio.sleep(2)  # let it build up
            await trio.to_thread.run_sync(_command, server, "profile")
            clocks = _Clocks({"target": server.pid, "honest": None, "flooder": flooder.pid})
            flooded = await honest_rps(node, target, seconds, workers)
            result["cpu_s"]["flooded"] = clocks.spent()
            await trio.to_thread.run_sync(_command, server, "unprofile")
            result["honest_rps_flooded"] = round(flooded, 1)
            result["flood"] = (await trio.to_thread.run_sync(_line, flooder))["flood"]
        finally:
            flooder.kill()
            flooder.wait()
    result["flood_ratio"] = round(result["honest_rps_flooded"] / result["honest_rps_calm"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase (calm, flooded)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent honest requesters")
    parser.add_argument("--only", nargs="*", default=[], help="flood kinds (default: all)")
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.serve)
        return
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(Path(tmp) / "target")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            addr = _line(server)["addr"]
            result = trio.run(
                measure, server, addr, Path(tmp), args.seconds, args.workers, args.only
            )
            status = _command(server, "status")
            result["flood_rss_mb"] = round(status["rss_mb"], 1)
            result["target_rejected"] = status["rejected"]
            result["target_alive"] = server.poll() is None
        finally:
            server.kill()
            server.wait()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
