"""A meshfed node in its own OS process, driven by JSON lines on stdin (for tests).

Usage: ``python tests/procs/peer.py DATA_DIR``. Prints ``{"event": "started", ...}`` once
serving, then answers each command line with one JSON line:

- ``{"cmd": "connect", "addr": A}`` -> ``{"peer": id}``
- ``{"cmd": "request", "peer": P, "text": T}`` -> ``{"answer": text}`` (signed Text both ways)
- ``{"cmd": "send_array", "peer": P, "n": N, "seed": S}`` -> ``{"sha256": hex, "seconds": s}``
- ``{"cmd": "received"}`` -> ``{"arrays": [{"name", "sender", "nbytes", "sha256"}...]}``
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

        node.handle(Text, echo)
        node.on_array(store)

        def reply(document: dict[str, Any]) -> None:
            print(json.dumps(document), flush=True)

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
                    reply(await run(node, command, received))
                except Exception as exc:  # report, keep serving: the test decides
                    reply({"error": f"{type(exc).__name__}: {exc}"})


async def run(node: Any, command: dict[str, Any], received: list[dict[str, Any]]) -> dict[str, Any]:
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
    if cmd == "status":
        return node.status()
    raise ValueError(f"unknown command {cmd!r}")


if __name__ == "__main__":
    configure_logging("warning")
    trio.run(main, Path(sys.argv[1]))
