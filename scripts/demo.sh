#!/usr/bin/env bash
# Set up, then run one private request on the embedded ObCLIP-Mini pair: the
# cloud service starts on loopback, the device client talks to it over HTTP,
# the PNG is written and the service is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/obclip-demo "${1:-a large red circle on a white background}" --out "${2:-out/obclip.png}" --seed 0
