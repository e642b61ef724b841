#!/usr/bin/env bash
# Everything of issue #5 that needs a GPU, in one go, on a machine without network:
#   1. the GPU tests: pytest -m gpu (Triton kernels compiled on CUDA vs the references,
#      the "tile24" CPU emulation vs torch._sparse_semi_structured_tile, 2:4 products vs dense);
#   2. the kernels' interpreter tests (TRITON_INTERPRET=1) on this machine's triton, as a cross-check;
#   3. nmsparse bench gpu (copy/matmul roofs, prune kernels, dense vs 2:4 GEMMs, MLP block,
#      training steps), saved as JSON + Markdown.
# Usage: bash scripts/gpu_check.sh            (results in $OUT, default ./gpu-results)
#        QUICK=1 bash scripts/gpu_check.sh    (the bench's quick mode: a few minutes)
#        PYTHON=/path/to/python bash scripts/gpu_check.sh
# Exit status: 0 if every step passed, else the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu-results}"
PY="${PYTHON:-python3}"
QUICK="${QUICK:-}"
mkdir -p "$OUT"
# The working tree wins even if the editable install below fails (it needs no network either way).
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
failed=0
step() { echo; echo "=== $* ==="; }

step "install (no network): pip install --no-deps --no-build-isolation -e ."
if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip-install.log" 2>&1; then
    echo "pip install failed (see $OUT/pip-install.log); continuing with PYTHONPATH=src"
fi

step "environment"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available"
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/environment.txt"
import importlib
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, sm{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    print(f"cuSPARSELt: {torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else 'not available'}")
missing = []
for mod in ["triton", "numpy", "safetensors", "yaml", "tqdm", "sklearn", "pytest", "hypothesis", "scipy"]:
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as e:
        missing.append(mod)
        print(f"{mod} MISSING ({type(e).__name__})")
if missing:
    print("missing modules (no network here: bring wheels or use an image that has them):", " ".join(missing))
PYEOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: nothing to run here (the CPU parts run in the normal test suite)"
    exit 1
fi

step "pytest -m gpu"
"$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then echo "pytest -m gpu: exit $rc"; failed=$((failed + 1)); fi

step "kernel tests under the Triton interpreter (TRITON_INTERPRET=1)"
TRITON_INTERPRET=1 "$PY" -m pytest -q -rs -p no:cacheprovider -m "not gpu" tests/test_kernels.py \
    tests/test_dispatch.py 2>&1 | tee "$OUT/pytest-interpreter.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then echo "interpreter tests: exit $rc"; failed=$((failed + 1)); fi

step "nmsparse bench gpu${QUICK:+ --quick}"
if "$PY" -m nmsparse.cli bench gpu --help >/dev/null 2>&1; then
    "$PY" -m nmsparse.cli bench gpu --out "$OUT/bench-gpu.json" ${QUICK:+--quick} 2>&1 | tee "$OUT/bench-gpu.log"
    rc=${PIPESTATUS[0]}
else  # the CLI entry is not wired yet: call the module directly
    "$PY" -c "import sys; from nmsparse.bench.gpu import run; r = run(out=sys.argv[1], quick=bool(sys.argv[2])); sys.exit(1 if r['errors'] else 0)" \
        "$OUT/bench-gpu.json" "$QUICK" 2>&1 | tee "$OUT/bench-gpu.log"
    rc=${PIPESTATUS[0]}
fi
if [ "$rc" -ne 0 ]; then echo "bench: exit $rc"; failed=$((failed + 1)); fi

step "done: $failed failed step(s); results in $OUT"
ls -l "$OUT"
exit "$failed"
