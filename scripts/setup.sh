#!/usr/bin/env bash
# Creates .venv and installs bnrnn with the experiment harness and the dev tools.
# constraints.txt pins torch to the 2.13.0 CPU build that lies on these machines.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
