#!/usr/bin/env bash
# The main job: set-up, then a local multi-process testnet on 127.0.0.1.
# Extra arguments go to `meshfed-node testnet` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/meshfed-node testnet "$@"
