#!/usr/bin/env bash
# Set up, then lint (ruff), type-check (mypy: strict on runtime/ and device/, which ship
# in apps) and run the test suite (CPU, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks mini export
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
