#!/usr/bin/env bash
# Everything that needs a GPU, in one time-boxed run on a machine without network (issue #15):
#   1. the GPU tests: pytest -m gpu (Triton kernels compiled on CUDA vs the references, the "tile24" CPU
#      emulation vs torch._sparse_semi_structured_tile, 2:4 products vs dense, sparse-core layers, export,
#      compiled training on CUDA) and the pattern tests' CUDA cases;
#   2. nmsparse bench gpu, full size: copy/matmul roofs, prune kernels, dense vs 2:4 GEMMs (ViT-B, ViT-L,
#      GPT-2 XL MLP shapes), MLP block forward+backward (ViT-B and ViT-L widths), the dispatcher's choices;
#   3. nmsparse bench gpu --sections train: training steps of vit_tiny, ViT-B/16, ResNet-50, dense vs sparse.
# Each step has its own time limit (seconds: T_TESTS, T_BENCH, T_TRAIN), so the whole run stays under
# about 8 minutes; the bench saves its JSON + Markdown after every section, so a step cut short keeps
# what it finished. Seven files land in $OUT (default ./gpu-results).
# Usage: bash scripts/gpu_check.sh            QUICK=1 bash scripts/gpu_check.sh   (the bench's quick mode)
#        PYTHON=/path/to/python bash scripts/gpu_check.sh
# Exit status: 0 if every step passed, else the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu-results}"
PY="${PYTHON:-python3}"
QUICK="${QUICK:-}"
T_TESTS="${T_TESTS:-150}"
T_BENCH="${T_BENCH:-200}"
T_TRAIN="${T_TRAIN:-110}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
# The working tree, not an installed copy: nothing to build or fetch before the first test.
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0
start=$SECONDS
step() { echo; echo "=== [$((SECONDS - start)) s] $* ==="; }
check() {  # check NAME EXIT_STATUS: count a failure, and say when a time limit cut the step short
    if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then echo "$1: stopped at its time limit"; fi
    if [ "$2" -ne 0 ]; then echo "$1: exit $2"; failed=$((failed + 1)); fi
}

step "environment"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
        --format=csv 2>&1 || echo "nvidia-smi not available"
    "$PY" - <<'PYEOF' 2>&1
import importlib
import os
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}, "
      f"{os.cpu_count()} CPUs")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, sm{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    print(f"cuSPARSELt: {torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else 'not available'}")
for mod in ["triton", "numpy", "safetensors", "yaml", "tqdm", "scipy", "pytest", "hypothesis", "ortools", "matplotlib"]:
    try:
        print(f"{mod} {getattr(importlib.import_module(mod), '__version__', '?')}")
    except Exception as e:
        print(f"{mod} MISSING ({type(e).__name__})")
PYEOF
} | tee "$OUT/environment.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: nothing to run here (the CPU parts run in the normal test suite)"
    exit 1
fi

step "GPU tests (limit ${T_TESTS} s)"
# Triton compiles a kernel per dtype, n:m and method: spread the tests over 4 processes where xdist is there.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
timeout -k 10 "$T_TESTS" "$PY" -m pytest -q -rs --durations=10 -p no:cacheprovider $XDIST -m gpu tests/kernels/test_kernels.py \
    tests/nn/test_sparse_cores.py tests/nn/test_export.py tests/formats/test_formats.py \
    tests/nn/test_mask_step_compile.py 2>&1 | tee "$OUT/pytest-gpu.txt"
check "pytest -m gpu" "${PIPESTATUS[0]}"
timeout -k 10 60 "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda tests/patterns 2>&1 | tee -a "$OUT/pytest-gpu.txt"
check "pattern tests on cuda" "${PIPESTATUS[0]}"

step "nmsparse bench gpu${QUICK:+ --quick}: roofs, prune, gemm, block (limit ${T_BENCH} s)"
timeout -k 10 "$T_BENCH" "$PY" -m nmsparse.cli bench gpu --out "$OUT/bench-gpu.json" ${QUICK:+--quick} \
    --sections roofs,prune,gemm,block
check "bench gpu" $?

step "nmsparse bench gpu${QUICK:+ --quick}: train (limit ${T_TRAIN} s)"
timeout -k 10 "$T_TRAIN" "$PY" -m nmsparse.cli bench gpu --out "$OUT/bench-train.json" ${QUICK:+--quick} \
    --sections train
check "bench gpu train" $?

step "done: $failed failed step(s); results in $OUT"
ls -l "$OUT"
exit "$failed"
