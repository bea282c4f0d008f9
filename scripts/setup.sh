#!/usr/bin/env bash
# Create .venv and install obclip with everything the demo and tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c .ci/constraints-cpu.txt -e ".[dev]"
