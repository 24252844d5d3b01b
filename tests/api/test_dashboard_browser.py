"""The live dashboard in a real headless Chromium over a 4-node testnet on libp2p (127.0.0.1;
four nodes train, a fifth buys the job, as ``meshfed.testnet`` runs it): it loads without a
console error, shows a training node's four peers, and its accuracy curve grows while the job
trains; a screenshot is kept. Beyond loopback the page asks for the token and streams with a
ticket."""

from __future__ import annotations

from pathlib import Path

import trio

from meshfed.testing import open_memory_mesh
from tests.market.mesh import meshed

from .browser import chromium_page, keep_artifact, need_chromium, wait_until
from .nodes import api_node

JOB = {"dataset": "digits", "partition": "iid", "local_steps": 2}
POINTS = "document.querySelectorAll('#accuracy circle.point').length"
PEER_ROWS = "document.querySelectorAll('#peers tbody tr').length"


def _watch(url: str, screenshot: Path) -> tuple[int, int, list[str], list[str]]:
    """In a worker thread: open the dashboard, wait for the peers and two reads of the curve;
    the points read, the console errors and the peers' states shown."""
    with chromium_page() as (page, errors):
        page.goto(url)
        wait_until(page, f"{PEER_ROWS} === 4", 60)
        first = wait_until(page, f"{POINTS} >= 2 && {POINTS}", 120)
        second = wait_until(page, f"{POINTS} > {first} && {POINTS}", 60)
        states = page.eval_on_selector_all(
            "#peers tbody tr td:nth-child(2)", "cells => cells.map(c => c.textContent)"
        )
        page.screenshot(path=str(screenshot), full_page=True)
        return first, second, errors, states


async def test_the_dashboard_shows_a_libp2p_testnet_and_a_growing_accuracy_curve(
    tmp_path: Path,
) -> None:
    need_chromium()
    async with open_memory_mesh(
        5, tmp_path, transport="libp2p", listen=["/ip4/127.0.0.1/tcp/0"], membership=True,
        gossip_interval_s=0.2, market_capacity=1,
    ) as nodes:  # fmt: skip
        await meshed(nodes, within=60)
        buyer, sellers = nodes[0], nodes[1:]
        handle = await buyer.submit_training(
            {**JOB, "job_id": "watched", "rounds": 200}, budget=50, min_peers=4, max_peers=4
        )
        watched = sellers[0]
        assert watched.api_url is not None
        screenshot = tmp_path / "dashboard.png"
        try:
            with trio.fail_after(240):
                first, second, errors, states = await trio.to_thread.run_sync(
                    _watch, watched.api_url + "/", screenshot
                )
        finally:
            await handle.cancel()
        keep_artifact(screenshot)
    assert errors == []
    assert 2 <= first < second
    assert sorted(states) == ["alive"] * 4
    assert screenshot.stat().st_size > 10_000


def _log_in(url: str, token: str) -> tuple[str, str]:
    """In a worker thread: open the page, wait for the token form, give it a wrong then the
    right token; what the wrong token got said, the peer id then shown."""
    with chromium_page() as (page, _):
        page.goto(url)
        wait_until(page, "!document.getElementById('login').hidden", 30)
        page.fill("#token", "A" * 43)
        page.click("button[type=submit]")
        wrong = wait_until(page, "document.getElementById('login-error').textContent", 30)
        page.fill("#token", token)
        page.click("button[type=submit]")
        wait_until(page, "document.getElementById('connection').textContent === 'live'", 30)
        shown = wait_until(page, "document.getElementById('peer-id').title", 30)
        return wrong, shown


async def test_beyond_loopback_the_page_asks_for_the_token_and_streams_with_a_ticket(
    tmp_path: Path,
) -> None:
    need_chromium()
    async with api_node(tmp_path, api="0.0.0.0:0") as (node, _):
        assert node.api_url is not None
        token = (tmp_path / "api.token").read_text().strip()
        with trio.fail_after(120):
            wrong, shown = await trio.to_thread.run_sync(_log_in, node.api_url + "/", token)
    assert "wrong" in wrong
    assert shown == str(node.peer_id)
