"""Structured logging: ``key=value`` text or one JSON object per line.

Log calls pass structure through ``extra``::

    log.info("peer connected", extra={"peer": peer.short(), "rtt_ms": 0.8})

and both formats print every extra field. ``configure_logging`` is for programs (the CLI);
a library user keeps their own logging setup and still gets meshfed's (and libp2p's) records.
"""

from __future__ import annotations

import json
import logging
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


def configure_logging(
    level: str = "info", fmt: Literal["text", "json"] = "text", stream: TextIO | None = None
) -> None:
    """Send meshfed's and libp2p's records to ``stream`` (stderr) in the chosen format.

    libp2p is noisy at ``info``; it is held at ``warning`` unless ``level`` is ``debug``.
    dp-accounting (through absl) warns for every Renyi order whose series does not converge
    while it computes epsilon; it drops those orders and its epsilon stays an upper bound, so
    absl is held at ``error`` unless ``level`` is ``debug``.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("libp2p").setLevel("DEBUG" if level == "debug" else "WARNING")
    logging.getLogger("absl").setLevel("DEBUG" if level == "debug" else "ERROR")
