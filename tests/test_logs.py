"""Structured logs: extras are printed in both formats."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshfed.logs import configure_logging

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MESHFED_LOG_LIBS", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name).level for name in ("libp2p", "multiaddr", "absl")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)


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
    configure_logging("debug", "text", stream, libs="debug")
    assert logging.getLogger("absl").level == logging.DEBUG


def test_debug_shows_ours_and_holds_the_libraries_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    configure_logging("debug", "text", stream)
    logging.getLogger("meshfed.test").debug("ours")
    logging.getLogger("multiaddr.transforms").warning("a library's warning")
    logging.getLogger("multiaddr.transforms").debug("bytes_to_string")
    logging.getLogger("libp2p.network.swarm").info("Swarm.listen")
    logging.getLogger("libp2p.network.auto_connector").warning("initiating 150 new dials")
    text = stream.getvalue()
    assert "ours" in text and "a library's warning" in text
    assert "bytes_to_string" not in text and "Swarm.listen" not in text
    assert "new dials" not in text
    monkeypatch.setenv("MESHFED_LOG_LIBS", "debug")
    configure_logging("info", "text", stream)
    logging.getLogger("multiaddr.transforms").debug("asked for")
    logging.getLogger("libp2p.network.auto_connector").info("dial plan asked for")
    assert "asked for" in stream.getvalue() and "dial plan asked for" in stream.getvalue()


def test_departures_and_shutdown_tracebacks_of_libp2p_are_demoted() -> None:
    stream = io.StringIO()
    configure_logging("info", "text", stream)
    log = logging.getLogger("libp2p.protocol_muxer.multiselect_client")
    log.error("MultiselectClient handshake: read failed: fail to read")
    logging.getLogger("libp2p.transport.tcp.tcp").error("Failed to open TCP stream: refused")

    class LifecycleError(Exception):
        pass

    try:
        raise LifecycleError("Cannot schedule task after service has stopped")
    except LifecycleError:
        logging.getLogger("libp2p.network.swarm").warning("add_conn failed", exc_info=True)
    logging.getLogger("libp2p.network.swarm").error("something else broke")
    text = stream.getvalue()
    assert "ERROR" in text and "something else broke" in text  # real errors stay
    assert "handshake" not in text and "TCP stream" not in text and "Traceback" not in text


def _node(data_dir: Path, *extra: str, level: str = "info") -> subprocess.Popen[str]:
    env = {**os.environ, "MESHFED_PING_INTERVAL_S": "1", "MESHFED_MDNS": "0"}
    env.pop("MESHFED_LOG_LIBS", None)
    command = [sys.executable, "-m", "meshfed.cli", "run", "--json", "--status-interval", "30"]
    command += ["--data-dir", str(data_dir), "--log-level", level, *extra]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _first_status(process: subprocess.Popen[str]) -> dict[str, object]:
    assert process.stdout is not None
    document: dict[str, object] = json.loads(process.stdout.readline())
    return document


def test_a_debug_node_logs_its_own_lines_not_the_libraries(tmp_path: Path) -> None:
    node = _node(tmp_path / "n", level="debug")
    try:
        _first_status(node)
        time.sleep(3)
    finally:
        node.send_signal(signal.SIGINT)
        _, err = node.communicate(timeout=30)
    lines = [line for line in err.splitlines() if line[:2].isdigit()]
    assert any(" meshfed." in line for line in lines)
    foreign = [line for line in lines if " libp2p" in line or " multiaddr" in line]
    assert foreign == [], foreign[:5]


def test_a_peer_that_stops_cleanly_leaves_no_error_in_the_others_logs(tmp_path: Path) -> None:
    stayer = _node(tmp_path / "stayer")
    leaver = None
    try:
        listen = _first_status(stayer)["listen"]
        assert isinstance(listen, list)
        leaver = _node(tmp_path / "leaver", "--bootstrap", listen[0])
        _first_status(leaver)
        time.sleep(3)  # gossip and probes both ways
        leaver.send_signal(signal.SIGTERM)
        assert leaver.wait(30) == 0
        time.sleep(5)  # the stayer probes, dials and declares the leaver dead
    finally:
        if leaver is not None and leaver.poll() is None:
            leaver.kill()
        stayer.send_signal(signal.SIGTERM)
        _, err = stayer.communicate(timeout=30)
    assert "peer declared dead" in err  # it noticed the departure, in our words
    assert " ERROR " not in err and "Traceback" not in err, err
