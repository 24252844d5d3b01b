"""Serving the API: hypercorn's trio worker in the node's nursery.

``await nursery.start(serve_api, node)`` binds ``config.api``, writes its URL to
``<data_dir>/api.json`` (for the CLI and other local tools) and returns the URL; the server
stops when the node's nursery is cancelled or ``stop`` is set, and ``api.json`` goes with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..audit import AuditKind
from ..config import api_address, api_on_loopback
from ..errors import ConfigError
from .limits import BodyLimit
from .token import TOKEN_FILE, load_or_create_token

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["ADDRESS_FILE", "serve_api"]

log = logging.getLogger(__name__)

#: where a running node's API URL is written, under its data directory
ADDRESS_FILE = "api.json"


def _write_address(path: Path, url: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "pid": os.getpid()}, f)
    os.replace(tmp, path)


async def serve_api(
    node: Node,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``node``'s API on ``node.config.api`` until cancelled or ``stop`` is set;
    ``task_status.started(url)`` once it listens.

    Raises:
        ConfigError: the address cannot be bound, or the token cannot be made or read (an API
            beyond loopback never listens without one).
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from .app import create_app

    config = node.config
    host, port = api_address(config.api)
    loopback = api_on_loopback(host)
    token, created = load_or_create_token(config.data_dir)
    if created:
        node.audit(AuditKind.API_TOKEN_CREATED, file=str(config.data_dir / TOKEN_FILE))
    api = create_app(node, token, reads_need_token=not loopback)
    app = BodyLimit(api)
    server = Config()
    server.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    server.accesslog = None
    server.errorlog = logging.getLogger("meshfed.api.server")
    server.graceful_timeout = 1.0
    server.read_timeout = 30  # a client that stops sending is dropped
    server.h2_max_concurrent_streams = 32
    server.include_server_header = False
    stop = stop or trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(api.state.live.run)  # the dashboard's state and the alerts
        try:
            binds = await nursery.start(
                lambda task_status: serve(
                    app,  # type: ignore[arg-type]  # an ASGI app; hypercorn's types are narrower
                    server,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
        except OSError as exc:
            raise ConfigError(f"api: cannot listen on {config.api}: {exc}") from None
        url = str(binds[0])
        address_file = config.data_dir / ADDRESS_FILE
        await trio.to_thread.run_sync(_write_address, address_file, url)
        log.info("api listening", extra={"url": url, "token_required_for_reads": not loopback})
        task_status.started(url)
        try:
            await stop.wait()
        finally:
            with contextlib.suppress(OSError):
                address_file.unlink()
            nursery.cancel_scope.cancel()
