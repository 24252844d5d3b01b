"""Structured logging: ``key=value`` text or one JSON object per line.

Log calls pass structure through ``extra``::

    log.info("peer connected", extra={"peer": peer.short(), "rtt_ms": 0.8})

and both formats print every extra field. ``configure_logging`` is for programs (the CLI);
a library user keeps their own logging setup and still gets meshfed's (and libp2p's) records.

Third-party libraries (py-libp2p, multiaddr, zeroconf, absl) log their internals: at debug,
an idle node printed ~1,800 of their lines in 25 s. ``configure_logging`` shows their records
from WARNING up whatever meshfed's level, unless asked (``libs=`` or ``MESHFED_LOG_LIBS``);
py-libp2p's auto-connector (off in meshfed, yet it logs its dial plans at INFO) only from
ERROR up. What a normal departure or a node's own shutdown makes py-libp2p say at ERROR or
with a traceback (a closed stream in the middle of a handshake, a refused TCP dial, a task
scheduled on its stopped swarm) is demoted to DEBUG: meshfed reports the same event in its own
words (a peer unreachable, declared dead).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Literal, TextIO

__all__ = ["configure_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
        line += record.getMessage() + (f"  {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        document.update(_extras(record))
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


#: loggers of third-party libraries, held at ``libs`` level (WARNING unless asked)
LIBRARIES = ("libp2p", "multiaddr", "zeroconf", "absl", "async_service")
#: the least level shown of a library's records, unless ``libs`` asks for less
_LIBRARY_FLOOR = {"absl": logging.ERROR, "libp2p.network.auto_connector": logging.ERROR}
#: what py-libp2p logs when a peer leaves normally or our own node stops (message starts)
_DEPARTURES = (
    "MultiselectClient handshake",
    "Failed to open TCP stream",
    "Failed to open stream to peer",
    "[ADDCONN_FAIL]",
)
_SHUTDOWN_ERRORS = {"Cancelled", "LifecycleError"}


def _library(name: str) -> str | None:
    """The library a logger belongs to (``None`` for ours and the application's)."""
    root = name.split(".", 1)[0]
    return root if root in LIBRARIES else None


def _departure(record: logging.LogRecord) -> bool:
    kind = record.exc_info[0] if record.exc_info else None
    if kind is not None and kind.__name__ in _SHUTDOWN_ERRORS:
        return True
    message = record.getMessage()
    return message.startswith(_DEPARTURES) or "LifecycleError" in message


class _LibraryFilter(logging.Filter):
    """Holds third-party records to their level, and demotes departure noise to DEBUG."""

    def __init__(self, level: int, *, explicit: bool) -> None:
        super().__init__()
        self.level = level
        self.explicit = explicit

    def filter(self, record: logging.LogRecord) -> bool:
        if _library(record.name) is None:
            return True
        if record.levelno > logging.DEBUG and _departure(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            if self.level > logging.DEBUG:
                return False
        floor = self.level
        if not self.explicit:
            for name, least in _LIBRARY_FLOOR.items():
                if record.name == name or record.name.startswith(name + "."):
                    floor = max(floor, least)
        return record.levelno >= floor


def configure_logging(
    level: str = "info",
    fmt: Literal["text", "json"] = "text",
    stream: TextIO | None = None,
    *,
    libs: str | None = None,
) -> None:
    """Send meshfed's and the libraries' records to ``stream`` (stderr) in the chosen format.

    ``level`` is meshfed's (and the application's). ``libs`` is the libraries' (default: the
    environment's ``MESHFED_LOG_LIBS``, else ``warning``); left unset, absl (dp-accounting
    warns for every Renyi order whose series does not converge; it drops those orders and its
    epsilon stays an upper bound) and py-libp2p's auto-connector show only errors.
    """
    chosen = libs or os.environ.get("MESHFED_LOG_LIBS") or None
    libs_level = logging.getLevelName((chosen or "warning").upper())
    if not isinstance(libs_level, int):
        raise ValueError(f"unknown log level for libraries: {chosen!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.addFilter(_LibraryFilter(libs_level, explicit=chosen is not None))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for library in LIBRARIES:  # records below the level are not even made
        logging.getLogger(library).setLevel(libs_level)
