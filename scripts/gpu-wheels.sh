#!/usr/bin/env bash
# Wheels of k2's Python dependencies for a GPU machine that cannot reach a package index and
# already has torch (this project's lent H200s: Python 3.12, torch with CUDA, transformers 5.17,
# huggingface_hub 1.33, numpy, grpcio missing). Downloads into .whl/ (ignored by git), which
# scripts/gpu-check.sh installs into /tmp/site before it runs. About 34 MB.
#
#   bash scripts/gpu-wheels.sh [PYTHON_VERSION]      (default 3.12)
#
# Versions are this machine's (what CI installs), so the GPU runs the same code paths.
# huggingface_hub is left out on purpose: 2.x needs httpx2, and transformers 5.23 is content
# with the 1.x the GPU machine has.
set -euo pipefail
py=${1:-3.12}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
ver() { python3 -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'; }
pkgs=()
for p in grpcio grpcio-health-checking protobuf rocksdict crc32c aiomqtt paho-mqtt amqtt \
         transitions dacite websockets cryptography cffi pycparser transformers tokenizers regex; do
    v=$(ver "$p")
    if [ -z "$v" ]; then
        echo "gpu-wheels: $p is not installed here: run scripts/install.sh dev first" >&2
        exit 2
    fi
    pkgs+=("$p==$v")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp -d .whl \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    "${pkgs[@]}"
ls .whl
du -sh .whl
