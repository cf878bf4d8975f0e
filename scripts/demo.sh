#!/usr/bin/env bash
# README quick start, command 1: install K2, then run the main job (`k2 demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m k2store demo "$@"
