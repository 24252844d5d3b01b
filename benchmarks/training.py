"""Decentralized training against centralized FedAvg on the same job, same run.

Prints one JSON line. The job: digits, ``--nodes`` peers (8), Dirichlet(alpha = 0.5) shards,
the 9.6k-parameter MLP, ``--rounds`` rounds of ``--epochs`` local epochs, one seed:

- ``acc_central``: FedAvg computed in this process: every round each shard trains from the
  global model with the same trainer and seeds the peers use, and the global model becomes the
  example-weighted mean (the reference);
- ``acc_secure``: the same job on ``--nodes`` OS processes over libp2p on 127.0.0.1 (the
  testnet), averaging by secure aggregation; ``gap_secure = acc_central - acc_secure``;
- ``round_s_small``: mean seconds of a whole round (local epochs + secure averaging) after the
  first, ``bytes_per_peer_round``: bytes a peer sends per round;
- ``avg_s_large``: the secure averaging phase of a round for a ~1M-parameter MLP on the same
  processes, from the moment the last peer finished its local epoch (all inputs ready, as
  when hivemind's all-reduce is timed) until each peer holds the averaged model: mean over
  nodes and the rounds after the first, ``params_large``; ``avg_span_s_large``: the same
  rounds timed by each peer from the end of its own local epoch (so including the wait for
  the slowest trainer);
- ``acc_gossip``: the same job with asynchronous push-sum gossip (plain; a tick is one local
  SGD step and one sweep of pushes; as many ticks as the rounds' local epochs take steps on
  the mean shard: ``gossip_ticks``), ``gap_gossip``, ``round_s_gossip`` (seconds per tick).

- ``acc_dp``, ``epsilon_dp``: the secure job again with example-level differential privacy
  (DP-SGD: clip 1, lr 0.5, budget epsilon 8 at delta 1e-5 per peer, each peer's noise the least
  that lasts every round; batches and noise from the OS's generator): the
  final accuracy and the largest epsilon a peer spent (``dp_rounds``: rounds it contributed to),
  for the neighbour relation ``dp_neighbour`` (add/remove one example of a peer's shard).
  ``--dp-only`` runs and prints just these.

- ``sim_round_s_200``, ``sim_cpu_s_200``, ``sim_rss_mb_200``: ``--sim-peers`` (200) peers of
  the same job in one process on the memory transport (``meshfed-node testnet --simulate``,
  secure averaging in Moshpit groups of at most ``--sim-max-group`` (8: an 8 x 5 x 5 grid for
  200)): seconds and CPU seconds (all threads) per round after the first, peak RSS of that
  process; every round runs the exact schedule (one secure run per grid axis, 3 for 200).
  ``sim_round_s_200_moshpit``, ``sim_cpu_s_200_moshpit``: the same with the ``moshpit``
  schedule (one grid axis per round, so one secure run).

Usage: python benchmarks/training.py [--nodes 8] [--rounds 10] [--epochs 1] [--quick] [--dp-only]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trio
from rich.console import Console

from meshfed.logs import configure_logging
from meshfed.testnet import run_testnet
from meshfed.training.data import load_dataset
from meshfed.training.job import local_seed
from meshfed.training.models import build
from meshfed.training.preflight import job_shards
from meshfed.training.spec import JobSpec
from meshfed.training.torch_adapter import LocalTrainer, evaluate, flatten, load_flat

DP = {"dp_mode": "sample", "dp_clip": 1.0, "dp_noise_multiplier": 0.0, "lr": 0.5, "dp_epsilon": 8.0}
LARGE = {"hidden": [1024, 960]}  # 64*1024 + 1024 + 1024*960 + 960 + 960*10 + 10 = 1.05M
#: what epsilon_dp protects (SPEC 7c, the guarantee): DP-SGD's unit is one example
NEIGHBOUR = "add/remove one example of a peer's shard (q = batch / public shard size)"


def centralized_fedavg(spec: JobSpec) -> list[float]:
    """Accuracy after each round of FedAvg over the job's shards, in this process."""
    train, test = load_dataset(spec.data.dataset, seed=spec.training.seed)
    shards = job_shards(spec, train)
    torch.manual_seed(spec.training.seed)
    model = build(spec.training.model, **spec.training.model_options)
    trainer = LocalTrainer(
        epochs=spec.training.epochs,
        batch_size=spec.training.batch_size,
        lr=spec.training.lr,
        optimizer=spec.training.optimizer,
    )
    sizes = np.array([len(s) for s in shards], dtype=np.float64)
    accuracies = []
    for number in range(spec.rounds):
        base = flatten(model)
        trained = []
        for shard in shards:
            load_flat(model, base)
            data = train.take(shard)
            trainer.train(model, data.x, data.y, seed=local_seed(spec, number))
            trained.append(flatten(model).astype(np.float64))
        average = np.average(np.stack(trained), axis=0, weights=sizes).astype(np.float32)
        load_flat(model, average)
        accuracies.append(evaluate(model, test.x, test.y)[1])
    return accuracies


def decentralized(nodes: int, *, agree: bool = True, **options: Any) -> dict[str, Any]:
    """Run the testnet quietly and return its JSON run (with ``agree``, fail unless every
    node ended with the same model; gossip only brings them close)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "run.json")
        quiet = Console(file=io.StringIO())
        # the bundled data set, cut by the job at each node: the centralized reference trains
        # on the same shards and tests on the same test set
        code = trio.run(
            lambda: run_testnet(nodes, out, limit_s=900, console=quiet, own_data=False, **options)
        )
        run: dict[str, Any] = json.loads(out.read_text())
    if code != 0 if agree else not run["finished"]:
        raise RuntimeError(f"the testnet failed: {json.dumps(run)[:2000]}")
    return run


def private(nodes: int, **options: Any) -> dict[str, Any]:
    """The job with example-level DP (:data:`DP`) on the testnet: its figures."""
    run = decentralized(nodes, **{**options, **DP})
    spent = [n["rounds"][-1] for n in run["nodes"] if n["rounds"]]
    return {
        "acc_dp": round(run["final_accuracy"], 4),
        "epsilon_dp": round(max(r["epsilon"] for r in spent), 3),
        "dp_rounds": max(sum(r["contributed"] for r in n["rounds"]) for n in run["nodes"]),
        "dp_neighbour": NEIGHBOUR,
    }


def simulated(peers: int, **options: Any) -> dict[str, Any]:
    """``meshfed-node testnet --simulate peers`` in its own process (its own peak memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "sim.json")
        command = [sys.executable, "-m", "meshfed.cli", "testnet", "--simulate", str(peers)]
        command += ["--rounds", str(options["rounds"]), "--epochs", str(options["epochs"])]
        command += ["--partition", options["partition"], "--out", str(out)]
        command += ["--max-group", str(options["max_group"])]
        command += ["--schedule", options.get("schedule", "exact")]
        subprocess.run(command, check=True, capture_output=True, timeout=1800)
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="4 nodes, 3 rounds, for tests")
    parser.add_argument("--sim-peers", type=int, default=200, help="peers of the simulation")
    parser.add_argument("--sim-max-group", type=int, default=8, help="its largest group")
    parser.add_argument("--dp-only", action="store_true", help="only the DP job's figures")
    args = parser.parse_args()
    configure_logging("error")
    nodes, rounds = (4, 3) if args.quick else (args.nodes, args.rounds)
    options: dict[str, Any] = {
        "dataset": "digits",
        "partition": "dirichlet",
        "alpha": 0.5,
        "rounds": rounds,
        "epochs": args.epochs,
        "secure": True,
    }
    if args.dp_only:
        dp = private(nodes, **options)
        print(json.dumps({"benchmark": "training", "nodes": nodes, "rounds": rounds, **dp}))
        return
    secure = decentralized(nodes, **options)
    # The reference replays the very job the testnet ran (same roster size, seed, shards).
    ran = secure["job"]
    data = {key: value for key, value in ran["data"].items() if key != "own_data"}
    job = JobSpec.from_document({**ran, "data": data})
    train, _ = load_dataset(job.data.dataset, seed=job.training.seed)
    mean_shard = statistics.mean(len(s) for s in job_shards(job, train))
    ticks = rounds * args.epochs * math.ceil(mean_shard / job.training.batch_size)  # same work
    gossip = decentralized(
        nodes,
        agree=False,
        **{**options, "secure": False, "schedule": "pushsum", "rounds": ticks, "local_steps": 1},
    )
    central = centralized_fedavg(job)
    later = [row for row in secure["rounds"] if row["round"] > 0]
    large = decentralized(nodes, **{**options, "rounds": 4, "model_options": LARGE})
    large_later = large["rounds"][1:]
    dp = private(nodes, **options)
    params_large = sum(p.numel() for p in build("mlp", **LARGE).parameters())
    sim_peers = 20 if args.quick else args.sim_peers
    sim_options = {**options, "rounds": 3, "max_group": args.sim_max_group}
    simulation = simulated(sim_peers, **sim_options)
    moshpit = simulated(sim_peers, **{**sim_options, "schedule": "moshpit"})
    figures = {
        "benchmark": "training",
        "nodes": nodes,
        "rounds": rounds,
        "params_small": sum(p.numel() for p in build("mlp").parameters()),
        "acc_central": round(central[-1], 4),
        "acc_secure": round(secure["final_accuracy"], 4),
        "gap_secure": round(central[-1] - secure["final_accuracy"], 4),
        "acc_central_by_round": [round(a, 4) for a in central],
        "acc_secure_by_round": [round(r["accuracy"], 4) for r in secure["rounds"]],
        "round_s_small": round(statistics.mean(r["seconds"] for r in later), 4),
        "avg_s_small": round(statistics.mean(r["averaging_s"] for r in later), 4),
        "bytes_per_peer_round": round(statistics.mean(r["bytes_out"] for r in later)),
        "params_large": params_large,
        "avg_s_large": round(statistics.mean(r["averaging_phase_s"] for r in large_later), 4),
        "avg_span_s_large": round(statistics.mean(r["averaging_s"] for r in large_later), 4),
        "gossip_ticks": ticks,
        "acc_gossip": round(gossip["final_accuracy"], 4),
        "gap_gossip": round(central[-1] - gossip["final_accuracy"], 4),
        "acc_gossip_by_round": [  # at the end of each round's worth of ticks
            round(r["accuracy"], 4)
            for r in gossip["rounds"][ticks // rounds - 1 :: ticks // rounds]
        ],
        "acc_gossip_spread": round(gossip["rounds"][-1]["accuracy_spread"], 4),
        "round_s_gossip": round(statistics.mean(r["seconds"] for r in gossip["rounds"][1:]), 4),
        **dp,
        "sim_peers": sim_peers,
        f"sim_round_s_{sim_peers}": round(simulation["round_s"], 3),
        f"sim_cpu_s_{sim_peers}": round(simulation["round_cpu_s"], 3),
        f"sim_rss_mb_{sim_peers}": round(simulation["peak_rss_mb"]),
        f"sim_round_s_{sim_peers}_moshpit": round(moshpit["round_s"], 3),
        f"sim_cpu_s_{sim_peers}_moshpit": round(moshpit["round_cpu_s"], 3),
        "sim_accuracy": round(simulation["final_accuracy"], 4),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
