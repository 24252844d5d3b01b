#!/usr/bin/env bash
# The whole test suite: set-up, lint, type check, tests. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The dashboard's browser tests drive Debian's chromium through Playwright (no browser download):
# installed here when missing and we may (root, apt-get); otherwise those tests skip, saying why.
if ! command -v chromium >/dev/null && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } \
    >/dev/null || echo "chromium could not be installed: the dashboard's browser tests skip" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check meshfed transports tests benchmarks examples
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
