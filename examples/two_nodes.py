"""Two nodes in one trio program: a signed request each way and a 4 MB array.

Run: ``.venv/bin/python examples/two_nodes.py`` (uses libp2p on 127.0.0.1 and a temporary
directory for the two identities).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import trio

from meshfed import Envelope, NodeConfig, open_node
from meshfed.arrays import ArrayHeader
from meshfed.control import Text


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # mdns=False: the example talks only to itself, whatever else runs on this host
        config_a = NodeConfig(data_dir=Path(tmp, "a"), ping_interval_s=0, mdns=False)
        config_b = NodeConfig(data_dir=Path(tmp, "b"), ping_interval_s=0, mdns=False)
        async with open_node(config_a) as a, open_node(config_b) as b:
            received = trio.Event()

            async def greet(envelope: Envelope, text: Text) -> Text:
                return Text(text=f"hello {envelope.sender.short()}, you said {text.text!r}")

            async def store(
                envelope: Envelope, header: ArrayHeader, array: npt.NDArray[np.float32]
            ) -> None:
                print(f"b got {header.name!r}: {array.shape} {array.dtype}, sum={array.sum()}")
                received.set()

            b.handle(Text, greet)
            b.on_array(store)
            peer = await a.connect(b.listen_addrs[0])
            answer = await a.request(peer, Text(text="hi"))
            assert isinstance(answer.body, Text)
            print(f"a asked b and got: {answer.body.text}")
            with trio.fail_after(30):
                await a.send_array(peer, np.ones(1_000_000, np.float32), name="weights")
                await received.wait()
            print(f"a round trip to b: {await a.ping(peer) * 1000:.2f} ms")


if __name__ == "__main__":
    trio.run(main)
