#!/usr/bin/env bash
# The whole test suite: set-up, lint, type check, tests. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check meshfed transports tests benchmarks examples
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
