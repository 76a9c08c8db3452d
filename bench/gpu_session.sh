#!/usr/bin/env bash
# One prepared run for a GPU machine lent for a few minutes (e.g. the device tool's H100):
#   1. install this checkout (no network: no build isolation, no dependencies),
#   2. the kernel tests on CUDA (bf16 included),
#   3. the ahead-of-time compile check under the machine's Triton,
#   4. the attention sweep (chunkmem-triton vs SDPA; D=128, bf16) and the memory-update
#      benchmark (kernels vs the torch backend),
# each step under its own time limit, so that one hung step leaves the others' results.
# Everything lands in $OUT (default ./gpu-out): logs and results.tar.gz (bench/results/<gpu>/).
# The step limits add up to 480 s (a device command may run 600 s): it ends within 8 minutes
# and 10 s of taring; a step that runs out of time says so in its log (rc=124).
#
#   bash bench/gpu_session.sh                           # on the GPU machine
#   DEVICE=cpu SEQ_LENS=512 IMPLS=chunkmem-torch,sdpa MEM_T=1024 QUICK=1 bash bench/gpu_session.sh
#                                                       # smoke test of the plumbing on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
SEQ_LENS=${SEQ_LENS:-1024,4096,8192,16384,65536}
IMPLS=${IMPLS:-chunkmem-triton,sdpa}
MEM_T=${MEM_T:-4096,65536}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc after $((SECONDS - t0)) s"
    echo "# rc=$rc after $((SECONDS - t0)) s" >>"$OUT/$name.log"
}

{
    date -u
    nvidia-smi 2>&1 | head -15
    $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} >"$OUT/env.log" 2>&1

step install 40 $PY -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check -e .
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1; fi
if [ -n "${QUICK:-}" ]; then
    step tests 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_triton_memory.py
    step compile_check 60 env -u TRITON_INTERPRET $PY -m chunkmem.compile_check --filter fwd_fp16_d64
else
    # xdist spreads the many kernel specializations' compiles over the cores
    step tests 120 $PY -m pytest -q -p no:cacheprovider -n 8 tests/test_triton_attention.py \
        tests/test_triton_ranges.py tests/test_triton_memory.py tests/test_compile.py \
        tests/test_dispatch.py tests/test_nn.py
    # three row layouts per attention kernel (plain, ranges, packed) and the RoPE kernel
    step compile_check 120 $PY -m chunkmem.compile_check --jobs 16
fi
RESULTS=$($PY -c "from bench.common import device_name; print(device_name('$DEVICE'))")
step bench 140 $PY -m bench --device "$DEVICE" --D 128 --seq-lens "$SEQ_LENS" \
    --impls "$IMPLS" --model-impls '' --no-progress \
    --out "bench/results/$RESULTS"
step bench_memory_update 60 $PY -m bench.bench_memory_update --device "$DEVICE" \
    --dtypes float32,bfloat16 --T "$MEM_T" --d 1024 --impls torch,triton \
    --out "bench/results/$RESULTS"
tar czf "$OUT/results.tar.gz" "bench/results/$RESULTS" 2>>"$OUT/env.log"
ls -l "$OUT"
