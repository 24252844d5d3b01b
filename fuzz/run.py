"""Run one harness under atheris/libFuzzer: ``python -m fuzz.run <harness> [libFuzzer args]``.

meshfed's modules are imported with atheris's coverage instrumentation (and nothing else:
numpy, cryptography, msgpack and libp2p are imported first, uninstrumented, so the fuzzer
steers by our branches and runs fast). An exception that leaves the harness is a crash;
libFuzzer writes the input to ``<artifact_prefix>crash-<sha1>`` and stops, unless
``-keep_going=DIR`` is given (then each distinct crash is written to DIR and fuzzing goes on).
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

# Third-party modules are imported here, uninstrumented, so that only meshfed is.
import atheris
import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
import msgpack  # noqa: F401
import numpy  # noqa: F401
import trio  # noqa: F401

from fuzz import HARNESSES

_NEEDS_LIBP2P = {"key_exchange"}
#: ``-keep_going=DIR``: record crashes in DIR and go on (see :func:`keep_going`)
_KEEP_GOING = "-keep_going="
#: our source files (the deepest frame of ours names a crash)
_OURS = re.compile(r".*/(?=(?:meshfed|transports|fuzz)/)")
#: the committed corpora, one directory per harness
CORPUS = Path(__file__).parent / "corpus"


def write_seeds(root: Path) -> None:
    """Write every harness's hand-made seeds into ``root/<harness>/seed-<sha1>``."""
    for name in HARNESSES:
        harness = importlib.import_module(f"fuzz.{name}")
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        for seed in harness.seeds():
            harness.test_one_input(seed)  # a seed is a valid scenario, never a crash
            (directory / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)


def keep_going(test: Callable[[bytes], None], artifacts: Path) -> Callable[[bytes], None]:
    """``test`` that records each distinct crash (exception type and the line that raised it)
    under ``artifacts`` instead of stopping, so one finding does not end a long run; libFuzzer
    still steers by coverage. Each first input of a crash is ``crash-<sha1>``, with a
    ``.txt`` beside it holding the traceback."""
    artifacts.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()

    def run_one(data: bytes) -> None:
        try:
            test(data)
        except Exception as exc:  # every escape is a finding: record it and go on
            frames = traceback.extract_tb(exc.__traceback__)
            ours = [f for f in frames if _OURS.search(f.filename)] or frames
            where = _OURS.split(ours[-1].filename)[-1]
            signature = f"{type(exc).__name__} at {where}:{ours[-1].lineno}"
            if signature in seen:
                return
            seen.add(signature)
            name = f"crash-{hashlib.sha1(data).hexdigest()}"
            (artifacts / name).write_bytes(data)
            (artifacts / f"{name}.txt").write_text(
                signature + "\n\n" + "".join(traceback.format_exception(exc))
            )
            print(f"FINDING {signature}: {exc!r} -> {name}", file=sys.stderr, flush=True)

    return run_one


def main(argv: list[str]) -> None:
    """Fuzz the harness named by ``argv[1]``; the other arguments go to libFuzzer.
    ``--write-seeds`` writes the hand-made seeds into ``fuzz/corpus`` instead."""
    if argv[1:] == ["--write-seeds"]:
        write_seeds(CORPUS)
        return
    if len(argv) < 2 or argv[1] not in HARNESSES:
        raise SystemExit(f"usage: python -m fuzz.run {{{','.join(HARNESSES)}}} [libFuzzer args]")
    name = argv[1]
    options = [arg for arg in argv[2:] if not arg.startswith(_KEEP_GOING)]
    keep = [arg[len(_KEEP_GOING) :] for arg in argv[2:] if arg.startswith(_KEEP_GOING)]
    if name in _NEEDS_LIBP2P:
        importlib.import_module("libp2p")
    with atheris.instrument_imports(include=["meshfed"]):
        harness = importlib.import_module(f"fuzz.{name}")
    test = harness.test_one_input
    if keep:
        test = keep_going(test, Path(keep[-1]))
    atheris.Setup([argv[0], *options], test)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
