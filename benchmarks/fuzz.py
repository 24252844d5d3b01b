"""Run every fuzz harness (``fuzz/``) for N inputs and report what they found.

Prints one JSON line::

    {"harnesses": {name: {"inputs": n, "crashes": k, "seconds": s, "exec_per_s": r,
                          "findings": [signature, ...]}, ...},
     "inputs_min": smallest n over the harnesses, "crashes": total k}

Each harness runs in its own process under atheris/libFuzzer (``python -m fuzz.run``), from
its committed corpus (``fuzz/corpus/<name>``, read only: new inputs go to a scratch
directory), with ``-runs=N``. A crash does not end the run: each distinct one (exception type
and the line that raised it) is written to the artifacts directory with its traceback and
counted once, and fuzzing goes on; a hang (over ``--timeout`` s on one input) or running out
of memory ends that harness's run and counts as one crash. ``inputs`` is what libFuzzer
reports it executed.

Usage: python benchmarks/fuzz.py [--inputs 1000000] [--harness envelope,swim] [--jobs 1]
       [--artifacts DIR] [--corpus-out DIR] [--timeout 30] [--max-seconds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz import HARNESSES  # noqa: E402

_DONE = re.compile(r"^Done (\d+) runs in", re.MULTILINE)
_EXECUTED = re.compile(r"^stat::number_of_executed_units: (\d+)", re.MULTILINE)
_FINDING = re.compile(r"^FINDING (.+?): ", re.MULTILINE)


def run_harness(
    name: str, inputs: int, artifacts: Path, corpus_out: Path, timeout_s: int, max_s: int
) -> dict[str, Any]:
    """Fuzz ``name`` for ``inputs`` inputs (or ``max_s`` seconds if not 0); its counts and
    findings."""
    artifacts.mkdir(parents=True, exist_ok=True)
    corpus_out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "fuzz.run", name,
        f"-runs={inputs}", f"-max_total_time={max_s}", f"-timeout={timeout_s}",
        "-rss_limit_mb=2048", "-print_final_stats=1",
        f"-keep_going={artifacts}", f"-artifact_prefix={artifacts}/",
        str(corpus_out), str(ROOT / "fuzz" / "corpus" / name),
    ]  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    log = done.stderr
    (artifacts / "fuzz.log").write_text(log)
    findings = _FINDING.findall(log)
    finished = _DONE.search(log)
    if finished is not None and done.returncode == 0:
        executed = int(finished.group(1))
    else:  # a hang, out of memory, or something that is not an Exception: the run ended
        stats = _EXECUTED.findall(log)
        executed = int(stats[-1]) if stats else 0
        findings.append(f"libFuzzer stopped (exit {done.returncode}), see {artifacts}/fuzz.log")
    return {
        "inputs": executed,
        "crashes": len(findings),
        "seconds": round(seconds, 1),
        "exec_per_s": round(executed / seconds, 1) if seconds else 0.0,
        "findings": findings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per harness")
    parser.add_argument("--harness", default=",".join(HARNESSES), help="comma-separated names")
    parser.add_argument("--jobs", type=int, default=1, help="harnesses run at once")
    parser.add_argument("--artifacts", type=Path, default=None, help="crashes and logs go here")
    parser.add_argument("--corpus-out", type=Path, default=None, help="new corpus inputs go here")
    parser.add_argument("--timeout", type=int, default=30, help="seconds one input may take")
    parser.add_argument(
        "--max-seconds", type=int, default=0, help="stop a harness after this long (0: never)"
    )
    args = parser.parse_args()
    names = [name for name in args.harness.split(",") if name]
    unknown = sorted(set(names) - set(HARNESSES))
    if unknown:
        parser.error(f"unknown harnesses {unknown}; known: {', '.join(HARNESSES)}")
    with tempfile.TemporaryDirectory(prefix="meshfed-fuzz-") as scratch:
        artifacts = args.artifacts or Path(scratch) / "artifacts"
        corpus_out = args.corpus_out or Path(scratch) / "corpus"
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = dict(
                zip(
                    names,
                    pool.map(
                        lambda name: run_harness(
                            name,
                            args.inputs,
                            artifacts / name,
                            corpus_out / name,
                            args.timeout,
                            args.max_seconds,
                        ),
                        names,
                    ),
                    strict=True,
                )
            )
    print(
        json.dumps(
            {
                "harnesses": results,
                "inputs_min": min(r["inputs"] for r in results.values()),
                "crashes": sum(r["crashes"] for r in results.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
