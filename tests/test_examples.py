"""Every script in examples/ runs to completion (as a script: libp2p owns a package named
``examples`` in site-packages, so ours is never imported as a package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs.harness import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
