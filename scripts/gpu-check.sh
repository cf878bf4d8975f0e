#!/usr/bin/env bash
# The checks that need a CUDA GPU, which no CI machine has: the engine's CUDA tests
# (tests/kvtier/test_engine_cuda.py, skipped elsewhere) and time to first token on the GPU for
# random weights in three model shapes (`k2 bench engine --architecture`), each step bounded in
# time so a slow one still leaves the others' results.
#
#   bash scripts/gpu-check.sh OUTDIR
#
# Needs k2's Python dependencies. On a machine that cannot reach a package index, put wheels
# for them in .whl/ (Python and platform of that machine; `bash scripts/gpu-wheels.sh` fetches
# them on a machine that can): they are installed into /tmp/site first. Writes
# OUTDIR/pytest.log and OUTDIR/engine-<shape>.{json,png,log}. Session 20 ran it on an H200 in
# about 200 s (docs/benchmarks.md, "On a GPU").
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
status=0
timeout 120 python3 -m pytest -q -p no:cacheprovider -W default -o addopts="-ra" \
    tests/kvtier/test_engine_cuda.py tests/kvtier/test_models.py 2>&1 | tee "$out/pytest.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
# shape, prefix lengths, repetitions, seconds allowed
while read -r shape sizes reps limit; do
    timeout "$limit" python3 -m k2store bench engine --architecture "$shape" --device cuda \
        --kv-dtype bfloat16 --sizes "$sizes" --reps "$reps" --out "$out/engine-$shape.json" \
        2>&1 | tee "$out/engine-$shape.log"
    # exit 1 is "ran, targets missed" (the targets were set for a CPU); anything else failed
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || [ "$rc" = 1 ] || status=1
done << 'EOF'
smollm2-135m 256,1024,2048,4096 3 110
llama-1b 1024,4096 2 90
llama-8b 512,2048,8192 2 200
EOF
exit $status
