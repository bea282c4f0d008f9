#!/usr/bin/env bash
# Set up, then run one private request on the embedded default models and write a PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m cloud.demo "${1:-a portrait photo of an old woman wearing glasses}" --out "${2:-out/obclip.png}" --seed 0
