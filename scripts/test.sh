#!/usr/bin/env bash
# The project's test command: Rust core tests, then the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked
python3 -m pytest -q -p no:cacheprovider --durations=40 "$@"
