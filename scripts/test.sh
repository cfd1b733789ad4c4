#!/usr/bin/env bash
# Sets up the environment, then runs lint and the test suite.
# The data directory defaults to ../shared/data (verified copies of MNIST and PTB).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export BNRNN_TEST_DATA_DIR="${BNRNN_TEST_DATA_DIR:-$(cd .. && pwd)/shared/data}"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
