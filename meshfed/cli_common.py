"""What the ``meshfed-node`` commands share: the node options and how errors are shown."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .config import NodeConfig, default_data_dir
from .errors import MeshfedError

__all__ = ["ConfigOpt", "DataDirOpt"]

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file of node settings.", exists=True)
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        "-d",
        help=f"Where the identity and the store live (default: {default_data_dir()}, "
        "i.e. $XDG_DATA_HOME/meshfed). One node per directory: it is locked while a node runs.",
        show_default=False,
    ),
]


def _load(config: Path | None, **overrides: Any) -> NodeConfig:
    try:
        return NodeConfig.load(toml_path=config, overrides=overrides)
    except MeshfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
