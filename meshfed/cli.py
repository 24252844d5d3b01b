"""``meshfed-node``: run a node, show its identity, start a local testnet."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import trio
import typer

from .api.cli import add_api_commands
from .cli_backup import add_backup_commands
from .cli_common import ConfigOpt, DataDirOpt, _load
from .cli_market import add_market_commands
from .config import NodeConfig
from .errors import MeshfedError, leaves
from .heap import freeze_imports, settle
from .identity import load_or_create_identity
from .logs import configure_logging
from .node import Node, open_node

if TYPE_CHECKING:
    from .training.spec import JobSpec

__all__ = ["app", "main"]


log = logging.getLogger(__name__)

app = typer.Typer(
    help="meshfed: a peer-to-peer federated learning node.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def run(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    listen: Annotated[
        list[str] | None,
        typer.Option(help="TCP multiaddr to listen on: /ip4/<address>/tcp/<port> (repeatable)."),
    ] = None,
    bootstrap: Annotated[
        list[str] | None, typer.Option(help="Peer multiaddr with /p2p/<id> to dial (repeatable).")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json.")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON lines on stdout (started, status, stopped).")
    ] = False,
    status_interval: Annotated[
        float, typer.Option(help="Print the node's status every N seconds (0: never).")
    ] = 0.0,
    roster_wait: Annotated[
        float,
        typer.Option(help="With --job: how long to wait for every roster peer to connect."),
    ] = 120.0,
    mdns: Annotated[
        bool | None,
        typer.Option(
            "--mdns/--no-mdns",
            help="Find peers on the LAN by mDNS (default: on).",
            show_default=False,
        ),
    ] = None,
    api: Annotated[
        str | None,
        typer.Option(
            help="Serve the REST API on <host>:<port> (port 0: any free one, written to "
            "<data-dir>/api.json), or off. Default: 127.0.0.1:0.",
            show_default=False,
        ),
    ] = None,
    job: Annotated[
        Path | None,
        typer.Option(
            help="Take part in the training job described in this file (JSON, or TOML by its "
            ".toml suffix; examples/job.toml lists every field). A bad field stops the start; "
            "a job that fails later is reported (job_failed) and the node serves on."
        ),
    ] = None,
) -> None:
    """Start a node and serve until Ctrl-C or SIGTERM; prints its peer id and addresses."""
    cfg = _load(
        config,
        data_dir=data_dir,
        listen=listen or None,
        bootstrap=bootstrap or None,
        log_level=log_level,
        log_format=log_format,
        mdns=mdns,
        api=api,
    )
    configure_logging(cfg.log_level, cfg.log_format)
    spec = None if job is None else _load_job(job)
    try:
        trio.run(_run, cfg, json_output, status_interval, spec, roster_wait)
    except* MeshfedError as group:  # also from inside open_node's nursery
        for exc in leaves(group):
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _load_job(path: Path) -> JobSpec:
    """The job file's job; a bad field, or no training here, exits (2) before the node
    starts, saying which."""
    from .training.extra import require_training
    from .training.spec import JobSpec

    try:
        require_training(f"the job in {path}")
        return JobSpec.from_file(path)
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _emit(json_output: bool, event: str, document: dict[str, Any]) -> None:
    if json_output:
        print(json.dumps({"event": event, **document}), flush=True)
    elif event == "started":
        print(f"peer id: {document['peer_id']}", flush=True)
        for addr in document["listen"]:
            print(f"listening on: {addr}", flush=True)
        if document.get("api"):
            print(f"api: {document['api']} (docs at /docs)", flush=True)
    elif event == "stopped":
        print("stopped", flush=True)
    elif event == "round":
        decision = document.get("decision", "continue")
        if decision == "rollback":
            decision = f"rolled back to round {document['rolled_back_to'] + 1}"
        print(  # rounds count from 1 on screen (JSON: from 0)
            f"round {document['round'] + 1}: accuracy {document['accuracy']:.3f}, "
            f"loss {document['loss']:.3f}, {document['seconds']:.2f} s"
            + ("" if decision == "continue" else f", {decision}"),
            flush=True,
        )
    elif event == "job_failed":
        print(f"job {document['job_id']} failed: {document['error']}", flush=True)
    elif event == "waiting":
        missing = document["missing"]
        print(
            f"job {document['job_id']}: waiting {document['waited_s']:.0f} s for "
            f"{len(missing)} roster peer(s): {', '.join(missing)}",
            flush=True,
        )
    elif event == "job_done":
        print(
            f"job {document['job_id']} {document['state']} ({document['note']}): "
            f"accuracy {document['accuracy']:.3f}",
            flush=True,
        )


async def _train(node: Node, spec: JobSpec, json_output: bool, roster_wait: float) -> None:
    """Take part in ``spec`` (:func:`~meshfed.training.participation.take_part`), printing
    its events."""
    from .training.participation import take_part

    await take_part(node, spec, functools.partial(_emit, json_output), roster_wait=roster_wait)


async def _run(
    cfg: NodeConfig,
    json_output: bool,
    status_interval: float,
    job: JobSpec | None = None,
    roster_wait: float = 120.0,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(cfg) as node:
            settle()  # what starting the node imported (py-libp2p, the API) is there for good
            started = {"peer_id": str(node.peer_id), "listen": node.listen_addrs}
            _emit(json_output, "started", {**started, "api": node.api_url})
            async with trio.open_nursery() as nursery:

                async def report() -> None:
                    while True:
                        await trio.sleep(status_interval)
                        _emit(True, "status", node.status())

                if status_interval > 0:
                    nursery.start_soon(report)
                if node.market is not None:  # the work it leases, reported as a job's
                    node.market.observers.append(functools.partial(_emit, json_output))
                if job is not None:
                    nursery.start_soon(_train, node, job, json_output, roster_wait)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel(reason="signal received")
            final = node.status()
    _emit(json_output, "stopped", final)


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    mdns: Annotated[bool | None, typer.Option("--mdns/--no-mdns", show_default=False)] = None,
) -> None:
    """Print the effective configuration as TOML: defaults, then --config, then MESHFED_*
    variables, then these flags (the output is a valid --config file)."""
    print(_load(config, data_dir=data_dir, mdns=mdns).to_toml(), end="")


@app.command("id")
def show_id(data_dir: DataDirOpt = None, config: ConfigOpt = None) -> None:
    """Show the node's peer id (creating the identity on first use)."""
    cfg = _load(config, data_dir=data_dir)
    try:
        identity = load_or_create_identity(cfg.data_dir)
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    print(identity.peer_id)


data_app = typer.Typer(
    help="The node's own data sets: registered here, advertised by name and shape, trained on "
    "where they are (their content never leaves the node). Stop the node first: it reads its "
    "data sets when it starts.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


def _label_column(text: str | None) -> str | int | None:
    """A column index if ``text`` is a whole number, else a header name."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


@data_app.command("add")
def data_add(
    name: Annotated[str, typer.Argument(help="What jobs call the data set.")],
    path: Annotated[Path, typer.Argument(help="A .npz file (arrays x and y) or a .csv file.")],
    label_column: Annotated[
        str | None,
        typer.Option(
            help="CSV: the label column, by header name or index (a number; negative counts "
            "from the end). Default: the column named label, else the last."
        ),
    ] = None,
    classes: Annotated[
        int | None,
        typer.Option(help="How many label values (default: the largest label + 1).", min=1),
    ] = None,
    replace: Annotated[
        bool, typer.Option(help="Register again under a name already taken (a changed file).")
    ] = False,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Check a data file and register it; a file with a problem is refused, naming it."""
    from .data.registry import open_registry

    cfg = _load(config, data_dir=data_dir)
    try:
        with open_registry(cfg) as registry:
            record = registry.register(
                name, path, label_column=_label_column(label_column), classes=classes,
                replace=replace,
            )  # fmt: skip
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    shape = "x".join(map(str, record.feature_shape))
    print(
        f"registered {record.name}: {record.examples} examples of {shape} features, "
        f"{record.classes} classes, from {record.path}"
    )


@data_app.command("list")
def data_list(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The registered data sets: name, examples, feature shape, classes, file."""
    from .data.registry import open_registry

    cfg = _load(config, data_dir=data_dir)
    try:
        with open_registry(cfg) as registry:
            records = registry.list()
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for r in records:
        if json_output:
            document = {
                "name": r.name, "examples": r.examples, "feature_shape": list(r.feature_shape),
                "classes": r.classes, "format": r.format, "path": r.path,
                "sha256": r.digest.hex(), "label_digest": r.label_digest.hex(),
            }  # fmt: skip
            print(json.dumps(document))
        else:
            shape = "x".join(map(str, r.feature_shape))
            print(f"{r.name}\t{r.examples} examples\t{shape}\t{r.classes} classes\t{r.path}")


@data_app.command("remove")
def data_remove(
    name: Annotated[str, typer.Argument(help="The data set to forget.")],
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Forget a data set (its file stays, unless the node saved it from arrays)."""
    from .data.registry import open_registry

    cfg = _load(config, data_dir=data_dir)
    try:
        with open_registry(cfg) as registry:
            registry.remove(name)
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    print(f"removed {name}")


@app.command()
def testnet(
    nodes: Annotated[int, typer.Option(help="How many node processes to start.", min=2)] = 4,
    rounds: Annotated[int, typer.Option(help="Training rounds.", min=1)] = 10,
    secure: Annotated[
        bool, typer.Option("--secure/--plain", help="Secure aggregation, or plain averaging.")
    ] = True,
    model: Annotated[
        str,
        typer.Option(
            help="Model name: mlp, cnn, resnet, mobilenet (these fit digits' 8x8 images), "
            "cifar_cnn (3x32x32 images: not digits)."
        ),
    ] = "mlp",
    dataset: Annotated[str, typer.Option(help="digits or synthetic.")] = "digits",
    partition: Annotated[str, typer.Option(help="iid, dirichlet or quantity.")] = "dirichlet",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (non-IID-ness).")] = 0.5,
    epochs: Annotated[int, typer.Option(help="Local epochs per round.", min=1)] = 1,
    local_steps: Annotated[
        int, typer.Option(help="Minibatch steps per round instead of epochs (0: epochs).", min=0)
    ] = 0,
    algorithm: Annotated[str, typer.Option(help="fedavg, fedprox, fedavgm, fedadam ...")] = (
        "fedavg"
    ),
    schedule: Annotated[
        str, typer.Option(help="exact (same model each round), moshpit, or pushsum (gossip).")
    ] = "exact",
    compression: Annotated[
        str,
        typer.Option(help="none, fp16, int8 or topk (plain); secure: none or int8."),
    ] = "none",
    topk_ratio: Annotated[float, typer.Option(help="Share of the update topk sends.")] = 0.01,
    clip: Annotated[
        float | None,
        typer.Option(
            help="Secure quantization range: models (default 8), or with --compression int8 "
            "the update (default 0.25)."
        ),
    ] = None,
    dp_clip: Annotated[
        float, typer.Option(help="Differential privacy: clip to this L2 norm (0: off).")
    ] = 0.0,
    dp_mode: Annotated[
        str, typer.Option(help="update (peer-level DP-FedAvg) or sample (DP-SGD per example).")
    ] = "update",
    dp_noise: Annotated[float, typer.Option(help="DP noise multiplier.")] = 1.0,
    dp_epsilon: Annotated[float, typer.Option(help="Each node's DP budget (delta 1e-5).")] = 8.0,
    target_accuracy: Annotated[
        float, typer.Option(help="Stop once the test accuracy reaches this (0: off).")
    ] = 0.0,
    patience: Annotated[
        int, typer.Option(help="Stop after this many rounds without improvement (0: off).")
    ] = 0,
    max_group: Annotated[
        int, typer.Option(help="Largest averaging group (the grid of groups gets more axes).")
    ] = 32,
    simulate: Annotated[
        int,
        typer.Option(
            help="Run this many peers in one process on the memory transport. digits (1,437 "
            "training examples) feeds about 290 peers at --alpha 0.5 (more with iid); many "
            "peers mean small shards, one SGD step a round: add --epochs or --local-steps."
        ),
    ] = 0,
    hire: Annotated[
        int, typer.Option(help="The buyer hires this many of the nodes (0: all).", min=0)
    ] = 0,
    kill: Annotated[
        int,
        typer.Option(
            help="Chaos: SIGKILL this many winners mid-job (replaced, or the rest go on)."
        ),
    ] = 0,
    kill_at_round: Annotated[int, typer.Option(help="...once every winner reached it.")] = 1,
    revive: Annotated[
        bool,
        typer.Option(help="Start the killed winners again after the job, to settle."),
    ] = False,
    pause_buyer: Annotated[
        int,
        typer.Option(help="Chaos: SIGKILL the buyer after this round, restart it 2 rounds later."),
    ] = 0,
    budget: Annotated[
        float, typer.Option(help="What the buyer may pay for the job, in credits.")
    ] = 5.0,
    limit: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600.0,
    out: Annotated[Path, typer.Option(help="Where to write the run as JSON.")] = Path(
        "testnet-run.json"
    ),
) -> None:
    """Start N node processes on 127.0.0.1 and a buyer that hires them, by auction, to train
    one model together; live."""
    from .training.extra import require_training

    try:
        require_training("a testnet")
    except MeshfedError as missing:
        typer.echo(f"error: {missing}", err=True)
        raise typer.Exit(2) from None
    from .testnet import run_testnet

    configure_logging("warning")
    options: dict[str, Any] = {
        "rounds": rounds,
        "secure": secure,
        "model": model,
        "dataset": dataset,
        "partition": partition,
        "alpha": alpha,
        "epochs": epochs,
        "local_steps": local_steps,
        "algorithm": algorithm,
        "schedule": schedule,
        "compression": compression,
        "topk_ratio": topk_ratio,
        "dp_clip": dp_clip,
        "dp_mode": dp_mode,
        "dp_noise_multiplier": dp_noise,
        "dp_epsilon": dp_epsilon,
        "target_accuracy": target_accuracy,
        "patience": patience,
        "max_group": max_group,
    }
    if clip is not None or (secure and compression == "int8"):
        options["clip"] = 0.25 if clip is None else clip
    try:
        if simulate:
            from .simulation import run_simulation

            sys.exit(trio.run(functools.partial(run_simulation, simulate, out, **options)))
        if not 0 <= kill <= (hire or nodes) - 2:
            raise typer.BadParameter("--kill must leave at least 2 winners")
        if hire > nodes:
            raise typer.BadParameter(f"--hire {hire}: there are {nodes} nodes")
        run = functools.partial(
            run_testnet, nodes, out, limit_s=limit, kill=kill, kill_at_round=kill_at_round,
            hire=hire, pause_buyer_at=pause_buyer, revive=revive, budget=budget,
        )  # fmt: skip
        code = trio.run(functools.partial(run, **options))
    except* MeshfedError as group:  # also from inside the simulation's nurseries
        for exc in leaves(group):
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    sys.exit(code)


def main() -> NoReturn:
    """Entry point of the ``meshfed-node`` script.

    A command that ended leaves at once, with its exit code: by then its node has stopped,
    its store is closed and its output is flushed, and the interpreter's own teardown (freeing
    every module py-libp2p imports) costs ~1 s of CPU a process, more on a loaded machine:
    eight nodes stopping together on two cores took over 15 s. What the command imports is
    kept out of the garbage collector's walks (:func:`.heap.freeze_imports`)."""
    freeze_imports()
    try:
        app()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    logging.shutdown()
    if isinstance(code, str):  # a message instead of a number: what sys.exit prints
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to flush to
            stream.flush()
    os._exit(code or 0)


add_market_commands(app)  # submit training, ledger
add_api_commands(app)  # status, peers, jobs, job, cancel, budget, audit
add_backup_commands(app)  # backup, restore

if __name__ == "__main__":
    main()
