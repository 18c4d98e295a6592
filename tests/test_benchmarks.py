"""Benchmark scripts run on their smallest CPU setting, so they cannot rot (their figures are not checked)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_memory_smallest_setting(tmp_path):
    out = tmp_path / "memory.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--preset", "nano", "--batch-size", "1",
           "--seq-len", "8", "--n-prompt", "2", "--steps", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(line for line in out.read_text().splitlines() if not line.startswith("#")))
    configs = [r["config"] for r in rows]
    assert configs == ["full fine-tuning", "naive prompt tuning", "minipt prompt tuning", "minipt prompt tuning, recompute",
                       "minipt P-tuning v2 (deep prefix)"]
    by = {r["config"]: r for r in rows}
    # Only the prompt trains in both prompt-tuning rows; only minipt's frees the weight gradients.
    assert int(by["naive prompt tuning"]["trainable_params"]) == int(by["minipt prompt tuning"]["trainable_params"])
    assert int(by["minipt prompt tuning"]["gradient_bytes"]) < int(by["naive prompt tuning"]["gradient_bytes"])
    assert int(by["minipt prompt tuning"]["saved_bytes"]) < int(by["naive prompt tuning"]["saved_bytes"])
    # recomputing the frozen blocks keeps only their inputs
    assert int(by["minipt prompt tuning, recompute"]["saved_bytes"]) < int(by["minipt prompt tuning"]["saved_bytes"])
    # a deep prefix trains n_layer * 2 keys and values per position: 2 layers of nano, n_prompt 2, D 64
    assert int(by["minipt P-tuning v2 (deep prefix)"]["trainable_params"]) == 2 * 2 * 2 * 64
    assert "full fine-tuning" in done.stdout
