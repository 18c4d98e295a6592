#!/usr/bin/env bash
# One check on one GPU, under 8 minutes: the GPU-marked tests, the kernel test files with the
# compiled kernels (no interpreter), then the kernel benchmark when it exists. Everything goes
# to a log, with a summary at its end, under benchmarks/results/gpu-check-<date>.txt.
#
#   bash benchmarks/gpu_check.sh             # from any directory
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# The Python used is $PYTHON, else ./.venv/bin/python, else python3: the first that has a
# CUDA build of torch, triton and pytest. If none has, ./.venv is created (or completed) with
# `pip install -e .[dev]`, which needs a package index. Exit status: 0 when every step passed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
mkdir -p benchmarks/results
STAMP=$(date +%Y%m%d-%H%M%S)
LOG="benchmarks/results/gpu-check-${STAMP}.txt"
SUMMARY=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

has_gpu_stack() {  # $1 = a python: torch with CUDA and a visible GPU, triton, pytest
    [ -n "$1" ] && command -v "$1" >/dev/null 2>&1 &&
        "$1" -c "import torch, triton, pytest, hypothesis; assert torch.cuda.is_available()" >/dev/null 2>&1
}

PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3; do
    if has_gpu_stack "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
    say "no Python with CUDA torch + triton + pytest found: installing into .venv"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q -e ".[dev]" 2>&1 | tee -a "$LOG"
    PY=.venv/bin/python
    if ! has_gpu_stack "$PY"; then
        say "FAIL: still no CUDA GPU visible to torch (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))"
        exit 2
    fi
fi
if ! "$PY" -c "import minipt.kernels" >/dev/null 2>&1; then
    # minipt.kernels exists only once installed (kernels/ is mapped onto it); no index needed.
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee -a "$LOG"
fi

{
    echo "minipt GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if git rev-parse --short HEAD >/dev/null 2>&1; then
        echo "commit:  $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- || echo ' (with local changes)')"
    fi
    echo "gpu:     $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    "$PY" - <<'EOF'
import sys, torch, triton
major, minor = torch.cuda.get_device_capability()
print(f"python:  {sys.version.split()[0]}")
print(f"torch:   {torch.__version__} (CUDA {torch.version.cuda})")
print(f"triton:  {triton.__version__}")
print(f"device:  {torch.cuda.get_device_name()} (sm_{major}{minor})")
EOF
    echo
} 2>&1 | tee -a "$LOG"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, record PASS/FAIL
    local name=$1 limit=$2
    shift 2
    say "=== ${name} (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    local verdict=PASS
    if [ "$rc" -eq 124 ]; then verdict="FAIL (timed out)"; elif [ "$rc" -ne 0 ]; then verdict="FAIL (exit $rc)"; fi
    [ "$verdict" = PASS ] || FAILED=1
    SUMMARY+=("$(printf '%-28s %-18s %4ss' "$name" "$verdict" "$took")")
    say ""
}

# TRITON_INTERPRET must be unset: the point is the compiled kernels.
unset TRITON_INTERPRET
step "gpu-marked tests" 150 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
step "kernel tests on the GPU" 150 "$PY" -m pytest -m "not gpu" -q -p no:cacheprovider \
    tests/test_prompt_concat.py tests/test_prompt_concat_errors.py tests/test_kernel_compile.py
if [ -f benchmarks/bench_prompt_concat.py ]; then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    step "kernel benchmark" 120 "$PY" benchmarks/bench_prompt_concat.py ${BENCH_ARGS:-}
else
    SUMMARY+=("$(printf '%-28s %-18s' "kernel benchmark" "skipped (no benchmarks/bench_prompt_concat.py)")")
fi

{
    echo "=== summary"
    printf '%s\n' "${SUMMARY[@]}"
    echo "log: $LOG"
} | tee -a "$LOG"
exit "$FAILED"
