#!/usr/bin/env bash
# The main job: set-up, then a local multi-process testnet on 127.0.0.1: each node gets its
# shard of the data as a .npz file in its data dir, registered there (meshfed-node data add's
# path); a buyer node posts the job with a budget, the nodes bid, the auction hires them, and
# they train on their own shards with secure averaging, paid round by round.
# Extra arguments go to `meshfed-node testnet` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/meshfed-node testnet "$@"
