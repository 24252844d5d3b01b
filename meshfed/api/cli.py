"""The operator's commands over the local node's API: ``status``, ``peers``, ``jobs``, ``job``,
``cancel``, ``budget`` and ``audit``; rich tables by default, ``--json`` for scripts.

They need the node running (its API is the one way in: the answers come from the node's own
state, not from a second reader of its files); ``meshfed-node ledger`` reads a stopped node's
store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cli_common import ConfigOpt, DataDirOpt, _load
from ..errors import MeshfedError
from ..market.terms import credits
from .client import ApiClient, ApiError

__all__ = ["add_api_commands"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def add_api_commands(app: typer.Typer) -> None:
    """Add the commands that talk to the running node's API to ``app``."""
    for name, command in (
        ("status", show_status),
        ("peers", list_peers),
        ("jobs", list_jobs),
        ("job", show_job),
        ("cancel", cancel_job),
        ("budget", show_budget),
        ("audit", show_audit),
    ):
        app.command(name)(command)


def _call(config: Path | None, data_dir: Path | None, how: Callable[[ApiClient], Any]) -> Any:
    cfg = _load(config, data_dir=data_dir)
    try:
        return how(ApiClient(cfg.data_dir))
    except ApiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except MeshfedError as exc:  # the token file: missing, loose or wrong
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console  # only to print a table: not for `run`
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("-" if value is None else str(value) for value in row))
    Console().print(table)


def show_status(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, json_output: JsonOpt = False
) -> None:
    """The running node at a glance."""
    status = _call(config, data_dir, lambda api: api.get("/status"))
    if json_output:
        print(json.dumps(status))
        return
    stats = status["stats"]
    rows = [
        ("peer id", status["peer_id"]),
        ("listening", ", ".join(status["listen"])),
        ("uptime", f"{status['uptime_s']:.0f} s"),
        ("connected / members", f"{status['connected']} / {status['members']}"),
        ("jobs running", status["jobs_running"]),
        ("accepted", sum(stats["accepted"].values())),
        ("rejected", ", ".join(f"{k} {v}" for k, v in stats["rejected"].items()) or 0),
    ]
    _table("node", ("", ""), rows)


def list_peers(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, json_output: JsonOpt = False
) -> None:
    """The peers whose records the node holds, and membership's verdict on each."""
    peers = _call(config, data_dir, lambda api: api.get("/peers"))
    if json_output:
        print(json.dumps(peers))
        return
    rows = [
        (
            p["peer_id"],
            p["state"],
            ",".join(p["roles"]),
            p["battery_pct"],
            p["rtt_ms"],
            ",".join(p["datasets"]),
        )
        for p in peers
    ]
    _table("peers", ("peer", "state", "roles", "battery %", "rtt ms", "data sets"), rows)


def list_jobs(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, json_output: JsonOpt = False
) -> None:
    """The jobs this node bought or worked on, with their leases."""
    jobs = _call(config, data_dir, lambda api: api.get("/jobs"))
    if json_output:
        print(json.dumps(jobs))
        return
    rows = [
        (j["job_id"], j["role"], j["leases"], "/".join(j["lease_states"]) or None, j["training"])
        for j in jobs
    ]
    _table("jobs", ("job", "role", "leases", "lease states", "training"), rows)


def show_job(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """One job: its leases, what was paid or earned, and the rounds this node trained."""
    job = _call(config, data_dir, lambda api: api.get(f"/jobs/{_quoted(job_id)}"))
    if json_output:
        print(json.dumps(job))
        return
    leases = [
        (
            lease["role"],
            lease["peer"],
            lease["units"],
            credits(lease["price_micro"]),
            lease["state"],
        )
        for lease in job["leases"]
    ]
    _table(f"job {job_id}: leases", ("role", "peer", "units", "price", "state"), leases)
    money = [
        (side, peer, credits(amount))
        for side in ("paid", "earned", "forfeited")
        for peer, amount in job["statement"][f"{side}_micro"].items()
    ]
    statement = job["statement"]
    money += [
        ("escrowed", "", credits(statement["escrowed_micro"])),
        ("released", "", credits(statement["released_micro"])),
    ]
    _table("money", ("", "peer", "credits"), money)
    rounds = [(r["round"] + 1, r.get("accuracy"), r.get("loss")) for r in job["rounds"]]
    if rounds:
        _table("rounds", ("round", "accuracy", "loss"), rounds)


def cancel_job(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """End a job this node bought: the escrow's rest comes back, every lease settles."""
    done = _call(config, data_dir, lambda api: api.post(f"/jobs/{_quoted(job_id)}/cancel"))
    print(json.dumps(done) if json_output else f"job {job_id} cancelled")


def show_budget(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, json_output: JsonOpt = False
) -> None:
    """The privacy budget spent by each job this node trained with differential privacy."""
    budgets = _call(config, data_dir, lambda api: api.get("/budget"))
    if json_output:
        print(json.dumps(budgets))
        return
    rows = [
        (
            b["job_id"],
            f"{b['spent_epsilon']:.3f}",
            f"{b['budget_epsilon']:g}",
            f"{b['delta']:g}",
            b["rounds_charged"],
        )
        for b in budgets
    ]
    _table("privacy budgets", ("job", "epsilon spent", "budget", "delta", "rounds"), rows)


def show_audit(
    kind: Annotated[str | None, typer.Option(help="Only entries of this kind.")] = None,
    after: Annotated[int, typer.Option(help="Only entries after this seq.", min=0)] = 0,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1, max=1000)] = 100,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """The node's audit log: security-relevant events, oldest first."""
    query = f"/audit?after={after}&limit={limit}" + (
        "" if kind is None else f"&kind={_quoted(kind)}"
    )
    entries = _call(config, data_dir, lambda api: api.get(query))
    if json_output:
        print(json.dumps(entries))
        return
    rows = [
        (
            e["seq"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])),
            e["kind"],
            " ".join(f"{k}={v}" for k, v in sorted(e["fields"].items())),
        )
        for e in entries
    ]
    _table("audit log", ("seq", "at", "kind", "fields"), rows)


def _quoted(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
