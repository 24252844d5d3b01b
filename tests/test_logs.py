"""Structured logs: extras are printed in both formats."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from meshfed.logs import configure_logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_extras() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    logging.getLogger("meshfed.test").info("peer connected", extra={"peer": "abc", "rtt_ms": 1.5})
    document = json.loads(stream.getvalue())
    assert document["msg"] == "peer connected"
    assert (document["peer"], document["rtt_ms"], document["level"]) == ("abc", 1.5, "info")


def test_text_lines_carry_the_extras_and_tracebacks() -> None:
    stream = io.StringIO()
    configure_logging("info", "text", stream)
    log = logging.getLogger("meshfed.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("handler failed", extra={"peer": "abc"})
    text = stream.getvalue()
    assert "ERROR" in text and "meshfed.test: handler failed  peer=abc" in text
    assert "ValueError: boom" in text
    log.debug("hidden")
    assert "hidden" not in stream.getvalue()


def test_epsilon_computations_do_not_flood_the_log() -> None:
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    stream = io.StringIO()
    configure_logging("info", "text", stream)
    accountant = rdp_privacy_accountant.RdpAccountant()  # small orders fail to converge here
    event = dp_event.PoissonSampledDpEvent(0.2, dp_event.GaussianDpEvent(1.0))
    accountant.compose(dp_event.SelfComposedDpEvent(event, 50))
    assert accountant.get_epsilon(1e-5) > 0
    assert "converge" not in stream.getvalue()
    configure_logging("debug", "text", stream)
    assert logging.getLogger("absl").level == logging.DEBUG
