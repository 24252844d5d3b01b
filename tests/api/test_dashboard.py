"""The dashboard's page, files and event stream over HTTP: what is open, what needs the token
or a ticket, what the stream carries, and how it treats a slow client."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import trio

from meshfed.api.dashboard import Tickets
from meshfed.api.stream import Feed, frame
from meshfed.audit import AuditLog

from .nodes import api_node, bearer


async def events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """The server-sent events of a streamed response, as (event, data)."""
    kind = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind is not None:
            yield kind, json.loads(line[6:])


async def test_the_page_and_its_files_are_served_with_a_strict_policy(tmp_path: Path) -> None:
    async with api_node(tmp_path) as (_, client):
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            answer = await client.get(f"/dashboard/{name}")
            assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
        for other in ("index.html", "..%2Fapi.token", "..%2F..%2Fstore.py", "nothing.js"):
            assert (await client.get(f"/dashboard/{other}")).status_code == 404, other


def test_the_page_loads_nothing_from_elsewhere_and_sets_no_html_from_data() -> None:
    static = resources.files("meshfed.api").joinpath("static")
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        text = static.joinpath(name).read_text()
        # the one absolute URL is SVG's namespace, a name and no request
        assert re.findall(r"https?://[^\s\"']+", text) in ([], ["http://www.w3.org/2000/svg"])
        assert "@import" not in text and "innerHTML" not in text and "eval(" not in text
    links = re.findall(r'(?:src|href)="([^"]+)"', static.joinpath("index.html").read_text())
    assert links and all(link.startswith(("/dashboard/", "data:")) for link in links)


async def test_on_loopback_the_stream_is_open_and_carries_the_node_and_its_rounds(
    tmp_path: Path,
) -> None:
    async with api_node(tmp_path) as (node, client), client.stream("GET", "/events") as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        received = events(answer)
        assert await anext(received) == ("curves", {})
        kind, snapshot = await anext(received)
        assert kind == "snapshot" and snapshot["node"]["peer_id"] == str(node.peer_id)
        assert set(snapshot) >= {"peers", "jobs", "budgets", "market", "stats", "alerts"}
        view = _live(node)
        view.observe("round", {"job_id": "j", "round": 3, "accuracy": 0.5, "loss": float("nan")})
        with trio.fail_after(10):
            kind, data = await anext(received)
            while kind != "round":  # snapshots may come first
                kind, data = await anext(received)
        assert data["job"] == "j" and data["round"] == 3 and data["accuracy"] == 0.5
        assert data["loss"] is None  # not a number: no JSON, shown as missing


def _live(node: Any) -> Any:
    """The node's :class:`~meshfed.api.live.LiveView` (the market's observer it registered)."""
    from meshfed.api.live import LiveView

    assert node.market is not None
    found = [
        o.__self__ for o in node.market.observers if isinstance(getattr(o, "__self__", 0), LiveView)
    ]
    assert len(found) == 1
    return found[0]


async def test_beyond_loopback_the_stream_needs_the_token_or_a_one_use_ticket(
    tmp_path: Path,
) -> None:
    async with api_node(tmp_path, api="0.0.0.0:0") as (node, client):
        assert (await client.get("/")).status_code == 200  # the page holds no node data
        assert (await client.get("/events")).status_code == 401
        assert (await client.get("/events", params={"ticket": "A" * 32})).status_code == 403
        assert (await client.post("/events/ticket")).status_code == 401
        wrong = {"Authorization": "Bearer " + "A" * 43}
        assert (await client.post("/events/ticket", headers=wrong)).status_code == 403

        issued = await client.post("/events/ticket", headers=bearer(tmp_path))
        assert issued.status_code == 200 and issued.json()["expires_in_s"] == 30
        ticket = {"ticket": issued.json()["ticket"]}
        async with client.stream("GET", "/events", params=ticket) as answer:
            assert answer.status_code == 200
            assert (await anext(events(answer)))[0] == "curves"
        again = await client.get("/events", params=ticket)
        assert again.status_code == 403  # used once: a leaked URL opens nothing
        async with client.stream("GET", "/events", headers=bearer(tmp_path)) as answer:
            assert answer.status_code == 200  # a client that can send the header needs none

        await node.audit_trail.flush()
        refused = AuditLog(node.store).entries(kind="api_refused")  # type: ignore[arg-type]
        assert any(e.fields["why"] == "wrong ticket" for e in refused)


def test_a_ticket_is_good_once_and_only_until_it_expires() -> None:
    tickets = Tickets(ttl_s=30, limit=3)
    first = tickets.issue(now=100).ticket
    assert tickets.redeem(first, now=129)
    assert not tickets.redeem(first, now=129)
    late = tickets.issue(now=100).ticket
    assert not tickets.redeem(late, now=131)
    assert not tickets.redeem(late[:-1] + ("A" if late[-1] != "A" else "B"), now=100)
    many = [tickets.issue(now=0).ticket for _ in range(4)]
    assert not tickets.redeem(many[0], now=1)  # beyond the limit the oldest went
    assert all(tickets.redeem(t, now=1) for t in many[1:])


async def test_a_client_that_falls_behind_is_ended_and_one_that_keeps_up_gets_every_frame() -> None:
    feed = Feed(keep=4)
    slow, quick = feed.stream([b"start"]), feed.stream([b"start"])
    assert await anext(slow) == b"start" and await anext(quick) == b"start"
    got = []
    for n in range(10):
        feed.publish("n", n)
        got.append(await anext(quick))
    assert got == [frame("n", n, n + 1) for n in range(10)]
    assert feed.clients == 2
    try:
        await anext(slow)
        raise AssertionError("a client 10 frames behind a feed keeping 4 was not ended")
    except StopAsyncIteration:
        pass
    assert feed.clients == 1
    await quick.aclose()
    assert feed.clients == 0
