"""``meshfed-node submit training`` and ``ledger``: buying work and reading the books (``jobs``
and ``job`` ask the running node's API: :mod:`meshfed.api.cli`).

``submit training JOB_FILE --budget 50`` runs this node (its data dir, listen and bootstrap
options as ``run`` takes them) as a buyer: it waits until enough peers whose records match
the job are known, posts the job, shows the bids, the award and its clearing price, every
round paid and the end, then prints the job's statement. Run again after the buyer stopped
(the same job file, the same data dir), it follows the job it posted (the market's journal
brought it back) instead of posting it twice. ``ledger`` reads the node's store (also while
the node runs, or after it stopped: read-only, verified under the node's key).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import trio
import typer

from .cli_common import ConfigOpt, DataDirOpt, _load
from .errors import MeshfedError, leaves
from .identity import load_or_create_identity
from .logs import configure_logging
from .market.terms import MICRO, credits

if TYPE_CHECKING:
    from .config import NodeConfig
    from .market.driver import JobHandle
    from .market.order import TrainingOrder
    from .store import Store

__all__ = ["add_market_commands"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON lines on stdout.")]


def add_market_commands(app: typer.Typer) -> None:
    """Add the market's commands to ``app``."""
    submit = typer.Typer(help="Buy work from the mesh.", no_args_is_help=True)
    submit.command("training")(submit_training)
    app.add_typer(submit, name="submit")
    app.command("ledger")(show_ledger)


def submit_training(
    job: Annotated[
        Path, typer.Argument(help="Job file (TOML or JSON) without roster.", exists=True)
    ],
    budget: Annotated[float, typer.Option(help="The most to pay, in credits.")],
    tier: Annotated[str, typer.Option(help="small, medium, large or enterprise.")] = "small",
    min_peers: Annotated[int, typer.Option(help="Fewest winners (0: the tier's).")] = 0,
    max_peers: Annotated[int, typer.Option(help="Most winners (0: the tier's).")] = 0,
    bid_window: Annotated[float, typer.Option(help="Seconds to wait for bids at most.")] = 10.0,
    replicas: Annotated[
        int, typer.Option(help="Pay a round once this many winners report the same model.")
    ] = 1,
    spot_rate: Annotated[
        float, typer.Option(help="Share of rounds whose model a winner must show to be paid.")
    ] = 0.0,
    wait_peers: Annotated[
        float, typer.Option(help="Seconds to wait for enough matching peers to be known.")
    ] = 60.0,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    listen: Annotated[list[str] | None, typer.Option(help="TCP multiaddr to listen on.")] = None,
    bootstrap: Annotated[list[str] | None, typer.Option(help="Peer multiaddr to dial.")] = None,
    mdns: Annotated[bool | None, typer.Option("--mdns/--no-mdns", show_default=False)] = None,
    json_output: JsonOpt = False,
) -> None:
    """Post a training job, follow its auction and rounds, and print what it cost."""
    from .market.messages import Verification
    from .market.order import read_order
    from .market.terms import Tier

    cfg = _load(config, data_dir=data_dir, listen=listen or None, bootstrap=bootstrap or None,
                mdns=mdns)  # fmt: skip
    configure_logging(cfg.log_level, cfg.log_format)
    try:
        order = read_order(
            job, budget=round(budget * MICRO), tier=Tier(tier), min_peers=min_peers,
            max_peers=max_peers, bid_window_s=bid_window,
            verification=Verification(replicas=replicas, spot_rate=spot_rate),
        )  # fmt: skip
    except (MeshfedError, ValueError) as bad:
        typer.echo(f"error: {bad}", err=True)
        raise typer.Exit(2) from None
    try:
        ok = trio.run(_buy, cfg, order, wait_peers, json_output)
    except* MeshfedError as group:
        for leaf in leaves(group):
            typer.echo(f"error: {leaf}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(0 if ok else 1)


async def _buy(cfg: NodeConfig, order: TrainingOrder, wait_peers: float, as_json: bool) -> bool:
    from .node import open_node

    async with open_node(cfg) as node:
        market = node.market
        if market is None:
            raise MeshfedError("this node runs without the market (config market=false)")
        _say(as_json, "started", peer_id=str(node.peer_id), listen=node.listen_addrs)
        handle = market.jobs.get(order.job_id)  # posted before this node restarted: follow it
        if handle is not None:
            _say(as_json, "resumed", job_id=order.job_id, state=handle.buyer.state.value)
        else:
            with trio.move_on_after(wait_peers):
                # records come by gossip, with no event to wait on: poll them
                while len(market.matching(order).peers) < order.max_peers:  # noqa: ASYNC110
                    await trio.sleep(0.2)
            handle = await market.submit_training(order)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def cancel_on_signal() -> None:
                    async for _ in signals:
                        await handle.cancel()

                nursery.start_soon(cancel_on_signal)
                async for event in handle.watch():
                    _show(as_json, handle, event)
                nursery.cancel_scope.cancel()
        final = handle.status()
        statement = market.ledger.statement(order.job_id)
        _say(as_json, "statement", job_id=order.job_id, escrowed=statement.escrowed,
             released=statement.released,
             paid={str(peer): amount for peer, amount in statement.paid.items()})  # fmt: skip
        return final["error"] is None


def _say(as_json: bool, event: str, **fields: Any) -> None:
    if as_json:
        print(json.dumps({"event": event, **fields}), flush=True)
    elif event == "started":
        print(f"buyer {fields['peer_id']}", flush=True)
    elif event == "statement":
        paid = fields["paid"]
        print(
            f"job {fields['job_id']}: escrowed {credits(fields['escrowed'])}, paid "
            f"{credits(sum(paid.values()))} to {len(paid)} peers, released "
            f"{credits(fields['released'])}",
            flush=True,
        )
        for peer, amount in sorted(paid.items()):
            print(f"  {peer}: {credits(amount)}", flush=True)


def _show(as_json: bool, handle: JobHandle, event: dict[str, Any]) -> None:
    """One line per event of the job (the live view)."""
    if as_json:
        print(json.dumps({"job_id": handle.job_id, **event}), flush=True)
        return
    kind = event["event"]
    text = {
        "rfq": lambda e: (
            f"asked {len(e['asked'])} peers for quotes (estimate {credits(e['estimate'])} credits)"
        ),
        "bid": lambda e: f"bid from {e['peer'][-8:]}: {credits(e['price'])} per round",
        "decline": lambda e: f"{e['peer'][-8:]} declined: {e['reason']}",
        "award": lambda e: (
            f"awarded {e['peer'][-8:]} {e['units']} rounds at "
            f"{credits(e['price'])} (escrow {credits(e['escrowed'])})"
        ),
        "started": lambda e: f"roster of {len(e['roster'])} accepted: training starts",
        "round": lambda e: f"round {e['unit']} by {e['seller'][-8:]}: paid {credits(e['amount'])}",
        "status": lambda e: (
            f"roster at round {e['round']}"
            f"/{e['rounds']}" + ("" if e["accuracy"] is None else f", accuracy {e['accuracy']:.3f}")
        ),
        "failed": lambda e: f"{e['peer'][-8:]} failed at round {e['round']}: replacing it",
        "refused": lambda e: f"round {e['unit']} of {e['peer'][-8:]} not paid: {e['reason']}",
        "roster": lambda e: (
            f"roster v{e['version']} from round {e['from_round']} sent to {e['to'][-8:]}"
        ),
        "receipt": lambda e: (
            f"receipt from {e['peer'][-8:]}: {credits(e['amount'])} for {e['units']} rounds"
        ),
        "model": lambda e: (
            f"model of round {e['round']} delivered ({e['agreed']} winners agree, sha256 "
            f"{e['digest'][:16]}...)"
            if e["delivered"]
            else f"no model delivered: {e['offers']} offers, none {e['quorum']} agree on"
        ),
        "ended": lambda e: (
            f"job ended: {e['reason']}, paid {credits(e['paid'])}"
            + (f" ({e['error']})" if e["error"] else "")
        ),
    }.get(kind)
    if text is not None:
        print(f"{handle.job_id}: {text(event)}", flush=True)


# -- reading the books ---------------------------------------------------------------------------


def _open_store(config: Path | None, data_dir: Path | None) -> Store:
    from .node import STORE_KEY_PURPOSE
    from .store import Store

    cfg = _load(config, data_dir=data_dir)
    if cfg.store_path is None:
        typer.echo("error: this node has no store (store_file is empty)", err=True)
        raise typer.Exit(2)
    try:
        identity = load_or_create_identity(cfg.data_dir)
        return Store.open(cfg.store_path, key=identity.derive_key(STORE_KEY_PURPOSE), readonly=True)
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def show_ledger(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, json_output: JsonOpt = False
) -> None:
    """The node's accounts (credits available, in escrow, paid and earned per job)."""
    from .market.ledger import Ledger

    with _open_store(config, data_dir) as store:
        accounts = Ledger(store).accounts()
    if json_output:
        print(json.dumps(accounts))
        return
    for account, balance in sorted(accounts.items()):
        print(f"{account}: {credits(balance)}")
