"""The live dashboard's routes: its page and files at ``/``, its event stream at ``/events``.

Access. The page and its two files hold no node data and are open, as ``/docs`` is. The stream
follows the reads' rule (open on loopback; beyond, the token). A browser's ``EventSource``
cannot send an ``Authorization`` header, so beyond loopback the page trades the token (typed
by the operator, kept in the tab's ``sessionStorage``) for a **ticket**:
``POST /events/ticket`` with the bearer token answers a random ticket good for one
``GET /events?ticket=...`` within :data:`TICKET_TTL_S`. A ticket in a URL that leaks (a proxy's
log, a screenshot) is spent or stale; no cookie is set, so another site cannot make the
browser open the stream (no CSRF). Every answer here carries a Content-Security-Policy that
allows only this origin's own files: a peer's strings cannot run as script even if the page
had a bug.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

import trio
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from ..audit import AuditKind
from .live import LiveView

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from ..node import Node

__all__ = ["TICKET_TTL_S", "Ticket", "Tickets", "add_dashboard"]

#: how long a stream ticket is good for, and how many may be outstanding at once
TICKET_TTL_S = 30.0
MAX_TICKETS = 64

#: the dashboard's files (``static/``) and their types: nothing else is served from there
_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Ticket(BaseModel):
    """A one-use pass to open the event stream (``GET /events?ticket=...``)."""

    ticket: str
    expires_in_s: float


class Tickets:
    """Stream tickets: issued, then redeemed at most once before they expire. Sans-IO: times
    are passed in. At most ``limit`` wait; issuing one more drops the oldest."""

    def __init__(self, ttl_s: float = TICKET_TTL_S, limit: int = MAX_TICKETS) -> None:
        self._ttl_s = ttl_s
        self._limit = limit
        self._waiting: OrderedDict[str, float] = OrderedDict()

    def issue(self, now: float) -> Ticket:
        """A new ticket, good until ``now + ttl_s``."""
        ticket = secrets.token_urlsafe(24)
        self._waiting[ticket] = now + self._ttl_s
        while len(self._waiting) > self._limit:
            self._waiting.popitem(last=False)
        return Ticket(ticket=ticket, expires_in_s=self._ttl_s)

    def redeem(self, ticket: str, now: float) -> bool:
        """Whether ``ticket`` was issued, is unexpired and unused; it is used up either way."""
        found = None
        for issued in self._waiting:  # compared in constant time, each
            if hmac.compare_digest(issued.encode(), ticket.encode()):
                found = issued
        if found is None:
            return False
        return self._waiting.pop(found) >= now


def _file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def add_dashboard(
    app: FastAPI,
    node: Node,
    *,
    read: Callable[..., Coroutine[Any, Any, None]],
    write: Callable[..., Coroutine[Any, Any, None]],
) -> LiveView:
    """Add the dashboard's routes to ``app`` (``read``/``write``: the API's token checks);
    the :class:`LiveView` they show, whose ``run`` the caller starts."""
    live = LiveView(node)
    tickets = Tickets()
    pages = {name: _file(name) for name in ("index.html", *_FILES)}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(pages["index.html"], media_type="text/html; charset=utf-8",
                        headers=_HEADERS)  # fmt: skip

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in _FILES:
            raise HTTPException(404, f"no dashboard file {name!r}")
        return Response(pages[name], media_type=_FILES[name], headers=_HEADERS)

    @app.post("/events/ticket", dependencies=[Depends(write)])
    async def ticket() -> Ticket:
        """A one-use ticket for ``GET /events`` (an ``EventSource`` sends no headers), good
        for 30 s."""
        return tickets.issue(trio.current_time())

    async def stream_access(  # async: on the loop (FastAPI runs a sync one in a thread)
        request: Request,
        credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))
        ],
        ticket: Annotated[str | None, Query(max_length=64)] = None,
    ) -> None:
        if ticket is None:
            await read(request, credentials)
        elif not tickets.redeem(ticket, trio.current_time()):
            address = request.client.host if request.client is not None else "unknown"
            node.audit_trail.coalesced(AuditKind.API_REFUSED, address, "403", "wrong ticket")
            raise HTTPException(403, "the ticket is unknown, used or expired")

    @app.get("/events", include_in_schema=False, dependencies=[Depends(stream_access)])
    async def events() -> StreamingResponse:
        headers: dict[str, Any] = _HEADERS | {"X-Accel-Buffering": "no"}
        return StreamingResponse(
            live.feed.stream(live.start()), media_type="text/event-stream", headers=headers
        )

    return live
