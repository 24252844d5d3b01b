"""Run one harness under atheris/libFuzzer: ``python -m fuzz.run <harness> [libFuzzer args]``.

meshfed's modules are imported with atheris's coverage instrumentation (and nothing else:
numpy, cryptography, msgpack and libp2p are imported first, uninstrumented, so the fuzzer
steers by our branches and runs fast). An exception that leaves the harness is a crash;
libFuzzer writes the input to ``<artifact_prefix>crash-<sha1>``.
"""

from __future__ import annotations

import importlib
import sys

import atheris

from fuzz import HARNESSES

# Third-party modules first, so that only meshfed is instrumented.
import cryptography.hazmat.primitives.ciphers.aead  # noqa: E402, F401, I001
import msgpack  # noqa: E402, F401
import numpy  # noqa: E402, F401
import trio  # noqa: E402, F401

_NEEDS_LIBP2P = {"key_exchange"}


def main(argv: list[str]) -> None:
    """Fuzz the harness named by ``argv[1]``; the other arguments go to libFuzzer."""
    if len(argv) < 2 or argv[1] not in HARNESSES:
        raise SystemExit(f"usage: python -m fuzz.run {{{','.join(HARNESSES)}}} [libFuzzer args]")
    name = argv[1]
    if name in _NEEDS_LIBP2P:
        importlib.import_module("libp2p")
    with atheris.instrument_imports(include=["meshfed"]):
        harness = importlib.import_module(f"fuzz.{name}")
    atheris.Setup([argv[0], *argv[2:]], harness.test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
