#!/usr/bin/env bash
# README quick start, command 2: install K2 with its dev tools, then run every test (slow ones too).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"` for the fast set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
exec "${PYTHON:-python3}" -m pytest "$@"
