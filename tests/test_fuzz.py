"""The fuzz harnesses (``fuzz/``) in CI: a bounded coverage-guided run of each, and a replay of
every committed corpus input and crash reproducer.

A corpus input is a scenario the harness accepted once: it must keep passing. A reproducer
(``fuzz/crashes/<harness>/<finding>``) is an input that made a decoder or state machine
raise something other than our own ``RemoteProtocolError``; each is marked xfail with its
finding until the fix is merged (then it passes and the marker goes).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import HARNESSES

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
CRASHES = ROOT / "fuzz" / "crashes"

#: every committed reproducer, by ``<harness>/<file>``: what it showed, and where the fault was
#: (each is fixed; the reproducers guard against its return)
FINDINGS: dict[str, str] = {
    "arrays/zero-dimension-streamed": (
        "issue 11 #10: shape [0, 2**64-1] passes the size checks; ArrayAssembler.finish "
        "(meshfed/arrays.py) raises ValueError in reshape"
    ),
    "arrays/zero-dimension-inline": (
        "issue 11 #10: the same header inline; InlineArray.array (meshfed/arrays.py) raises "
        "ValueError in reshape"
    ),
    "swim/incarnation-overflow": (
        "issue 11 #1: Swim.receive (meshfed/membership/swim.py) refutes incarnation 2**64-1 "
        "with 2**64; seal() of the next SwimPing raises OverflowError"
    ),
    "key_exchange/low-order-key": (
        "new: a listener answering the key exchange with a low-order X25519 key makes "
        "Libp2pTransport._exchange_keys (transports/libp2p.py) raise ValueError from "
        "X25519 exchange, outside its try: connect() leaks it to callers that catch "
        "MeshfedError only"
    ),
    "sealed_frames/skip-body-unauthenticated": (
        "issue 11 #5: an honest frame replaced by a forged oversized REQUEST header is "
        "skipped (SealedSocket.skip_body, transports/_sealed.py) and the next frame still "
        "opens: a frame was dropped without the next tag failing"
    ),
    "peer_records/subject-not-bytes": (
        "new: signed_subject (meshfed/membership/records.py) builds PeerId from a record's "
        "first field without checking it is bytes; PeerId.__post_init__ "
        "(meshfed/identity.py) then raises AttributeError (.hex() on a str or list)"
    ),
    "cyclon/subject-not-bytes": (
        "new: the same record in a shuffle: Cyclon.merge (meshfed/membership/cyclon.py) "
        "calls signed_subject, AttributeError escapes"
    ),
    "swim/indirect-probe-of-the-dead": (
        "found after the signed-incarnation rewrite: Swim._expire_suspicions "
        "(meshfed/membership/swim.py) declared the period's probe target dead and tick still "
        "asked helpers to ping it (wasted ping requests)"
    ),
    "secagg/low-order-mask-key": (
        "issue 11 #6: a member's low-order X25519 mask key (its advert dropped, its share "
        "message carrying the key) makes SecAggPeer._masked_input "
        "(meshfed/secagg/protocol.py) raise ValueError out of receive()"
    ),
}


def _harness(name: str) -> object:
    return importlib.import_module(f"fuzz.{name}")


def _inputs(root: Path) -> list[tuple[str, Path]]:
    return sorted(
        (path.parent.name, path)
        for path in root.glob("*/*")
        if path.is_file() and not path.name.endswith(".txt")
    )


def test_every_harness_has_a_corpus() -> None:
    assert sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) == sorted(HARNESSES)
    for name in HARNESSES:
        assert any((CORPUS / name).iterdir()), f"no corpus for {name}"


@pytest.mark.parametrize("name", HARNESSES)
def test_corpus_replays_clean(name: str) -> None:
    """Every committed input of the harness runs without a crash."""
    test_one_input = _harness(name).test_one_input  # type: ignore[attr-defined]
    for path in sorted((CORPUS / name).iterdir()):
        test_one_input(path.read_bytes())


def test_every_reproducer_names_its_finding() -> None:
    reproducers = {f"{harness}/{path.name}" for harness, path in _inputs(CRASHES)}
    assert reproducers == set(FINDINGS)


@pytest.mark.parametrize(
    ("name", "path"),
    [
        pytest.param(harness, path, id=f"{harness}/{path.name}")
        for harness, path in _inputs(CRASHES)
    ],
)
def test_reproducer_no_longer_crashes(name: str, path: Path) -> None:
    """A finding's reproducer (:data:`FINDINGS`) is rejected cleanly (or accepted): each
    crashed the code it was found on."""
    _harness(name).test_one_input(path.read_bytes())  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", HARNESSES)
def test_bounded_fuzz_run(name: str, tmp_path: Path) -> None:
    """A few thousand coverage-guided inputs (at most ~3 s) from the committed corpus, with a
    fixed seed: no crash, and the fuzzer really ran."""
    pytest.importorskip("atheris")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [
            sys.executable, "-m", "fuzz.run", name, "-runs=3000", "-max_total_time=3",
            "-seed=1", "-timeout=10", f"-artifact_prefix={tmp_path}/",
            str(tmp_path), str(CORPUS / name),
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = re.search(r"^Done (\d+) runs", done.stderr, re.MULTILINE)
    assert runs is not None and int(runs.group(1)) >= 50, done.stderr[-3000:]
