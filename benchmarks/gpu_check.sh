#!/usr/bin/env bash
# One check on one GPU, under 8 minutes: the GPU-marked tests, the kernel test files with the
# compiled kernels (no interpreter), the kernel benchmark on its small grid, and the training-step
# benchmark for the tiny and gpt2 presets. Everything goes to a log, with a summary at its end,
# under benchmarks/results/gpu-check-<date>.txt; the benchmarks write
#   benchmarks/results/prompt_concat-<gpu>.csv / .png   (bench_prompt_concat.py --grid small)
#   benchmarks/results/train_step-cuda.csv              (bench_train_step.py --device cuda)
#
#   bash benchmarks/gpu_check.sh             # from any directory
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#   BENCH_ARGS="--grid default" BENCH_LIMIT=900 bash benchmarks/gpu_check.sh   # more shapes, longer
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
# Time limits add up to 8 minutes; each step usually takes well under its limit.
step "gpu-marked tests" 90 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
step "kernel tests on the GPU" 120 "$PY" -m pytest -m "not gpu" -q -p no:cacheprovider \
    tests/test_prompt_concat.py tests/test_prompt_concat_errors.py tests/test_kernel_compile.py
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
step "kernel benchmark" "${BENCH_LIMIT:-150}" "$PY" benchmarks/bench_prompt_concat.py --device cuda ${BENCH_ARGS:---grid small}
step "train step, tiny" 55 "$PY" benchmarks/bench_train_step.py --device cuda --preset tiny --steps 20
step "train step, gpt2" 65 "$PY" benchmarks/bench_train_step.py --device cuda --preset gpt2 --steps 20

# The figures the issue's targets are about, read back from the CSVs just written.
{
    echo "=== figures"
    "$PY" - <<'EOF'
import csv, glob

def rows(path):
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))

for path in sorted(glob.glob("benchmarks/results/prompt_concat-*.csv")):
    if path.endswith("-cpu.csv"):
        continue
    rs = [r for r in rows(path) if r["provider"] == "triton"]
    if not rs:
        continue
    print(f"{path} ({rs[0]['device_name']}): the Triton kernel at the largest shape of each mode and dtype")
    for mode in ("fwd", "bwd", "fwd+bwd"):
        for dtype in sorted({r["dtype"] for r in rs}):
            sel = [r for r in rs if r["mode"] == mode and r["dtype"] == dtype]
            if sel:
                r = max(sel, key=lambda r: int(r["bytes"]))
                print(f"  {mode:8s} {dtype:9s} B={r['B']} n={r['n']} n_p={r['n_p']} D={r['D']}: "
                      f"{float(r['gbps']):8.1f} GB/s = {float(r['frac_of_copy']):.0%} of the copy roof "
                      f"({float(r['copy_gbps']):.0f} GB/s), {r['speedup_vs_eager']}x eager  [{r['timer']}]")
for path in sorted(glob.glob("benchmarks/results/train_step-cuda.csv")):
    print(f"{path}: tokens/s per row")
    for r in rows(path):
        ratio = f" ({r['ratio_to_peft']}x PEFT)" if r["ratio_to_peft"] else ""
        print(f"  {r['preset']:5s} {r['config']:42s} {float(r['tokens_per_s']):12,.0f} tokens/s{ratio}")
EOF
} 2>&1 | tee -a "$LOG"

{
    echo "=== summary"
    printf '%s\n' "${SUMMARY[@]}"
    echo "log: $LOG"
} | tee -a "$LOG"
exit "$FAILED"
