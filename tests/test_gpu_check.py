"""benchmarks/gpu_check.sh without a GPU: its dry run, its import shim, its goals table, and the config sweep.

The GPU check runs on a machine lent for minutes, so everything that can go wrong before the GPU is reached is
checked here: every step's command line must parse (the dry run: `pytest --collect-only` for the tests,
`SCRIPT ARGS --parse-only` for each benchmark), the working tree must import without being installed, and the
goals table must read the CSVs the steps write and tell PASS, FAIL and NOT RUN apart.
"""

import csv
import datetime
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
# The steps of a GPU check, in order. Each benchmark step runs `python SCRIPT ARGS`, and the dry run runs
# `python SCRIPT ARGS --parse-only`: every benchmark must accept --parse-only (check its arguments as a real run
# would, exit 0, touch no device and write no file).
STEPS = [
    "gpu tests",
    "config sweep",
    "kernel benchmark",
    "train step, tiny",
    "train step, gpt2",
    "memory, gpt2",
    "train step, tiny, recompute",
    "train step, gpt2, recompute",
    "serve",
]


def run_check(*args, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


def results_files():
    return {(p, p.stat().st_mtime) for p in (ROOT / "benchmarks" / "results").iterdir()}


def test_dry_run_every_step_parses():
    """One dry run (about 20 s of CPU: it imports torch once per step): every step's command line parses,
    nothing runs and nothing is written, and the goals table comes out all NOT RUN.

    A step that fails here says which flag its script lacks; every benchmark must accept --parse-only.
    """
    before = results_files()
    done = run_check("--dry-run")
    lines = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("dry-run | ")]
    assert [fields[1] for fields in lines] == STEPS, done.stdout + done.stderr
    verdicts = {fields[1]: fields[2] for fields in lines}
    expected = dict.fromkeys(STEPS, "ok")
    if not (ROOT / "benchmarks" / "bench_serve.py").exists():
        expected["serve"] = "skipped (no benchmarks/bench_serve.py)"
    failed = "\n".join(" | ".join(fields) for fields in lines if verdicts[fields[1]] != expected[fields[1]])
    assert verdicts == expected, f"steps whose command line does not parse:\n{failed}\n\n{done.stdout[-4000:]}"
    assert done.returncode == 0, done.stdout + done.stderr
    commands = {fields[1]: fields[3] for fields in lines if len(fields) > 3}
    assert "--collect-only" in commands["gpu tests"] and "-m gpu" in commands["gpu tests"]
    for name, command in commands.items():
        if name != "gpu tests":
            assert command.endswith("--parse-only") and "--device cuda" in command, (name, command)

    assert results_files() == before, "the dry run wrote to benchmarks/results"
    assert f"minipt.kernels: {ROOT}/kernels/__init__.py (import shim)" in done.stdout
    goals = [
        line
        for line in done.stdout.splitlines()
        if line.rstrip().endswith(("NOT RUN", "PASS", "FAIL")) and not line.startswith(("dry-run", "goals:"))
    ]
    assert len(goals) == 12 and all(line.rstrip().endswith("NOT RUN") for line in goals), done.stdout
    assert "goals: 0 PASS, 0 FAIL, 12 NOT RUN" in done.stdout


def shim_source():
    """The sitecustomize.py that gpu_check.sh writes, read out of the script."""
    text = SCRIPT.read_text()
    match = re.search(r"cat >\"\$SHIM/sitecustomize.py\" <<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert match, "gpu_check.sh no longer writes its sitecustomize.py the way this test reads it"
    return match.group(1)


def test_import_shim_maps_the_working_tree_without_an_install(tmp_path):
    """minipt.kernels comes from kernels/ even with any installed minipt taken off the import path, and a
    sitecustomize the shim shadows still runs."""
    shim, other = tmp_path / "shim", tmp_path / "other"
    shim.mkdir()
    other.mkdir()
    (shim / "sitecustomize.py").write_text(shim_source())
    (other / "sitecustomize.py").write_text("import os\nos.environ['SHADOWED_SITECUSTOMIZE_RAN'] = '1'\n")
    code = f"""
import os, sys
assert sys.meta_path[0].__name__ == "WorkingTreeFinder", sys.meta_path
assert os.environ.get("SHADOWED_SITECUSTOMIZE_RAN") == "1"
sys.meta_path[1:] = [f for f in sys.meta_path[1:] if "editable" not in repr(f).lower()]  # no installed minipt
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != {str(ROOT)!r}]
import minipt.kernels
from minipt.kernels import prompt_concat
assert minipt.kernels.__file__ == os.path.join({str(ROOT)!r}, "kernels", "__init__.py"), minipt.kernels.__file__
assert minipt.__file__ == os.path.join({str(ROOT)!r}, "minipt", "__init__.py"), minipt.__file__
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{other}", "MINIPT_WORKING_TREE": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def write_csv(path, rows, comment="# written by the test"):
    with open(path, "w", newline="") as f:
        f.write(comment + "\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_goals_table_reads_this_runs_csvs(tmp_path):
    since = time.time()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    old = "2020-01-01T00:00:00Z"  # a row from an earlier run: ignored

    def kernel(mode, dtype, nbytes, frac, speedup, date=now, provider="triton"):
        return dict(
            provider=provider,
            mode=mode,
            dtype=dtype,
            B=32,
            n=2048,
            n_p=100,
            D=4096,
            bytes=nbytes,
            frac_of_copy=frac,
            speedup_vs_eager=speedup,
            date=date,
        )

    write_csv(
        tmp_path / "prompt_concat-nvidia-h200.csv",
        [
            kernel("fwd", "float32", 10, "0.10", "0.5"),  # a smaller shape: not the one judged
            kernel("fwd", "float32", 99, "0.85", "2.4"),
            kernel("fwd", "float32", 999, "0.99", "9.9", date=old),
            kernel("fwd", "float32", 999, "0.99", "9.9", provider="triton op"),
            kernel("bwd", "float32", 50, "0.65", ""),
            kernel("fwd", "bfloat16", 99, "0.79", "2.0"),
            kernel("bwd", "bfloat16", 50, "0.71", ""),
        ],
    )
    step = dict(preset="tiny", config="", ratio_to_peft="", date=now)
    write_csv(
        tmp_path / "train_step-cuda.csv",
        [
            {**step, "config": "minipt prompt tuning (reference concat)", "ratio_to_peft": "0.9"},
            {**step, "config": "minipt prompt tuning (fused kernel)", "ratio_to_peft": "1.3"},
            {**step, "config": "HF GPT-2 + PEFT prompt tuning", "ratio_to_peft": "1.000"},
            {**step, "preset": "gpt2", "config": "minipt prompt tuning (fused kernel)", "ratio_to_peft": "0.95"},
        ],
    )
    write_csv(
        tmp_path / "memory-cuda.csv",
        [
            dict(preset="gpt2", config="full fine-tuning", peak_bytes_ratio="1.0000"),
            dict(preset="gpt2", config="minipt prompt tuning", peak_bytes_ratio="0.3500"),
            dict(preset="gpt2", config="minipt prompt tuning, recompute", peak_bytes_ratio="0.4100"),
        ],
    )
    done = run_check("--summary", str(tmp_path), str(since))
    assert done.returncode == 3, done.stdout + done.stderr  # a goal missed
    verdicts = {}
    for line in done.stdout.splitlines():
        match = re.match(r"(.+?)\s{2,}(\S+)\s{2,}(.+?)\s{2,}(PASS|FAIL|NOT RUN)$", line.rstrip())
        if match:
            verdicts[match.group(1)] = (match.group(2), match.group(4))
    where = "B=32 n=2048 n_p=100 D=4096"
    assert verdicts == {
        f"fused forward / copy bandwidth, float32, {where}": ("85.0%", "PASS"),
        f"fused forward vs eager, float32, {where}": ("2.40x", "PASS"),
        f"fused backward / copy bandwidth, float32, {where}": ("65.0%", "FAIL"),
        f"fused forward / copy bandwidth, bfloat16, {where}": ("79.0%", "FAIL"),
        f"fused forward vs eager, bfloat16, {where}": ("2.00x", "PASS"),
        f"fused backward / copy bandwidth, bfloat16, {where}": ("71.0%", "PASS"),
        "train step tiny: minipt / PEFT tokens/s": ("1.30x", "PASS"),  # the fused-kernel row
        "train step gpt2: minipt / PEFT tokens/s": ("0.95x", "FAIL"),
        "train step tiny, recompute: minipt / PEFT tokens/s": ("-", "NOT RUN"),
        "train step gpt2, recompute: minipt / PEFT tokens/s": ("-", "NOT RUN"),
        "peak memory, gpt2: minipt prompt tuning / full fine-tuning": ("0.350x", "PASS"),
        "peak memory, gpt2: minipt prompt tuning, recompute / full fine-tuning": ("0.410x", "FAIL"),
    }, done.stdout
    assert "goals: 6 PASS, 4 FAIL, 2 NOT RUN" in done.stdout
    # CSVs from before the run's start count as NOT RUN (here: all of them)
    stale = run_check("--summary", str(tmp_path), str(time.time() + 3600))
    assert "goals: 0 PASS, 0 FAIL, 12 NOT RUN" in stale.stdout, stale.stdout


def test_config_sweep_bookkeeping_with_a_fake_timer():
    """The sweep's GPU branch on CPU tensors, the kernels under the interpreter and a fake timer: one row per
    config and one for the copy, each config checked against the eager chain first, and exactly one row per
    mode marked as the autotuner's (here the interpreter's fixed) choice."""
    pc = importlib.import_module("minipt.kernels.prompt_concat")
    if not (pc.HAS_TRITON and pc.TRITON_INTERPRET):
        pytest.skip("needs the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest without a GPU)")
    import torch

    spec = importlib.util.spec_from_file_location("bench_prompt_concat", ROOT / "benchmarks" / "bench_prompt_concat.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ran = []

    def fake_timer(fn, grad_to_none):
        ran.append(fn())
        return (2e-3, 1.5e-3, 2.5e-3)

    rows = bench.sweep_rows(pc, [(2, 5, 3, 40)], [torch.float32], ["fwd", "bwd"], "cpu", {"device": "cpu"}, fake_timer)
    names = {"fwd": [pc.config_name(c) for c in pc.FWD_CONFIGS], "bwd": [pc.config_name(c) for c in pc.BWD_CONFIGS]}
    assert [(r["mode"], r["config"]) for r in rows] == [(m, c) for m in ("fwd", "bwd") for c in ["copy", *names[m]]]
    assert len(ran) == len(rows)
    chosen = {m: [r["config"] for r in rows if r["mode"] == m and r["autotuned"] == "yes"] for m in ("fwd", "bwd")}
    assert chosen == {
        "fwd": [pc.config_name(pc.FWD_CONFIGS[pc.FWD_INTERPRETER_CONFIG])],
        "bwd": [pc.config_name(pc.BWD_CONFIGS[pc.BWD_INTERPRETER_CONFIG])],
    }
    B, n, n_p, D = 2, 5, 3, 40
    for r in rows:
        assert set(bench.SWEEP_COLUMNS) >= set(r)
        expected = (
            (2 * 4 * B * (n_p + n) * D if r["mode"] == "fwd" else 2 * 4 * B * n_p * D)
            if r["config"] == "copy"
            else (
                B * n * D * 4 + B * (n + n_p) * D * 4 + n_p * D * 4 + (n + n_p) * D * 4 + B * n * 8
                if r["mode"] == "fwd"
                else B * n_p * D * 4 + n_p * D * 4
            )
        )
        assert int(r["bytes"]) == expected, r
        assert float(r["gbps"]) == pytest.approx(expected / 2e-6 / 1e9, rel=1e-3)
        assert float(r["frac_of_copy"]) == pytest.approx(float(r["gbps"]) / float(r["copy_gbps"]), abs=1e-3)
