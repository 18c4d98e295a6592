"""The benchmark scripts (kernel, training step, memory) run on their smallest CPU setting, so they cannot rot.

Their figures are not checked (speed claims come from the scripts' own runs, never from tests); what is checked
is that each script runs, writes the CSV the notebooks and the README read, and that the PEFT comparison scores
the same positions as minipt (the same first-step loss with the same weights).
"""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(name, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU providers need no Triton
    done = subprocess.run(
        [sys.executable, str(BENCH / name), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def read_rows(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#")  # the command that made the file
    return list(csv.DictReader(line for line in lines if not line.startswith("#")))


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no benchmark runs at import
    return module


@pytest.mark.slow
def test_bench_prompt_concat_smoke(tmp_path):
    bench = load("bench_prompt_concat")
    out = tmp_path / "prompt_concat-cpu.csv"
    stdout = run_script("bench_prompt_concat.py", "--smoke", "--out", str(out))
    assert "Triton figures need a GPU" in stdout
    rows = read_rows(out)
    assert list(rows[0]) == list(bench.COLUMNS)
    # one shape, fp32, three modes, the CPU providers without torch.compile
    assert [(r["mode"], r["provider"]) for r in rows] == [
        (m, p) for m in ("fwd", "bwd", "fwd+bwd") for p in ("eager", "reference", "copy")
    ]
    for r in rows:
        assert r["device"] == "cpu" and r["device_name"] and r["torch"] and r["date"]
        assert (r["B"], r["n"], r["n_p"], r["D"], r["dtype"]) == ("2", "16", "4", "64", "float32")
        assert float(r["ms_q20"]) <= float(r["ms"]) <= float(r["ms_q80"])
        # GB/s is the bytes model over the median time, and the copy is the roof's own reference
        assert float(r["gbps"]) == pytest.approx(int(r["bytes"]) / (float(r["ms"]) * 1e-3) / 1e9, rel=1e-2)
        if r["provider"] == "copy":
            assert float(r["frac_of_copy"]) == pytest.approx(1.0, abs=1e-3)
        if r["provider"] == "eager":
            assert float(r["speedup_vs_eager"]) == pytest.approx(1.0, abs=1e-3)
    fwd = next(r for r in rows if r["mode"] == "fwd" and r["provider"] == "eager")
    B, n, n_p, D, s = 2, 16, 4, 64, 4
    T = n_p + n
    assert int(fwd["bytes"]) == B * n * D * s + B * T * D * s + n_p * D * 4 + T * D * s + B * n * 8
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.fixture(scope="module")
def train_step_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "train_step-cpu.csv"
    stdout = run_script("bench_train_step.py", "--smoke", "--out", str(out))
    return stdout, read_rows(out)


@pytest.mark.slow
def test_bench_train_step_smoke(train_step_rows):
    bench = load("bench_train_step")
    stdout, rows = train_step_rows
    assert "fused-kernel row skipped" in stdout  # the CPU has no Triton row
    assert list(rows[0]) == list(bench.COLUMNS)
    by = {r["config"]: r for r in rows}
    assert list(by)[:2] == [bench.PT_REF, bench.FULL]
    for r in rows:
        assert r["preset"] == "nano" and r["threads"] == "2" and r["device"] and r["date"]
        assert float(r["ms_q20"]) <= float(r["ms_per_step"]) <= float(r["ms_q80"])
        tokens = int(r["batch_size"]) * int(r["seq_len"])
        assert float(r["tokens_per_s"]) == pytest.approx(tokens / (float(r["ms_per_step"]) * 1e-3), rel=1e-2)
        assert int(r["peak_bytes"]) > 0


@pytest.mark.slow
def test_bench_train_step_peft_scores_the_same_positions(train_step_rows):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    bench = load("bench_train_step")
    stdout, rows = train_step_rows
    by = {r["config"]: r for r in rows}
    peft_row, ours = by[bench.PEFT], by[bench.PT_REF]
    # same weights, same prompt, same scored positions: the same first-step loss
    assert abs(float(peft_row["loss"]) - float(ours["loss"])) <= 1e-4
    assert float(peft_row["loss_diff"]) <= 1e-4
    assert float(peft_row["ratio_to_peft"]) == pytest.approx(1.0)
    assert float(ours["ratio_to_peft"]) == pytest.approx(
        float(ours["tokens_per_s"]) / float(peft_row["tokens_per_s"]), rel=1e-2
    )
    assert "(ok, tolerance 1e-4)" in stdout


def test_hf_weight_copy_gives_minipt_logits():
    """The HF model the train-step benchmark compares with computes minipt's logits (Conv1D weights transposed)."""
    pytest.importorskip("transformers")
    import torch

    from minipt import GPT, GPTConfig
    from minipt.hf import to_hf

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("nano")).eval()
    hf = to_hf(model, activation="gelu_pytorch_tanh").eval()
    idx = torch.randint(model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(input_ids=idx).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_bench_prompt_concat_gpu_bookkeeping_with_a_fake_timer(monkeypatch):
    """The GPU branch (providers, CUDA-graph rows, roofs and speedups per timer) on CPU tensors, with a fake
    timer and the Triton launchers under the interpreter: what can be checked without a GPU."""
    import torch

    from minipt.kernels.prompt_concat import TRITON_INTERPRET

    if not TRITON_INTERPRET:
        pytest.skip("needs the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest without a GPU)")
    bench = load("bench_prompt_concat")

    def fake_timer(fn, grad_to_none, graph=False):
        fn()  # every timed function runs
        return (1e-4, 0.5e-4, 1.5e-4) if graph else (2e-4, 1.5e-4, 2.5e-4)  # ms: tiny work, readable GB/s

    monkeypatch.setattr(bench, "time_gpu", fake_timer)
    args = bench.parse_args(["--cudagraph-below", "16"])
    providers = ["eager", "triton", "triton op", "copy"]
    case = bench.Case(2, 4, 2, 16, torch.float32, "cpu", None)
    for p in providers:
        case.check(p)  # the kernels agree with the eager chain
    results = bench.measure_case(case, providers, list(bench.MODES), args, "cuda")
    rows = bench.rows_for(case, results, list(bench.MODES), {})
    by = {(r["provider"], r["mode"]): r for r in rows}
    graph_rows = {key for key in by if key[0].endswith("(graph)")}
    assert graph_rows == {(p + " (graph)", m) for p in ("triton", "copy") for m in bench.MODES} | {
        ("eager (graph)", "fwd")
    }  # never the op (its id check syncs) nor autograd's backward
    assert all(by[key]["timer"] == "do_bench_cudagraph" for key in graph_rows)
    assert by[("triton", "fwd")]["timer"] == "do_bench"
    for (p, m), r in by.items():
        roof = by[("copy (graph)" if p.endswith("(graph)") else "copy", m)]  # ratios never mix timers
        assert float(r["frac_of_copy"]) == pytest.approx(float(r["gbps"]) / float(roof["gbps"]), rel=1e-2)
    assert by[("triton (graph)", "fwd")]["speedup_vs_eager"] == "1.000"  # against eager (graph)
    assert by[("triton (graph)", "bwd")]["speedup_vs_eager"] == ""  # no eager (graph) backward
    assert int(by[("triton", "bwd")]["bytes"]) == 2 * 2 * 16 * 4 + 2 * 16 * 4  # B n_p D s + n_p D 4


def test_bench_memory_smallest_setting(tmp_path):
    out = tmp_path / "memory.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        str(BENCH / "bench_memory.py"),
        "--preset",
        "nano",
        "--batch-size",
        "1",
        "--seq-len",
        "8",
        "--n-prompt",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(line for line in out.read_text().splitlines() if not line.startswith("#")))
    configs = [r["config"] for r in rows]
    assert configs == [
        "full fine-tuning",
        "naive prompt tuning",
        "minipt prompt tuning",
        "minipt prompt tuning, recompute",
        "minipt P-tuning v2 (deep prefix)",
    ]
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
