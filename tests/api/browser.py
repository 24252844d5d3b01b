"""A real headless Chromium, driven by Playwright through its ``executable_path`` (Debian's
``chromium``; no browser download): the dashboard tests skip with the reason when either is
missing (``scripts/test.sh`` installs chromium on a fresh machine)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

#: where Chromium is looked for: $MESHFED_CHROMIUM, else ``chromium`` on the PATH
CHROMIUM = os.environ.get("MESHFED_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def need_chromium() -> None:
    """Skip the test, saying why, unless Playwright and Chromium are here."""
    pytest.importorskip("playwright.sync_api", reason="the python package playwright is absent")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; or MESHFED_CHROMIUM)")


@contextmanager
def chromium_page() -> Iterator[tuple[Any, list[str]]]:
    """A page in a new headless Chromium and the console errors and page errors it logs."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()


def wait_until(page: Any, expression: str, timeout_s: float) -> Any:
    """Poll ``expression`` in ``page`` until it is truthy; its value. (Playwright's own
    ``wait_for_function`` evaluates a string in the page, which the dashboard's
    Content-Security-Policy forbids: evaluating through the DevTools protocol is not.)"""
    deadline = time.monotonic() + timeout_s
    while not (value := page.evaluate(expression)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{expression} still false after {timeout_s} s")
        time.sleep(0.2)
    return value


def keep_artifact(path: Path) -> None:
    """Copy ``path`` into $MESHFED_ARTIFACTS when set (CI keeps that directory)."""
    target = os.environ.get("MESHFED_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
