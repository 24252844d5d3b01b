"""``meshfed-node backup`` and ``restore``: a node's data directory, saved while the node runs
and restored into a new directory (:mod:`meshfed.backup`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli_common import ConfigOpt, DataDirOpt, _load
from .errors import MeshfedError

__all__ = ["add_backup_commands"]


def add_backup_commands(app: typer.Typer) -> None:
    """Add ``backup`` and ``restore`` to ``app``."""
    app.command("backup")(backup_node)
    app.command("restore")(restore_node)


def backup_node(
    out: Annotated[
        Path,
        typer.Argument(help="Where to write the backup: NAME.tar (a tar file) or a directory."),
    ],
    with_token: Annotated[
        bool, typer.Option("--with-token", help="Also keep the API token (api.token).")
    ] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Back up a node's data directory (also while the node runs): a consistent copy of its
    store, its identity key, its saved data sets and --config's file. Keep it as secret as the
    key."""
    from .backup import backup

    cfg = _load(config, data_dir=data_dir)
    try:
        report = backup(cfg, out, config_file=config, include_token=with_token)
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    print(f"backed up {report.peer_id} to {report.path}: {', '.join(sorted(report.files))}")


def restore_node(
    source: Annotated[Path, typer.Argument(help="A backup (.tar file or directory).", exists=True)],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Restore a backup as a new data directory (--data-dir: missing or empty), once its files
    match their manifest and its store verifies under its identity's key."""
    from .backup import restore

    cfg = _load(config, data_dir=data_dir)
    try:
        report = restore(source, cfg)
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    print(f"restored {report.peer_id} into {report.path}")
    if "config.toml" in report.files:
        print(f"its configuration: {report.path / 'config.toml'} (run with --config)")
