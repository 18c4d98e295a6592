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
import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

TARGETS = {"sm80": ("cuda", 80, 32), "sm90": ("cuda", 90, 32)}
TABLE_DTYPES = ["fp32", "fp16", "bf16"]


def forward_case(table, prompt="fp32", ids="i64", bank=True, wpe=True, align=16, block_d=1024, ones=()):
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
        "n_p": "i32",
        "n": "i32",
        "D": "i32",
    }
    constexprs = {"IS_BANK": bank, "HAS_WPE": wpe, "ALIGN": align, "BLOCK_D": block_d}
    constexprs.update({name: 1 for name in ones})  # the JIT turns integer arguments equal to 1 into constants
    return {"kernel": "_prompt_concat_fwd_kernel", "signature": signature, "constexprs": constexprs}


def backward_case(grad, out="fp32", ids="i64", bank=True, align=16, block_b=16, block_d=256, ones=()):
    signature = {"OUT": f"*{out}", "DX": f"*{grad}", "PIDX": f"*{ids}", "B": "i32", "T": "i32", "R": "i32", "D": "i32"}
    constexprs = {"IS_BANK": bank, "ACC_DTYPE": "fp32", "ALIGN": align, "BLOCK_B": block_b, "BLOCK_D": block_d}
    constexprs.update({name: 1 for name in ones})
    return {"kernel": "_prompt_concat_bwd_kernel", "signature": signature, "constexprs": constexprs}


def compile_case(case, target, num_warps=4):
    """Compile one case for `target` (a GPUTarget tuple); return its PTX global memory ops."""
    import importlib

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
    compiled = triton.compile(src, target=GPUTarget(*target), options={"num_warps": num_warps})
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

    The last two cases are D = n_p = n = B = 1: the JIT makes every integer argument that
    equals 1 a compile-time constant, and the kernels must still compile then.
    """
    cases = []
    for table in TABLE_DTYPES:
        cases.append(forward_case(table, prompt="fp32", ids="i64", bank=True, wpe=True))
        cases.append(forward_case(table, prompt=table, ids="i32", bank=False, wpe=False, align=1))
        cases.append(backward_case(table, out="fp32", ids="i64", bank=True))
        cases.append(backward_case(table, out=table, ids="i32", bank=False, align=1, block_b=1))
    fwd_ones = ("stride_pk", "stride_pt", "stride_wte", "stride_wpe", "n_p", "n", "D")
    cases.append(forward_case("fp16", align=1, block_d=1, ones=fwd_ones))
    cases.append(backward_case("fp16", align=1, block_b=1, block_d=1, ones=("B", "R", "D")))
    for case, result in zip(cases, compile_cases(cases, target)):
        assert result["entry"] and result["cubin_bytes"] > 0, case
        assert result["loads"] and result["stores"], case


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
def test_16bit_rows_use_vector_loads(target):
    """fp16/bf16 rows with D % 8 == 0 move 16 bytes per thread: ld.global.v4.b32 (8 halves).

    The forward's row loads and stores are all 128-bit (the only scalar load left is the 64-bit
    token or prompt id); the backward's tile loads of dx are too. Without the ALIGN hint
    (ALIGN = 1: D odd) the same rows fall back to one 16-bit load per element.
    """
    cases = []
    for table in ("fp16", "bf16"):
        cases.append(forward_case(table, prompt=table, align=8))  # D = 8 * odd, e.g. 24 or 1000
        cases.append(forward_case(table, prompt=table, align=16))  # D = 768
        cases.append(backward_case(table, align=8))
        cases.append(forward_case(table, prompt=table, align=1))  # D = 127: the control
    results = compile_cases(cases, target)
    for i, table in enumerate(("fp16", "bf16")):
        fwd8, fwd16, bwd8, fwd1 = results[4 * i : 4 * i + 4]
        for result in (fwd8, fwd16):
            assert result["loads"] == ["ld.global.b64", "ld.global.v4.b32"], (table, result)
            assert result["stores"] == ["st.global.v4.b32"], (table, result)
        assert "ld.global.v4.b32" in bwd8["loads"] and "ld.global.b16" not in bwd8["loads"], (table, bwd8)
        assert "ld.global.b16" in fwd1["loads"] and fwd1["stores"] == ["st.global.b16"], (table, fwd1)


if __name__ == "__main__":  # the child process of compile_cases: JSON in on stdin, JSON out
    request = json.loads(sys.stdin.read())
    results = [compile_case(case, tuple(request["target"])) for case in request["cases"]]
    print(json.dumps(results))
