"""Start meshfed processes and talk to them in JSON lines, with deadlines (for tests)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class Process:
    """A child process speaking JSON lines on stdout; stdin takes commands."""

    def __init__(
        self,
        *args: str,
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.popen = subprocess.Popen(
            [*(prefix or []), sys.executable, *args],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self._stderr.append(line)

    def read(self, timeout: float = 60) -> dict[str, Any]:
        """The next JSON line; fails with the child's stderr if it ended or timed out."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no output in {timeout}s; stderr:\n{self.stderr}") from None
            if line is None:
                raise AssertionError(f"process ended ({self.popen.wait()}); stderr:\n{self.stderr}")
            if line.startswith("{"):
                document: dict[str, Any] = json.loads(line)
                return document

    @property
    def stderr(self) -> str:
        return "".join(self._stderr[-60:])

    def call_nowait(self, **command: Any) -> None:
        """Send one command; read its answer (and any events before it) later."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(command) + "\n")
        self.popen.stdin.flush()

    def call(self, timeout: float = 120, **command: Any) -> dict[str, Any]:
        """Send one command and return its answer (failing on an error answer)."""
        self.call_nowait(**command)
        answer = self.read(timeout)
        assert "error" not in answer, (command, answer)
        return answer

    def stop(self, timeout: float = 20) -> int:
        """Ask for a graceful stop; kill if it does not come."""
        if self.popen.poll() is None:
            try:
                assert self.popen.stdin is not None
                self.popen.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                self.popen.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


def wait_for_full_views(processes: list[Process], ids: list[str], *, within: float) -> None:
    """Read the processes' status lines until each lists every other peer id as a member."""
    views: dict[int, set[str]] = {}
    begun = time.monotonic()
    while not all(views.get(i) == set(ids) - {ids[i]} for i in range(len(ids))):
        assert time.monotonic() - begun < within, (
            f"member counts after {within} s: {[len(views.get(i, ())) for i in range(len(ids))]}"
        )
        for index, process in enumerate(processes):
            status = process.read(timeout=30)
            if status.get("event") == "status":
                views[index] = {member["peer_id"] for member in status["members"]}


def start_peer(data_dir: Path) -> tuple[Process, dict[str, Any]]:
    """Start ``tests/procs/peer.py`` and wait until it serves."""
    process = Process(str(ROOT / "tests" / "procs" / "peer.py"), str(data_dir))
    return process, process.read()
