"""A meshfed node in its own OS process, driven by JSON lines on stdin (for tests).

Usage: ``python tests/procs/peer.py DATA_DIR``. Prints ``{"event": "started", ...}`` once
serving, then answers each command line with one JSON line:

- ``{"cmd": "connect", "addr": A}`` -> ``{"peer": id}``
- ``{"cmd": "request", "peer": P, "text": T}`` -> ``{"answer": text}`` (signed Text both ways)
- ``{"cmd": "send_array", "peer": P, "n": N, "seed": S}`` -> ``{"sha256": hex, "seconds": s}``
- ``{"cmd": "received"}`` -> ``{"arrays": [{"name", "sender", "nbytes", "sha256"}...]}``
- ``{"cmd": "secure_mean", "roster": [ids], "seeds": {id: seed}, "n": N, "threshold": t}``
  -> ``{"survivors": [ids], "attempts": k, "max_error": e, "sha256": hex}`` (the mean of
  ``make_array(n, seed)`` over the survivors; ``max_error`` against the exact mean), printing
  ``{"event": "phase", "phase": name, "attempt": a}`` at every step on the way
- ``{"cmd": "status"}`` -> the node's status
- ``{"cmd": "stop"}`` -> leaves the node (graceful stop) and exits

Any failure answers ``{"error": "..."}`` and the process keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import trio

from meshfed import Envelope, NodeConfig, PeerId, open_node
from meshfed.arrays import ArrayHeader
from meshfed.control import Text
from meshfed.logs import configure_logging
from meshfed.secagg.driver import Aggregator
from meshfed.secagg.protocol import GroupSpec, Progress
from meshfed.secagg.ring import Quantizer


def make_array(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


async def main(data_dir: Path) -> None:
    config = NodeConfig.load(
        overrides={"data_dir": data_dir, "ping_interval_s": 0.0, "mdns": False}
    )
    received: list[dict[str, Any]] = []
    async with open_node(config) as node:

        async def echo(envelope: Envelope, text: Text) -> Text:
            return Text(text=f"echo:{text.text}")

        async def store(envelope: Envelope, header: ArrayHeader, array: np.ndarray) -> None:
            received.append(
                {
                    "name": header.name,
                    "sender": str(envelope.sender),
                    "nbytes": array.nbytes,
                    "sha256": digest(array),
                }
            )

        def reply(document: dict[str, Any]) -> None:
            print(json.dumps(document), flush=True)

        def on_progress(progress: Progress) -> None:
            reply({"event": "phase", "phase": progress.phase, "attempt": progress.step[0]})

        node.handle(Text, echo)
        node.on_array(store)
        aggregator = Aggregator(node, on_progress=on_progress)

        reply({"event": "started", "peer_id": str(node.peer_id), "listen": node.listen_addrs})
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
                if command["cmd"] == "stop":
                    return
                try:
                    reply(await run(node, aggregator, command, received))
                except Exception as exc:  # report, keep serving: the test decides
                    reply({"error": f"{type(exc).__name__}: {exc}"})


async def run(
    node: Any, aggregator: Aggregator, command: dict[str, Any], received: list[dict[str, Any]]
) -> dict[str, Any]:
    cmd = command["cmd"]
    if cmd == "connect":
        return {"peer": str(await node.connect(command["addr"]))}
    if cmd == "request":
        answer = await node.request(PeerId.from_string(command["peer"]), Text(text=command["text"]))
        return {"answer": answer.body.text}
    if cmd == "send_array":
        array = make_array(command["n"], command["seed"])
        started = trio.current_time()
        with trio.fail_after(120):
            await node.send_array(
                PeerId.from_string(command["peer"]), array, name=f"seed-{command['seed']}"
            )
        return {"sha256": digest(array), "seconds": trio.current_time() - started}
    if cmd == "received":
        return {"arrays": received}
    if cmd == "secure_mean":
        return await secure_mean(node.peer_id, aggregator, command)
    if cmd == "status":
        return node.status()
    raise ValueError(f"unknown command {cmd!r}")


async def secure_mean(
    me: PeerId, aggregator: Aggregator, command: dict[str, Any]
) -> dict[str, Any]:
    roster = tuple(PeerId.from_string(text) for text in command["roster"])
    seeds = {PeerId.from_string(k): v for k, v in command["seeds"].items()}
    spec = GroupSpec(job=b"procs", round=1, group=0, roster=roster, threshold=command["threshold"])
    quantizer = Quantizer(clip=6.0, levels_bits=20, ring_bits=32)
    values = make_array(command["n"], seeds[me])
    rng = np.random.default_rng(seeds[me])
    result = await aggregator.secure_mean(spec, values, quantizer, rng=rng)
    exact = np.zeros(command["n"], np.float64)
    for peer in result.survivors:
        exact += np.clip(make_array(command["n"], seeds[peer]), -6, 6)
    exact /= len(result.survivors)
    return {
        "survivors": [str(peer) for peer in result.survivors],
        "attempts": result.attempts,
        "max_error": float(np.max(np.abs(result.value - exact))),
        "sha256": digest(result.value),
    }


if __name__ == "__main__":
    configure_logging("warning")
    trio.run(main, Path(sys.argv[1]))
