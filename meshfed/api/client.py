"""A small client of a local node's API (the CLI's): the URL from ``<data_dir>/api.json``, the
token from ``<data_dir>/api.token``; standard library only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import MeshfedError
from .service import ADDRESS_FILE
from .token import read_token

__all__ = ["ApiClient", "ApiError"]


class ApiError(MeshfedError):
    """The API could not be reached, or refused the request (``status``, 0 if unreached)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ApiClient:
    """Requests to the node whose data directory is ``data_dir``.

    Raises:
        ApiError: no node serves an API from ``data_dir`` (no ``api.json``).
    """

    def __init__(self, data_dir: Path, *, timeout: float = 30.0) -> None:
        try:
            self.url = str(json.loads((data_dir / ADDRESS_FILE).read_text())["url"])
        except (OSError, ValueError, KeyError) as exc:
            raise ApiError(
                f"no node serves an API from {data_dir} ({exc.__class__.__name__}: {exc}); "
                "start one with `meshfed-node run` (and not `--api off`)"
            ) from None
        self._token = read_token(data_dir)
        self._timeout = timeout

    def get(self, path: str) -> Any:
        """``GET path``'s JSON."""
        return self._call("GET", path, None)

    def post(self, path: str, body: Any = None) -> Any:
        """``POST path`` (with ``body`` as JSON); the answer's JSON."""
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("detail", exc.reason)
            except ValueError:
                detail = exc.reason
            raise ApiError(f"{detail} (HTTP {exc.code})", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(f"the node's API at {self.url} does not answer: {exc}") from None
