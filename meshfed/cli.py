"""``meshfed-node``: run a node, show its identity, start a local testnet."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from .config import NodeConfig
from .errors import MeshfedError
from .identity import load_or_create_identity
from .logs import configure_logging
from .node import open_node

__all__ = ["app", "main"]

app = typer.Typer(
    help="meshfed: a peer-to-peer federated learning node.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file of node settings.", exists=True)
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", "-d", help="Where the identity lives.")
]


def _load(config: Path | None, **overrides: Any) -> NodeConfig:
    try:
        return NodeConfig.load(toml_path=config, overrides=overrides)
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    listen: Annotated[
        list[str] | None, typer.Option(help="Multiaddr to listen on (repeatable).")
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
) -> None:
    """Start a node and serve until Ctrl-C or SIGTERM; prints its peer id and addresses."""
    cfg = _load(
        config,
        data_dir=data_dir,
        listen=listen or None,
        bootstrap=bootstrap or None,
        log_level=log_level,
        log_format=log_format,
    )
    configure_logging(cfg.log_level, cfg.log_format)
    try:
        trio.run(_run, cfg, json_output, status_interval)
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _emit(json_output: bool, event: str, document: dict[str, Any]) -> None:
    if json_output:
        print(json.dumps({"event": event, **document}), flush=True)
    elif event == "started":
        print(f"peer id: {document['peer_id']}", flush=True)
        for addr in document["listen"]:
            print(f"listening on: {addr}", flush=True)
    elif event == "stopped":
        print("stopped", flush=True)


async def _run(cfg: NodeConfig, json_output: bool, status_interval: float) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(cfg) as node:
            _emit(
                json_output, "started", {"peer_id": str(node.peer_id), "listen": node.listen_addrs}
            )
            async with trio.open_nursery() as nursery:

                async def report() -> None:
                    while True:
                        await trio.sleep(status_interval)
                        _emit(True, "status", node.status())

                if status_interval > 0:
                    nursery.start_soon(report)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel(reason="signal received")
            final = node.status()
    _emit(json_output, "stopped", final)


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


@app.command()
def testnet(
    nodes: Annotated[int, typer.Option(help="How many node processes to start.", min=2)] = 4,
    seconds: Annotated[float, typer.Option(help="How long to run.", min=1)] = 15.0,
    out: Annotated[Path, typer.Option(help="Where to write the JSON summary.")] = Path(
        "testnet-run.json"
    ),
) -> None:
    """Start a local mesh of node processes on 127.0.0.1 and show them talking."""
    from .testnet import run_testnet

    configure_logging("warning")
    sys.exit(trio.run(run_testnet, nodes, seconds, out))


def main() -> None:
    """Entry point of the ``meshfed-node`` script."""
    app()


if __name__ == "__main__":
    main()
