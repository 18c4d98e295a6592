"""Compile every Triton kernel for real GPU targets, without a GPU, and read the PTX.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole NVIDIA
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the bundled ptxas) on the CPU, so
a kernel that would not compile for sm_80 or sm_90 fails here, not on the first GPU run.

The signatures mimic what `@triton.jit` specialises on a GPU: pointers from torch allocations
are 16-byte aligned (`tt.divisibility = 16`), integer arguments carry no hint (the JIT would
mark those divisible by 16, which the ALIGN constexpr already covers for D and the strides).

Under TRITON_INTERPRET=1 (every run without a GPU) Triton's own `@jit` helpers such as `tl.sum`
are interpreter objects that the compiler cannot call, so the compilation runs in a child
process without that variable: this file doubles as the child's script.
"""

import importlib
import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

TARGETS = {"sm80": ("cuda", 80, 32), "sm90": ("cuda", 90, 32)}
TABLE_DTYPES = ["fp32", "fp16", "bf16"]
# The autotuner's configs as (BLOCK_T or BLOCK_B, BLOCK_D, num_warps): plain tuples, read from the
# module here and sent to the child process as JSON.
_pc = importlib.import_module("minipt.kernels.prompt_concat")
FWD_CONFIGS = [tuple(c) for c in _pc.FWD_CONFIG_SPECS]
BWD_CONFIGS = [tuple(c) for c in _pc.BWD_CONFIG_SPECS]


def forward_case(table, prompt="fp32", ids="i64", bank=True, wpe=True, align=16, config=(1, 1024, 4), ones=()):
    """One compilation of the forward kernel; config = (BLOCK_T, BLOCK_D, num_warps)."""
    block_t, block_d, num_warps = config
    signature = {
        "X": f"*{table}",
        "P": f"*{prompt}",
        "PIDX": f"*{ids}",
        "WTE": f"*{table}",
        "IDX": f"*{ids}",
        "WPE": f"*{table}",
        "stride_pk": "i32",
        "stride_pt": "i32",
        "stride_wte": "i32",
        "stride_wpe": "i32",
        "n_rows": "i32",
        "n_p": "i32",
        "n": "i32",
        "D": "i32",
        "K": "i32",
        "V": "i32",
    }
    constexprs = {"IS_BANK": bank, "HAS_WPE": wpe, "ALIGN": align, "BLOCK_T": block_t, "BLOCK_D": block_d}
    constexprs.update({name: 1 for name in ones})  # the JIT turns integer arguments equal to 1 into constants
    return {
        "kernel": "_prompt_concat_fwd_kernel",
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": num_warps,
    }


def backward_case(grad, out="fp32", ids="i64", bank=True, align=16, config=(16, 256, 4), ones=()):
    """One compilation of the backward kernel; config = (BLOCK_B, BLOCK_D, num_warps)."""
    block_b, block_d, num_warps = config
    signature = {"OUT": f"*{out}", "DX": f"*{grad}", "PIDX": f"*{ids}", "B": "i32", "T": "i32", "R": "i32", "D": "i32"}
    constexprs = {"IS_BANK": bank, "ACC_DTYPE": "fp32", "ALIGN": align, "BLOCK_B": block_b, "BLOCK_D": block_d}
    constexprs.update({name: 1 for name in ones})
    return {
        "kernel": "_prompt_concat_bwd_kernel",
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": num_warps,
    }


def compile_case(case, target):
    """Compile one case for `target` (a GPUTarget tuple); return its PTX global memory ops."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module("minipt.kernels.prompt_concat")
    kernel = getattr(module, case["kernel"])
    names = kernel.arg_names
    constexprs = dict(case["constexprs"])
    if "ACC_DTYPE" in constexprs:
        constexprs["ACC_DTYPE"] = tl.str_to_ty(constexprs["ACC_DTYPE"], None)
    signature = dict(case["signature"], **{name: "constexpr" for name in constexprs})
    signature = {name: signature[name] for name in names}  # in the kernel's argument order
    aligned = {(names.index(a),): [["tt.divisibility", 16]] for a, ty in signature.items() if ty.startswith("*")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(src, target=GPUTarget(*target), options={"num_warps": case["num_warps"]})
    ptx = compiled.asm["ptx"]
    return {
        "entry": case["kernel"] in ptx,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "loads": sorted(set(re.findall(r"ld\.global[\w.]*", ptx))),
        "stores": sorted(set(re.findall(r"st\.global[\w.]*", ptx))),
    }


def compile_cases(cases, target):
    """compile_case for each case, in a child process when this one interprets Triton."""
    if not os.environ.get("TRITON_INTERPRET"):
        return [compile_case(case, target) for case in cases]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps({"cases": cases, "target": target})
    result = subprocess.run(
        [sys.executable, __file__], input=payload, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
def test_every_kernel_compiles(target):
    """Both kernels, fp32/fp16/bf16 tables, every constexpr branch, both id dtypes.

    The last two cases are D = n_p = n = B = 1 with one-element blocks: the JIT makes every
    integer argument that equals 1 a compile-time constant, and the kernels must still compile.
    """
    cases = []
    for table in TABLE_DTYPES:
        cases.append(forward_case(table, prompt="fp32", ids="i64", bank=True, wpe=True))
        cases.append(forward_case(table, prompt=table, ids="i32", bank=False, wpe=False, align=1))
        cases.append(backward_case(table, out="fp32", ids="i64", bank=True))
        cases.append(backward_case(table, out=table, ids="i32", bank=False, align=1, config=(1, 256, 4)))
    fwd_ones = ("stride_pk", "stride_pt", "stride_wte", "stride_wpe", "n_rows", "n_p", "n", "D", "K", "V")
    cases.append(forward_case("fp16", align=1, config=(1, 1, 4), ones=fwd_ones))
    cases.append(backward_case("fp16", align=1, config=(1, 1, 4), ones=("B", "R", "D")))
    for case, result in zip(cases, compile_cases(cases, target)):
        assert result["entry"] and result["cubin_bytes"] > 0, case
        assert result["loads"] and result["stores"], case


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
def test_every_autotune_config_compiles(target):
    """Every config the autotuner may pick, twice: an fp32 table with every branch on (a bank,
    wpe, int64 ids, ALIGN = 16) and a bf16 table with every branch off (one prompt, no wpe,
    int32 ids, ALIGN = 1). The vector-load test below adds bf16 with every branch on.

    On a GPU the autotuner compiles every config the first time it meets a key: a config that
    failed to compile for sm_80 or sm_90 would fail there, at the user's first call. (A config
    changes the block shapes and warps, not the branches, so fp16, which compiles like bf16,
    is left to the test above with the default configs.)
    """
    cases = []
    for config in FWD_CONFIGS:
        cases.append(forward_case("fp32", prompt="fp32", ids="i64", bank=True, wpe=True, config=config))
        cases.append(forward_case("bf16", prompt="bf16", ids="i32", bank=False, wpe=False, align=1, config=config))
    for config in BWD_CONFIGS:
        cases.append(backward_case("fp32", out="fp32", ids="i64", bank=True, config=config))
        cases.append(backward_case("bf16", out="bf16", ids="i32", bank=False, align=1, config=config))
    for case, result in zip(cases, compile_cases(cases, target), strict=True):
        assert result["entry"] and result["cubin_bytes"] > 0, case
        assert result["loads"] and result["stores"], case


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
def test_16bit_rows_use_vector_loads(target):
    """16-bit rows with D % 8 == 0 move 16 bytes per thread: ld.global.v4.b32 (8 halves).

    In every forward config (bf16; fp16 with the default config) the row loads and stores are
    all 128-bit: the only scalar loads left are the 64-bit token and prompt ids, one per row. In
    every backward config the tile loads of dx are 128-bit too. Without the ALIGN hint (ALIGN =
    1: D odd) the same rows fall back to one 16-bit load per element: the control.
    """
    fwd = [("bf16", c, 8) for c in FWD_CONFIGS] + [("bf16", FWD_CONFIGS[0], 16), ("fp16", FWD_CONFIGS[0], 8)]
    bwd = [("bf16", c) for c in BWD_CONFIGS] + [("fp16", BWD_CONFIGS[0])]
    cases = [forward_case(table, prompt=table, align=align, config=c) for table, c, align in fwd]  # D = 8 * odd, 768
    cases += [backward_case(table, align=8, config=c) for table, c in bwd]
    cases += [forward_case(table, prompt=table, align=1) for table in ("bf16", "fp16")]  # D = 127: the control
    results = iter(compile_cases(cases, target))
    for case in fwd:
        result = next(results)
        assert result["loads"] == ["ld.global.b64", "ld.global.v4.b32"], (case, result)
        assert result["stores"] == ["st.global.v4.b32"], (case, result)
    for case in bwd:
        result = next(results)
        assert "ld.global.v4.b32" in result["loads"] and "ld.global.b16" not in result["loads"], (case, result)
    for table in ("bf16", "fp16"):
        control = next(results)
        assert "ld.global.b16" in control["loads"] and control["stores"] == ["st.global.b16"], (table, control)


if __name__ == "__main__":  # the child process of compile_cases: JSON in on stdin, JSON out
    request = json.loads(sys.stdin.read())
    results = [compile_case(case, tuple(request["target"])) for case in request["cases"]]
    print(json.dumps(results))
