"""What compression on the wire saves and costs, against float32 measured in the same run.

Prints one JSON line:

- ``codecs``: per codec (``fp16``, ``int8`` (chunks of 1024), ``topk`` (1 %, float32 values),
  ``topk_fp16``) on ``--elements`` (1M) normal floats: ``ratio`` (float32 bytes / payload
  bytes), ``cpu_s_per_1m`` (encode + decode, CPU seconds per million elements) and
  ``rel_error`` (``||x' - x|| / ||x||``, one round trip, no error feedback);
- ``training``: the digits MLP (9.6k parameters), ``--peers`` (8) peers in this process on the
  memory transport, Dirichlet(0.5) shards, ``--rounds`` (10) rounds, one group: per mode
  (``plain`` + ``none | fp16 | int8 | topk`` (``--topk-ratio``, 0.05), ``secure`` + ``none |
  int8`` (clip 0.25 on the update)) the mean final ``accuracy``, ``acc_gap`` (the uncompressed
  run of the same kind minus it), ``bytes_per_peer_round`` (what a peer sends per round,
  headers and signatures included) and ``bytes_ratio`` (the uncompressed run's bytes over
  these).

Usage: python benchmarks/compression.py [--elements 1000000] [--peers 8] [--rounds 10]
       [--topk-ratio 0.05] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import trio

from meshfed import NodeConfig, open_node
from meshfed.averaging.compression import Codec, Float16, Int8, TopK
from meshfed.secagg.driver import Aggregator, DeadlinePolicy
from meshfed.training.job import RoundReport, TrainingPeer
from meshfed.training.spec import AveragingSpec, JobSpec
from meshfed.transports.memory import MemoryNetwork

CODECS: dict[str, Codec] = {
    "fp16": Float16(),
    "int8": Int8(),
    "topk": TopK(0.01),
    "topk_fp16": TopK(0.01, half=True),
}
MODES = [(False, "none"), (False, "fp16"), (False, "int8"), (False, "topk"), (True, "none"),
         (True, "int8")]  # fmt: skip


def codec_figures(elements: int, repeats: int) -> dict[str, dict[str, float]]:
    """Ratio, CPU time and error of one round trip through each codec."""
    rng = np.random.default_rng(0)
    values = rng.normal(0, 1, elements).astype(np.float32)
    figures = {}
    for name, codec in CODECS.items():
        began = time.process_time()
        for _ in range(repeats):
            payload = codec.encode(values, rng)
            back = codec.decode(payload, elements)
        cpu = (time.process_time() - began) / repeats
        figures[name] = {
            "ratio": round(values.nbytes / payload.nbytes, 3),
            "cpu_s_per_1m": round(cpu * 1e6 / elements, 4),
            "rel_error": round(float(np.linalg.norm(back - values) / np.linalg.norm(values)), 5),
        }
    return figures


async def train(
    peers: int, rounds: int, *, secure: bool, compression: str, topk_ratio: float
) -> dict[str, float]:
    """One job on ``peers`` in-process nodes; the mean final accuracy and bytes a round."""
    network = MemoryNetwork(seed=1)
    deadlines = DeadlinePolicy(join_s=2.0, grace_s=0.5, phase_max_s=30.0)
    with tempfile.TemporaryDirectory() as tmp:
        async with AsyncExitStack() as stack:
            nodes = []
            for i in range(peers):
                config = NodeConfig(
                    data_dir=Path(tmp) / f"n{i}",
                    transport="memory",
                    ping_interval_s=0,
                    membership=False,
                    mdns=False,
                )
                nodes.append(await stack.enter_async_context(open_node(config, network=network)))
            spec = JobSpec(
                job_id=f"compression-{secure}-{compression}",
                roster=tuple(str(n.peer_id) for n in nodes),
                rounds=rounds,
                averaging=AveragingSpec(
                    secure=secure,
                    compression=compression,
                    clip=0.25 if secure and compression == "int8" else 8.0,
                    topk_ratio=topk_ratio,
                ),
            )
            reports: list[list[RoundReport]] = [[] for _ in nodes]
            trainers = [
                TrainingPeer(node, spec, Aggregator(node, deadlines=deadlines)) for node in nodes
            ]
            async with trio.open_nursery() as nursery:
                for i, peer in enumerate(trainers):
                    nursery.start_soon(peer.run, reports[i].append)
    sent = [r.bytes_out for peer_reports in reports for r in peer_reports]
    return {
        "accuracy": round(float(np.mean([r[-1].accuracy for r in reports])), 4),
        "bytes_per_peer_round": int(np.mean(sent)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--elements", type=int, default=1_000_000)
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--topk-ratio", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="small and short, for tests")
    args = parser.parse_args()
    if args.quick:
        args.elements, args.peers, args.rounds = 100_000, 4, 3
    figures: dict[str, Any] = {
        "elements": args.elements,
        "peers": args.peers,
        "rounds": args.rounds,
        "topk_ratio": args.topk_ratio,
    }
    figures["codecs"] = codec_figures(args.elements, 1 if args.quick else 3)
    training: dict[str, dict[str, float]] = {}
    for secure, compression in MODES:
        kind = "secure" if secure else "plain"
        job = functools.partial(
            train, args.peers, args.rounds, secure=secure, compression=compression,
            topk_ratio=args.topk_ratio,
        )  # fmt: skip
        run = trio.run(job)
        reference = training.get(f"{kind}_none", run)
        run["acc_gap"] = round(reference["accuracy"] - run["accuracy"], 4)
        sent = reference["bytes_per_peer_round"] / run["bytes_per_peer_round"]
        run["bytes_ratio"] = round(sent, 3)
        training[f"{kind}_{compression}"] = run
    figures["training"] = training
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
