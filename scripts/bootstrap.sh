#!/usr/bin/env bash
# Create or refresh .venv with the pinned dependencies; a no-op when nothing changed.
# Needs only python3.11 (or $PYTHON) on PATH. torch is installed first and pinned: an unpinned
# torch would pull a several-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "meshfed needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=" >&2; exit 1; }

stamp=".venv/.meshfed-installed"
want="$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade "pip>=24"
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt -e '.[train,test]'  # the dev venv trains
# trio-typing (pulled in by libp2p) ships stale stubs for trio that shadow trio's own inline
# types (for example, trio.TaskStatus vanishes for mypy). trio itself is typed: drop them.
rm -rf .venv/lib/python3.11/site-packages/trio-stubs
.venv/bin/python -m pip check >/dev/null
echo "$want" > "$stamp"
