"""An onion node in its own OS process, driven by JSON lines on stdin (for tests).

Usage: ``python tests/onion/onion_peer.py DATA_DIR ROLE LOG_LEVEL [BOOTSTRAP]`` (ROLE: ``relay``
or ``trainer``). Prints ``{"event": "started", "peer_id", "listen"}`` once serving. It answers
onion requests for :class:`Text` with ``echo:<text>`` (after 2 s when the text starts with
``slow``), printing ``{"event": "serving", "text"}`` first; as a sender it prints
``{"event": "path", "forward": [ids], "reply": [ids]}`` for every attempt. Commands:

- ``{"cmd": "keys"}`` -> ``{"peers": n}``: peers whose record holds onion keys
- ``{"cmd": "request", "peer", "text", "privacy", "within"}`` -> ``{"answer": text}``
- ``{"cmd": "onion_key"}`` -> ``{"epoch", "key": hex}``: this node's onion key of the epoch now
- ``{"cmd": "packet", "addr", "packet": hex}`` -> ``{"sent": peer id}``: dials ``addr`` and hands
  it the packet as the previous hop would (returns once that node took it)
- ``{"cmd": "stats"}`` -> ``node.stats.snapshot()``
- ``{"cmd": "stop"}`` -> graceful stop and exit
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

from meshfed import NodeConfig, PeerId, open_node
from meshfed.control import Text
from meshfed.logs import configure_logging
from meshfed.onion.messages import OnionPacket


def reply(document: dict[str, Any]) -> None:
    print(json.dumps(document), flush=True)


async def main(data_dir: Path, role: str, bootstrap: list[str]) -> None:
    config = NodeConfig(
        data_dir=data_dir,
        roles=[role],
        bootstrap=bootstrap,
        mdns=False,
        market=False,
        api="off",
        ping_interval_s=0,
        gossip_interval_s=0.3,
        onion_distinct_prefixes=False,  # all on 127.0.0.1 (see net.py)
    )
    async with open_node(config) as node:
        assert node.onion is not None

        async def echo(text: Text) -> Text:
            reply({"event": "serving", "text": text.text})
            if text.text.startswith("slow"):
                await trio.sleep(2)
            return Text(text=f"echo:{text.text}")

        node.onion.handle(Text, echo, direct=False)
        node.onion.path_observers.append(
            lambda forward, back: reply(
                {
                    "event": "path",
                    "forward": [str(p) for p in forward],
                    "reply": [str(p) for p in back],
                }
            )
        )
        reply({"event": "started", "peer_id": str(node.peer_id), "listen": node.listen_addrs})
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        async with trio.open_nursery() as nursery:
            while True:
                chunk = await stdin.receive_some()
                if not chunk:
                    return
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    command = json.loads(line)
                    if command["cmd"] == "stop":
                        nursery.cancel_scope.cancel()
                        return
                    nursery.start_soon(run, node, command)


async def run(node: Any, command: dict[str, Any]) -> None:
    try:
        cmd = command["cmd"]
        if cmd == "keys":
            reply({"peers": sum(bool(r.capabilities.onion_keys) for r in node.membership.peers())})
        elif cmd == "request":
            answer = await node.onion.request(
                PeerId.from_string(command["peer"]),
                Text(text=command["text"]),
                privacy=command["privacy"],
                within=command["within"],
                attempts=command.get("attempts", 3),
            )
            reply({"answer": answer.text})
        elif cmd == "onion_key":
            epoch = node.onion.schedule.epoch_at(time.time())
            reply({"epoch": epoch, "key": node.onion.ring.public_key(epoch).hex()})
        elif cmd == "packet":
            peer = await node.connect(command["addr"])
            await node.send(peer, OnionPacket(bytes.fromhex(command["packet"])))
            reply({"sent": str(peer)})
        elif cmd == "stats":
            reply(node.stats.snapshot())
        else:
            reply({"error": f"unknown command {cmd!r}"})
    except Exception as exc:  # report, keep serving: the test decides
        reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    configure_logging(sys.argv[3])
    trio.run(main, Path(sys.argv[1]), sys.argv[2], sys.argv[4:])
