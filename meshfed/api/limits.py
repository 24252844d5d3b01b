"""An ASGI wrapper that refuses large request bodies before the app reads them: FastAPI reads
a body before it checks the token, so an unauthenticated client could otherwise make the node
buffer whatever it sends."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["MAX_BODY_BYTES", "BodyLimit"]

#: the largest request body taken (a training job's fields fit many times over)
MAX_BODY_BYTES = 1 << 20

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """``app`` behind a body limit: a body must declare its ``Content-Length`` (411) and
    it must be at most ``max_bytes`` (413); the app never sees more than declared."""

    def __init__(self, app: App, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" in headers:
            await _refuse(send, 411, "a request body needs a Content-Length")
        elif length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _refuse(send, 413, f"a request body has at most {self.max_bytes} bytes")
        else:
            await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
