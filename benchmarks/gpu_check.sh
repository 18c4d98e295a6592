#!/usr/bin/env bash
# The GPU check: every figure the issues ask of a GPU, in one run of under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from any directory
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere, no GPU: does every step's command line parse?
#   bash benchmarks/gpu_check.sh --summary DIR [SINCE]   # the goals table from the CSVs in DIR
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#   GPU_CHECK_ONLY='kernel benchmark|serve' bash benchmarks/gpu_check.sh   # only the steps whose name matches (grep -E)
#
# Steps, in order of importance, each under its own time limit, all within GPU_CHECK_BUDGET seconds (460 by
# default, setup included; a step that would start with too little time left is NOT RUN):
#   gpu tests          pytest -m gpu on the test files with gpu tests: the compiled kernels and every autotune
#                      config against the reference, no host sync in the op, the device-side id check
#   config sweep       bench_prompt_concat.py --sweep-configs: every autotune config's GB/s, small grid, fp32 and
#                      bf16   -> benchmarks/results/prompt_concat_configs-<gpu>.csv
#   kernel benchmark   bench_prompt_concat.py --grid small, fp32 and bf16   -> prompt_concat-<gpu>.csv / .png
#   train step ...     bench_train_step.py --device cuda, presets tiny and gpt2, then again with --recompute
#                      -> train_step-cuda.csv, train_step-cuda-recompute.csv
#   memory             bench_memory.py --device cuda --preset gpt2 (with its recompute rows) -> memory-cuda.csv
#   serve              bench_serve.py --device cuda, when that file exists
# then one table of the goals (measured against the goal: PASS, FAIL or NOT RUN), read back from the CSVs this
# run wrote. Everything is logged to benchmarks/results/gpu-check-<date>.txt.
#
# Python: $PYTHON, else python3, else ./.venv/bin/python: the first with torch (a CUDA build with a visible GPU,
# except for --dry-run), triton, pytest and hypothesis. Nothing is installed and nothing is downloaded (the GPU
# machine has no network): the working tree is used as it is, through an import shim. pyproject.toml maps
# kernels/ onto minipt.kernels (package-dir), which only an installed copy of minipt knows about; instead of
# `pip install -e .` (which needs setuptools and a writable site-packages), every Python this script starts gets
# a temporary directory on PYTHONPATH with a sitecustomize.py that puts a finder first on sys.meta_path mapping
# minipt -> ./minipt and minipt.kernels -> ./kernels (and then runs any sitecustomize it shadows).
#
# --dry-run runs no step: for each, it checks the command line, with `pytest --collect-only` for the tests and
# `SCRIPT ARGS --parse-only` for the benchmarks (every benchmark must accept --parse-only: check its arguments as
# a real run would, then exit 0 without touching a device or writing a file), and prints one line per step,
# `dry-run | NAME | ok` or `dry-run | NAME | FAIL (exit N)`, then the goals table (all NOT RUN).
#
# Exit status: 0 when every step passed and every goal was met, 1 when a step failed (or, with --dry-run, did
# not parse), 2 when no usable Python was found, 3 when the steps passed but a goal was missed or not measured.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
MODE=run
case "${1:-}" in
    --dry-run) MODE=dry ;;
    --summary) MODE=summary ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --summary DIR [SINCE]]" >&2; exit 2 ;;
esac
RESULTS=benchmarks/results
BUDGET=${GPU_CHECK_BUDGET:-460}
START_EPOCH=$(date +%s)

# ---- the goals table ----------------------------------------------------------------------------------------
goals_table() {  # goals_table DIR SINCE_EPOCH: read the CSVs of this run in DIR, print measured vs goal
    "$PY" - "$1" "$2" <<'EOF'
"""The issue's goals on the GPU, measured against the goal, from the CSVs a gpu_check run wrote.

A figure counts only if this run wrote it: rows whose `date` (or, for CSVs without one, the file's mtime) is not
older than the run's start. Anything else is NOT RUN.
"""
import csv
import datetime
import glob
import os
import sys

results, since = sys.argv[1], float(sys.argv[2])


def rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rs = list(csv.DictReader(line for line in f if not line.startswith("#")))
    fresh_file = os.path.getmtime(path) >= since - 1
    def fresh(r):
        if r.get("date"):
            when = datetime.datetime.strptime(r["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
            return when.timestamp() >= since - 1
        return fresh_file
    return [r for r in rs if fresh(r)]


table = []  # (goal, measured, target, verdict)


def goal(name, value, target, ok, fmt):
    if value is None:
        table.append((name, "-", target, "NOT RUN"))
    else:
        table.append((name, fmt.format(value), target, "PASS" if ok(value) else "FAIL"))


# The fused kernel ("triton": the launchers with the autotuned config, timed with do_bench) at the largest
# shape of the small grid, per dtype; its fraction of the copy's bandwidth and its speedup over eager.
kernel = [r for path in sorted(glob.glob(os.path.join(results, "prompt_concat-*.csv")))
          if not path.endswith("-cpu.csv") for r in rows(path) if r["provider"] == "triton"]
for dtype in ("float32", "bfloat16"):
    for mode, label in (("fwd", "forward"), ("bwd", "backward")):
        sel = [r for r in kernel if r["mode"] == mode and r["dtype"] == dtype]
        r = max(sel, key=lambda r: int(r["bytes"])) if sel else None
        where = f"B={r['B']} n={r['n']} n_p={r['n_p']} D={r['D']}" if r else "largest small-grid shape"
        frac = float(r["frac_of_copy"]) if r and r["frac_of_copy"] else None
        need = 0.80 if mode == "fwd" else 0.70
        goal(f"fused {label} / copy bandwidth, {dtype}, {where}", frac, f">= {need:.0%}", lambda v: v >= need,
             "{:.1%}")
        if mode == "fwd":
            speed = float(r["speedup_vs_eager"]) if r and r["speedup_vs_eager"] else None
            goal(f"fused forward vs eager, {dtype}, {where}", speed, ">= 2.00x", lambda v: v >= 2.0, "{:.2f}x")

# The prompt-tuning train step against PEFT's, tokens per second (the fused-kernel row, else the reference).
for suffix, label in (("", ""), ("-recompute", ", recompute")):
    step_rows = rows(os.path.join(results, f"train_step-cuda{suffix}.csv"))
    for preset in ("tiny", "gpt2"):
        ours = [r for r in step_rows if r["preset"] == preset and r["config"].startswith("minipt prompt tuning")
                and r["ratio_to_peft"]]
        ours.sort(key=lambda r: "fused" not in r["config"])
        ratio = float(ours[0]["ratio_to_peft"]) if ours else None
        goal(f"train step {preset}{label}: minipt / PEFT tokens/s", ratio, "> 1.00x", lambda v: v > 1.0, "{:.2f}x")

# Peak memory of a prompt-tuning step against full fine-tuning (torch.cuda.max_memory_allocated).
memory = [r for r in rows(os.path.join(results, "memory-cuda.csv")) if r["preset"] == "gpt2"]
for config in ("minipt prompt tuning", "minipt prompt tuning, recompute"):
    r = next((r for r in memory if r["config"] == config), None)
    ratio = float(r["peak_bytes_ratio"]) if r and r["peak_bytes_ratio"] else None
    goal(f"peak memory, gpt2: {config} / full fine-tuning", ratio, "<= 0.40x", lambda v: v <= 0.40, "{:.3f}x")

widths = [max(len(row[i]) for row in table + [("goal", "measured", "goal", "verdict")]) for i in range(4)]
print("=== goals")
for row in [("goal", "measured", "target", "verdict")] + table:
    print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
verdicts = [row[3] for row in table]
print(f"goals: {verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, {verdicts.count('NOT RUN')} NOT RUN")
sys.exit(0 if all(v == "PASS" for v in verdicts) else 3)
EOF
}

# ---- Python and the import shim -----------------------------------------------------------------------------
has_stack() {  # has_stack PYTHON: torch (with a visible GPU, except for a dry run), triton, pytest, hypothesis
    local need_gpu="assert torch.cuda.is_available()"
    [ "$MODE" = run ] || need_gpu="pass"
    [ -n "$1" ] && command -v "$1" >/dev/null 2>&1 &&
        "$1" -c "import torch, triton, pytest, hypothesis; $need_gpu" >/dev/null 2>&1
}

PY=""
if [ "$MODE" = summary ]; then
    PY=${PYTHON:-python3}  # the table needs only the standard library
    goals_table "${2:-$RESULTS}" "${3:-0}"
    exit $?
fi
for candidate in "${PYTHON:-}" python3 .venv/bin/python; do
    if has_stack "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
    echo "no Python with torch, triton, pytest and hypothesis$([ "$MODE" = run ] && echo ' and a visible CUDA GPU') " \
         "(tried \$PYTHON, python3, .venv/bin/python); nvidia-smi: $(nvidia-smi -L 2>&1 | head -1)" >&2
    exit 2
fi

SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
cat >"$SHIM/sitecustomize.py" <<'EOF'
"""minipt from the working tree named by MINIPT_WORKING_TREE, without installing it (written by gpu_check.sh).

pyproject.toml installs kernels/ as minipt.kernels (package-dir); an uninstalled tree has no such mapping, so a
finder placed first on sys.meta_path resolves minipt -> <tree>/minipt and minipt.kernels -> <tree>/kernels.
Any sitecustomize this file shadows on sys.path still runs, after it.
"""
import importlib.machinery
import importlib.util
import os
import sys

_tree = os.environ.get("MINIPT_WORKING_TREE")
_packages = {"minipt": "minipt", "minipt.kernels": "kernels"}


class WorkingTreeFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if _tree is None or name not in _packages:
            return None
        folder = os.path.join(_tree, _packages[name])
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


sys.meta_path.insert(0, WorkingTreeFinder)
_here = os.path.dirname(os.path.abspath(__file__))
_other = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
if _other is not None and _other.loader is not None:
    _other.loader.exec_module(importlib.util.module_from_spec(_other))
EOF
export MINIPT_WORKING_TREE="$ROOT"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing is downloaded: models are built from random weights
if [ "$MODE" = run ]; then
    mkdir -p "$RESULTS"
    LOG="$RESULTS/gpu-check-$(date +%Y%m%d-%H%M%S).txt"
    unset TRITON_INTERPRET  # the point is the compiled kernels
else
    LOG=/dev/null
fi
say() { echo "$*" | tee -a "$LOG"; }

# The versions, and where minipt.kernels comes from: this tree's kernels/, through the shim, or the check stops.
INFO=$("$PY" - 2>&1 <<'EOF'
import sys, torch, triton
print(f"python:  {sys.executable} {sys.version.split()[0]}")
print(f"torch:   {torch.__version__} (CUDA {torch.version.cuda})")
print(f"triton:  {triton.__version__}")
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"device:  {torch.cuda.get_device_name()} (sm_{major}{minor})")
import minipt.kernels
print(minipt.kernels.__file__)
EOF
)
KERNELS_FILE=$(echo "$INFO" | tail -1)
{
    echo "minipt GPU check$([ "$MODE" = dry ] && echo ' (dry run: nothing runs, every command line is checked)'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if git rev-parse --short HEAD >/dev/null 2>&1; then
        echo "commit:  $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- 2>/dev/null || echo ' (with local changes)')"
    fi
    [ "$MODE" = run ] && echo "gpu:     $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    echo "$INFO" | sed '$d'
    echo "minipt:  $ROOT/minipt, minipt.kernels: $KERNELS_FILE (import shim)"
    echo "budget:  ${BUDGET}s"
    echo
} 2>&1 | tee -a "$LOG"
if [ "$KERNELS_FILE" != "$ROOT/kernels/__init__.py" ]; then
    say "FAIL: the import shim did not map minipt.kernels onto kernels/ (got: $KERNELS_FILE)"
    exit 2
fi

# ---- the steps ----------------------------------------------------------------------------------------------
SUMMARY=()
FAILED=0
step() {  # step NAME LIMIT (pytest ARGS... | SCRIPT ARGS...): run it under its limit (dry run: check it parses)
    local name=$1 limit=$2 kind=$3
    shift 3
    if [ -n "${GPU_CHECK_ONLY:-}" ] && ! echo "$name" | grep -Eq "$GPU_CHECK_ONLY"; then
        SUMMARY+=("$(printf '%-28s %-24s' "$name" "NOT RUN (not in GPU_CHECK_ONLY)")")
        return
    fi
    local cmd
    if [ "$kind" = pytest ]; then
        cmd=("$PY" -m pytest "$@")
    else
        if [ ! -f "$kind" ]; then
            SUMMARY+=("$(printf '%-28s %-24s' "$name" "NOT RUN (no $kind)")")
            [ "$MODE" = dry ] && say "dry-run | $name | skipped (no $kind)"
            return
        fi
        cmd=("$PY" "$kind" "$@")
    fi
    if [ "$MODE" = dry ]; then
        local check
        if [ "$kind" = pytest ]; then check=("${cmd[@]:0:3}" --collect-only -q "${cmd[@]:3}"); else check=("${cmd[@]}" --parse-only); fi
        local out rc
        out=$(timeout 120 "${check[@]}" 2>&1)
        rc=$?
        if [ "$rc" -eq 0 ]; then say "dry-run | $name | ok | ${check[*]}"; else
            say "dry-run | $name | FAIL (exit $rc) | ${check[*]}"
            echo "$out" | tail -5 | sed 's/^/    /'
            FAILED=1
        fi
        return
    fi
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 15 ]; then
        SUMMARY+=("$(printf '%-28s %-24s' "$name" "NOT RUN (no time left)")")
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "=== ${name} (limit ${limit}s): ${cmd[*]}"
    local start=$SECONDS
    timeout -k 5 "$limit" "${cmd[@]}" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local verdict=PASS
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="FAIL (timed out)"; elif [ "$rc" -ne 0 ]; then verdict="FAIL (exit $rc)"; fi
    [ "$verdict" = PASS ] || FAILED=1
    SUMMARY+=("$(printf '%-28s %-24s %4ss' "$name" "$verdict" "$((SECONDS - start))")")
    say ""
}

B=benchmarks
# The test files that hold gpu-marked tests (a module that fails to import elsewhere cannot stop these).
mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
step "gpu tests" 100 pytest -m gpu -q -rs -p no:cacheprovider "${GPU_TEST_FILES[@]}"
step "config sweep" 75 $B/bench_prompt_concat.py --device cuda --sweep-configs --grid small --dtypes float32,bfloat16
step "kernel benchmark" 110 $B/bench_prompt_concat.py --device cuda --grid small --dtypes float32,bfloat16
step "train step, tiny" 50 $B/bench_train_step.py --device cuda --preset tiny --steps 20 --no-memory \
    --out $RESULTS/train_step-cuda.csv
step "train step, gpt2" 70 $B/bench_train_step.py --device cuda --preset gpt2 --steps 20 --no-memory \
    --out $RESULTS/train_step-cuda.csv
step "memory, gpt2" 120 $B/bench_memory.py --device cuda --preset gpt2 --out $RESULTS/memory-cuda.csv
step "train step, tiny, recompute" 50 $B/bench_train_step.py --device cuda --preset tiny --steps 20 --no-memory \
    --recompute --out $RESULTS/train_step-cuda-recompute.csv
step "train step, gpt2, recompute" 70 $B/bench_train_step.py --device cuda --preset gpt2 --steps 20 --no-memory \
    --recompute --out $RESULTS/train_step-cuda-recompute.csv
step "serve" 90 $B/bench_serve.py --device cuda

# ---- the summary --------------------------------------------------------------------------------------------
{
    if [ "$MODE" = run ]; then
        echo "=== steps"
        printf '%s\n' "${SUMMARY[@]}"
        echo
    fi
    goals_table "$RESULTS" "$START_EPOCH"
    GOALS=$?
    echo
    [ "$MODE" = run ] && echo "log: $LOG ($SECONDS s in all)"
    if [ "$FAILED" -ne 0 ]; then exit 1; elif [ "$MODE" = run ] && [ "$GOALS" -ne 0 ]; then exit 3; fi
    exit 0
} 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
