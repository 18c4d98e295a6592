"""The fused prompt-concat kernels against the plain PyTorch reference.

Without a GPU the Triton kernels run on the interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
where one program instance costs about a millisecond, so shapes stay small and the irregular
shapes of the issue are covered pairwise (every pair of values appears in some case) instead of
as a full cartesian product. The interpreter computes bf16 arithmetic and fp32 -> bf16 casts
incorrectly, so bf16 is checked on the copy path here and fully in the `gpu` tests.
"""

import importlib
import itertools
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipt.kernels import prompt_concat, prompt_concat_reference

# The submodule, for its private pieces (`minipt.kernels.prompt_concat` the attribute is the function).
pc = importlib.import_module("minipt.kernels.prompt_concat")

needs_triton = pytest.mark.skipif(not pc.HAS_TRITON, reason="Triton is not installed")
has_cuda = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if has_cuda else "cpu"  # where backend="triton" runs in this process

# (atol, rtol) for gradients: the kernel sums over the batch in fp32 (fp64 for fp64) in its own
# order, the reference in torch's, so they agree to rounding, not to the bit.
GRAD_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_verbose_allclose(actual, expected, atol=0.0, rtol=0.0, name="tensor", max_print=5):
    """assert_close that says where values differ (after Liger-Kernel's test utils).

    atol = rtol = 0 asks for bit-identical values. NaNs must sit at the same places.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_mismatch = a.isnan() != e.isnan()
    diff = (a - e).abs()
    bad = nan_mismatch | (~a.isnan() & ~e.isnan() & (diff > atol + rtol * e.abs()))
    if not bad.any():
        return
    where = bad.nonzero().tolist()
    lines = [
        f"{name}: {len(where)} of {a.numel()} values differ (atol={atol}, rtol={rtol}); "
        f"max |diff| = {diff[bad].max().item():.3g}",
    ]
    for i in where[:max_print]:
        i = tuple(i)
        lines.append(f"  at {i}: actual {a[i].item()!r}, expected {e[i].item()!r}")
    if len(where) > max_print:
        lines.append(f"  ... and {len(where) - max_print} more")
    raise AssertionError("\n".join(lines))


def test_verbose_allclose_reports_positions():
    a = torch.zeros(2, 3)
    b = a.clone()
    b[1, 2] = 1.0
    assert_verbose_allclose(a, a.clone())
    with pytest.raises(AssertionError, match=r"1 of 6 values differ.*\n  at \(1, 2\): actual 0.0, expected 1.0"):
        assert_verbose_allclose(a, b)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
class Case(NamedTuple):
    D: int  # embedding width
    n_p: int  # prompt length
    n: int  # tokens per example
    B: int  # batch size
    wpe: bool  # with a (trainable) position table
    bank: bool  # a bank of K = 3 prompts with prompt_index, else one shared prompt
    dtype: torch.dtype  # table dtype (the prompt is fp32 for 16-bit tables)
    ids: torch.dtype  # idx and prompt_index dtype

    def __str__(self):
        return (
            f"D{self.D}-np{self.n_p}-n{self.n}-B{self.B}-{'wpe' if self.wpe else 'nowpe'}-"
            f"{'bank' if self.bank else 'one'}-{str(self.dtype)[6:]}-{str(self.ids)[6:]}"
        )


def make_inputs(case, V=11, K=3, prompt_dtype=None, device="cpu", extra_pos=2):
    """prompt (requires grad), frozen wte, idx, wpe (requires grad, n_p + n + extra_pos rows), prompt_index."""
    if prompt_dtype is None:  # the trained prompt stays fp32 when the frozen tables are 16-bit
        prompt_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    shape = (K, case.n_p, case.D) if case.bank else (case.n_p, case.D)
    prompt = torch.randn(shape, dtype=prompt_dtype, device=device, requires_grad=True)
    wte = torch.randn(V, case.D, dtype=case.dtype, device=device)
    idx = torch.randint(0, V, (case.B, case.n), dtype=case.ids, device=device)
    wpe = None
    if case.wpe:
        T = case.n_p + case.n
        wpe = torch.randn(T + extra_pos, case.D, dtype=case.dtype, device=device, requires_grad=True)
    prompt_index = None
    if case.bank:
        prompt_index = torch.randint(0, K, (case.B,), dtype=case.ids, device=device)
    return prompt, wte, idx, wpe, prompt_index


def forward_backward(inputs, backend, dx=None):
    """x and the gradients of (prompt, wpe) for upstream gradient dx, with the given backend."""
    prompt, wte, idx, wpe, prompt_index = inputs
    if backend == "torch":  # the ground truth: torch autograd through the plain reference
        x = prompt_concat_reference(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index)
    else:
        x = prompt_concat(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index, backend=backend)
    if dx is None:
        dx = torch.randn_like(x)
    wrt = [t for t in (prompt, wpe) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(x, wrt, dx)
    return x, grads, dx


def check_against_reference(inputs, backend, name=""):
    """Forward bit-identical, backward within GRAD_TOL of torch autograd on the reference."""
    x_ref, grads_ref, dx = forward_backward(inputs, "torch")
    x, grads, _ = forward_backward(inputs, backend, dx)
    assert_verbose_allclose(x, x_ref, name=f"x {name}")
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        atol, rtol = GRAD_TOL[g_ref.dtype]
        assert_verbose_allclose(g, g_ref, atol=atol, rtol=rtol, name=f"grad {i} {name}")


# The irregular shapes, D in {1, 7, 64, 127, 768}, n_p in {1, 5, 20}, n in {1, 3, 33},
# B in {1, 2, 5}, with/without wpe, one prompt/a bank, three table dtypes and both id dtypes:
# 17 cases in which every pair of values of any two of these factors appears at least once
# (checked by test_cases_cover_every_pair). The full product would be 3,240 cases.
f32, f16, f64, i32, i64 = torch.float32, torch.float16, torch.float64, torch.int32, torch.int64
CASES = [
    Case(7, 1, 1, 1, False, False, f64, i64),
    Case(64, 1, 3, 2, True, True, f16, i32),
    Case(127, 5, 33, 5, False, True, f32, i32),
    Case(1, 20, 3, 5, True, False, f32, i64),
    Case(768, 20, 33, 2, False, False, f16, i64),
    Case(1, 5, 1, 1, True, True, f64, i32),
    Case(127, 5, 3, 1, False, False, f16, i64),
    Case(64, 20, 33, 1, False, False, f64, i32),
    Case(768, 1, 1, 5, True, True, f32, i64),
    Case(7, 5, 33, 2, True, True, f32, i32),
    Case(127, 20, 1, 2, True, True, f16, i64),
    Case(768, 5, 3, 1, False, False, f64, i32),
    Case(1, 1, 33, 2, False, False, f16, i64),
    Case(64, 5, 1, 1, True, False, f32, i64),
    Case(7, 20, 3, 5, False, False, f16, i64),
    Case(127, 1, 1, 2, False, True, f64, i32),
    Case(64, 1, 1, 5, False, False, f64, i64),
]
FACTORS = [
    [1, 7, 64, 127, 768],
    [1, 5, 20],
    [1, 3, 33],
    [1, 2, 5],
    [False, True],
    [False, True],
    [f32, f16, f64],
    [i32, i64],
]


def test_cases_cover_every_pair():
    for i, j in itertools.combinations(range(len(FACTORS)), 2):
        seen = {(c[i], c[j]) for c in CASES}
        missing = set(itertools.product(FACTORS[i], FACTORS[j])) - seen
        assert not missing, f"factors {Case._fields[i]}, {Case._fields[j]}: no case for {missing}"


# ---------------------------------------------------------------------------------------------
# Kernel against reference
# ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case, seed):
    check_against_reference(make_inputs(case, device=KERNEL_DEVICE), "triton", str(case))


@pytest.mark.parametrize("case", CASES[:6], ids=str)
def test_reference_backend_matches_reference(case, seed):
    """backend="reference" goes through the same custom op, with a PyTorch backward."""
    check_against_reference(make_inputs(case), "reference", str(case))


@needs_triton
@pytest.mark.parametrize("prompt_dtype", [torch.float32, torch.float64, torch.float16])
def test_prompt_dtype_is_cast_to_table_dtype(prompt_dtype, seed):
    """x takes the table's dtype; the prompt's gradient comes back in the prompt's dtype."""
    case = Case(9, 3, 2, 3, True, True, torch.float32, torch.int64)
    inputs = make_inputs(case, prompt_dtype=prompt_dtype, device=KERNEL_DEVICE)
    x = prompt_concat(*inputs, backend="triton")
    assert x.dtype == torch.float32
    (d_prompt,) = torch.autograd.grad(x, inputs[0], torch.ones_like(x))
    assert d_prompt.dtype == prompt_dtype
    check_against_reference(inputs, "triton")


@needs_triton
@pytest.mark.parametrize("wpe", [False, True])
def test_fp16_table_with_fp32_prompt_rounds_like_torch(wpe, seed):
    """Values that need rounding: prompt entries between fp16 neighbours, large wpe entries."""
    case = Case(16, 4, 3, 2, wpe, False, torch.float16, torch.int64)
    prompt, wte, idx, wpe_t, _ = make_inputs(case, device=KERNEL_DEVICE)
    with torch.no_grad():
        prompt.mul_(1000.0).add_(1 / 3)
        if wpe_t is not None:
            wpe_t.mul_(300.0)
    check_against_reference((prompt, wte, idx, wpe_t, None), "triton")


@needs_triton
def test_fp64_prompt_rounds_to_fp16_like_torch():
    """torch casts fp64 -> fp16 through fp32 (1 + 2**-11 + 2**-40 becomes 1.0, not 1.001)."""
    prompt = torch.full((2, 8), 1 + 2**-11 + 2**-40, dtype=torch.float64, device=KERNEL_DEVICE)
    wte = torch.randn(3, 8, dtype=torch.float16, device=KERNEL_DEVICE)
    idx = torch.tensor([[0, 2]], device=KERNEL_DEVICE)
    x = prompt_concat(prompt, wte, idx, backend="triton")
    assert_verbose_allclose(x, prompt_concat_reference(prompt, wte, idx), name="x")
    assert x[0, 0, 0].item() == 1.0


@needs_triton
@pytest.mark.parametrize("bank", [False, True])
def test_bf16_copy_path_is_bit_identical(bank, seed):
    """bf16 tables and a bf16 prompt without wpe: loads and stores only, exact in the interpreter."""
    case = Case(24, 3, 4, 3, False, bank, torch.bfloat16, torch.int32)
    prompt, wte, idx, _, prompt_index = make_inputs(case, prompt_dtype=torch.bfloat16, device=KERNEL_DEVICE)
    x = prompt_concat(prompt, wte, idx, prompt_index=prompt_index, backend="triton")
    x_ref = prompt_concat_reference(prompt, wte, idx, prompt_index=prompt_index)
    assert_verbose_allclose(x, x_ref, name="x bf16")


@needs_triton
def test_empty_token_sequence_is_just_the_prompt(seed):
    """n = 0 is allowed: x is the prompt (+ wpe) alone."""
    case = Case(5, 3, 0, 2, True, False, torch.float32, torch.int64)
    check_against_reference(make_inputs(case, device=KERNEL_DEVICE), "triton")


@needs_triton
def test_non_contiguous_inputs(seed):
    """Views with row strides, a transposed idx, a strided prompt_index and a strided column."""
    D, V, B, n, n_p, K = 12, 13, 3, 4, 5, 3
    bank = torch.randn(K, n_p, 2 * D, device=KERNEL_DEVICE)[:, :, ::2].detach().requires_grad_()  # column stride 2
    wte = torch.randn(V, D + 5, device=KERNEL_DEVICE)[:, 3 : 3 + D]  # row stride D + 5
    idx = torch.randint(0, V, (n, B), device=KERNEL_DEVICE).t()  # (B, n), transposed
    wpe = torch.randn(2 * (n_p + n), D, device=KERNEL_DEVICE)[::2].detach().requires_grad_()  # row stride 2D
    prompt_index = torch.randint(0, K, (2 * B,), device=KERNEL_DEVICE)[::2]
    for t in (bank, wte, idx, wpe, prompt_index):
        assert not t.is_contiguous()
    check_against_reference((bank, wte, idx, wpe, prompt_index), "triton")


@needs_triton
def test_backward_is_deterministic(seed):
    """Two backward passes give bit-identical dP and dwpe: a reduction, never atomics."""
    case = Case(33, 4, 3, 5, True, True, torch.float32, torch.int64)
    inputs = make_inputs(case, device=KERNEL_DEVICE)
    _, grads_1, dx = forward_backward(inputs, "triton")
    _, grads_2, _ = forward_backward(inputs, "triton", dx)
    for g1, g2 in zip(grads_1, grads_2):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_gradcheck_fp64(backend, seed):
    """torch.autograd.gradcheck in fp64 for prompt (a bank), wpe and a trainable wte."""
    case = Case(2, 2, 2, 3, True, True, torch.float64, torch.int64)
    prompt, wte, idx, wpe, prompt_index = make_inputs(case, V=4, K=2, device=KERNEL_DEVICE, extra_pos=1)
    wte.requires_grad_(True)

    def f(prompt, wte, wpe):
        return prompt_concat(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index, backend=backend)

    assert torch.autograd.gradcheck(f, (prompt, wte, wpe))


@needs_triton
def test_gradcheck_fp64_single_prompt(seed):
    case = Case(3, 3, 2, 3, False, False, torch.float64, torch.int32)
    prompt, wte, idx, _, _ = make_inputs(case, V=5, device=KERNEL_DEVICE)
    assert torch.autograd.gradcheck(lambda p: prompt_concat(p, wte, idx, backend="triton"), (prompt,))


# ---------------------------------------------------------------------------------------------
# Every autotune config, passed explicitly (under the interpreter nothing can be timed, so the
# launchers run one fixed config unless given one; on a GPU the autotuner picks among these)
# ---------------------------------------------------------------------------------------------
FWD_CONFIGS = list(pc.FWD_CONFIGS)
BWD_CONFIGS = list(pc.BWD_CONFIGS)


def config_id(config):
    return pc.config_name(config).replace(" ", "-")


@needs_triton
def test_config_lists():
    """The configs are the commented specs, the one-row forward is among them, the autotuners
    tune over exactly these lists, and the interpreter's fixed configs come from them."""
    specs = [(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_D"], c.num_warps) for c in FWD_CONFIGS]
    assert specs == list(pc.FWD_CONFIG_SPECS) and len(set(specs)) == len(specs)
    assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_D"], c.num_warps) for c in BWD_CONFIGS] == list(pc.BWD_CONFIG_SPECS)
    assert any(c.kwargs["BLOCK_T"] == 1 for c in FWD_CONFIGS), "the one-row config stays a candidate"
    for t, d, w in (*pc.FWD_CONFIG_SPECS, *pc.BWD_CONFIG_SPECS):  # powers of two, as Triton's blocks must be
        assert t & (t - 1) == 0 and d & (d - 1) == 0 and w in (1, 2, 4, 8)
    assert pc._prompt_concat_fwd_tuned.configs == FWD_CONFIGS and pc._prompt_concat_fwd_tuned.keys == ["n", "D"]
    assert pc._prompt_concat_bwd_tuned.configs == BWD_CONFIGS and pc._prompt_concat_bwd_tuned.keys == ["B", "R", "D"]
    assert pc.FWD_CONFIGS[pc.FWD_INTERPRETER_CONFIG] in FWD_CONFIGS
    assert pc.BWD_CONFIGS[pc.BWD_INTERPRETER_CONFIG] in BWD_CONFIGS


# Partial blocks in both directions: B * T = 21 and 12 rows (no BLOCK_T > 1 divides them), D = 257
# and 33 columns (a last column block of 1 or 33 of 256 / 1024), ids of both dtypes, bank and wpe
# on and off; bf16 on the copy path (the interpreter rounds bf16 arithmetic wrongly, see above).
CONFIG_CASES = [
    (Case(257, 3, 4, 3, True, True, torch.float16, torch.int64), None),
    (Case(33, 2, 4, 3, False, False, torch.float32, torch.int32), None),
    (Case(7, 1, 5, 2, True, False, torch.float64, torch.int64), None),
    (Case(24, 3, 4, 3, False, True, torch.bfloat16, torch.int32), torch.bfloat16),
]


@needs_triton
@pytest.mark.parametrize("config", FWD_CONFIGS, ids=config_id)
def test_every_forward_config_is_bit_identical(config, seed):
    for case, prompt_dtype in CONFIG_CASES:
        prompt, wte, idx, wpe, prompt_index = make_inputs(case, prompt_dtype=prompt_dtype, device=KERNEL_DEVICE)
        x = pc._forward_triton(prompt.detach(), wte, idx, wpe, prompt_index, config=config)
        x_ref = prompt_concat_reference(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index)
        assert_verbose_allclose(x, x_ref, name=f"x {case} {config_id(config)}")


@needs_triton
@pytest.mark.parametrize("config", BWD_CONFIGS, ids=config_id)
def test_every_backward_config_is_bit_identical(config, seed):
    """The batch sum of every config, bit for bit, on integer-valued gradients.

    Small integers make every partial sum exact in fp32 (and in the fp16/bf16 results), so the
    kernel's order of summation and torch's give the same bits and the comparison can be exact.
    B = 37 leaves a partial last step for every BLOCK_B; D = 257 a partial last column block.
    With random values the two orders agree to rounding: checked too, within GRAD_TOL.
    """
    B, T, R, D, K = 37, 5, 3, 257, 3
    prompt_index = torch.randint(0, K, (B,), device=KERNEL_DEVICE)
    for dx_dtype, out_dtype in [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ]:
        dx = torch.randint(-8, 9, (B, T, D), device=KERNEL_DEVICE).to(dx_dtype)  # |sum| <= 296: exact
        for pidx, k in ((None, 1), (prompt_index, K)):
            out = pc._batch_sum_triton(dx, pidx, k, R, out_dtype, config=config)
            ref = pc._batch_sum_reference(dx, pidx, k, R, out_dtype)
            assert_verbose_allclose(out, ref, name=f"sum {dx_dtype} -> {out_dtype} K={k}")
    dx = torch.randn(B, T, D, device=KERNEL_DEVICE)
    out = pc._batch_sum_triton(dx, prompt_index, K, T, torch.float32, config=config)
    atol, rtol = GRAD_TOL[torch.float32]
    assert_verbose_allclose(out, pc._batch_sum_reference(dx, prompt_index, K, T, torch.float32), atol, rtol)


@needs_triton
def test_launchers_tune_on_a_gpu_and_use_a_fixed_config_under_the_interpreter(monkeypatch, seed):
    """config=None: the autotuned kernel on a GPU (here a recording stand-in, since nothing can be
    timed on the CPU), with a grid that follows each config's block sizes; the interpreter's
    fixed config under TRITON_INTERPRET=1, without touching the autotuner."""
    case = Case(40, 3, 5, 3, True, True, torch.float32, torch.int64)
    prompt, wte, idx, wpe, prompt_index = make_inputs(case, device=KERNEL_DEVICE)
    x_ref = prompt_concat_reference(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index)
    dx = torch.randn_like(x_ref)

    class Recorder:
        def __init__(self):
            self.launches = []

        def __getitem__(self, grid):
            return lambda *args, **meta: self.launches.append((grid, meta))

    fwd, bwd = Recorder(), Recorder()
    monkeypatch.setattr(pc, "_prompt_concat_fwd_tuned", fwd)
    monkeypatch.setattr(pc, "_prompt_concat_bwd_tuned", bwd)
    if pc.TRITON_INTERPRET:  # the fixed config runs, the autotuner is never asked
        x = pc._forward_triton(prompt.detach(), wte, idx, wpe, prompt_index)
        out = pc._batch_sum_triton(dx, prompt_index, 3, case.n_p, torch.float32)
        assert fwd.launches == [] and bwd.launches == []
        assert_verbose_allclose(x, x_ref)
        assert_verbose_allclose(
            out, pc._batch_sum_reference(dx, prompt_index, 3, case.n_p, torch.float32), *GRAD_TOL[torch.float32]
        )
    monkeypatch.setattr(pc, "TRITON_INTERPRET", False)  # as on a GPU: the autotuner launches
    pc._forward_triton(prompt.detach(), wte, idx, wpe, prompt_index)
    pc._batch_sum_triton(dx, prompt_index, 3, case.n_p, torch.float32)
    ((grid, meta),) = fwd.launches
    assert not {"BLOCK_T", "BLOCK_D", "num_warps"} & set(meta), "the autotuner supplies the config"
    B_T = case.B * (case.n_p + case.n)
    for c in FWD_CONFIGS:
        assert grid(c.kwargs) == (-(-B_T // c.kwargs["BLOCK_T"]), -(-case.D // c.kwargs["BLOCK_D"]))
    ((grid, meta),) = bwd.launches
    assert not {"BLOCK_B", "BLOCK_D", "num_warps"} & set(meta)
    for c in BWD_CONFIGS:
        assert grid(c.kwargs) == (3 * case.n_p, -(-case.D // c.kwargs["BLOCK_D"]))


# ---------------------------------------------------------------------------------------------
# check_ids: the id-range check, on the host (CPU) or as a device-side assert (CUDA)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_check_ids_false_reads_no_id_values(backend, monkeypatch, seed):
    """check_ids=False: the caller has validated the ids, so the op does not look at them."""
    case = Case(8, 2, 3, 2, True, True, torch.float32, torch.int64)
    inputs = make_inputs(case, device=KERNEL_DEVICE)
    checked = []
    monkeypatch.setattr(pc, "_check_values", lambda *args: checked.append(len(args)))
    x = prompt_concat(*inputs, backend=backend, check_ids=False)
    assert checked == []
    assert_verbose_allclose(x, prompt_concat_reference(*inputs))
    prompt_concat(*inputs, backend=backend)
    assert checked == [4], "check_ids=True (the default) checks the ids"


@needs_triton
def test_kernel_never_reads_outside_the_tables(seed):
    """Even unchecked, a bad id reads nothing: its row comes out as zeros + wpe."""
    V, K = 5, 2
    case = Case(6, 2, 3, 2, True, True, torch.float32, torch.int64)
    prompt, wte, idx, wpe, prompt_index = make_inputs(case, V=V, K=K, device=KERNEL_DEVICE)
    idx[0, 1], idx[1, 2] = V, -1  # token rows t = n_p + 1 and n_p + 2
    prompt_index[1] = K  # example 1's prompt rows
    x = prompt_concat(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index, backend="triton", check_ids=False)
    assert_verbose_allclose(x[0, case.n_p + 1], wpe[case.n_p + 1], name="row of id V")
    assert_verbose_allclose(x[1, case.n_p + 2], wpe[case.n_p + 2], name="row of id -1")
    assert_verbose_allclose(x[1, : case.n_p], wpe[: case.n_p], name="rows of prompt index K")
    assert_verbose_allclose(x[0, : case.n_p], prompt[prompt_index[0]] + wpe[: case.n_p], name="good rows")


@pytest.mark.parametrize("name", ["idx", "prompt_index"])
def test_device_side_check_fires_on_cpu_tensors(name):
    """The CUDA path's check (torch._assert_async) on CPU tensors raises at once, with the
    message the device prints on a GPU: the same condition, the argument named."""
    V, K = 10, 3
    good = torch.tensor([0, 1, V - 1]) if name == "idx" else torch.tensor([0, K - 1])
    limit, what = (V, "token ids") if name == "idx" else (K, "values")
    pc._check_ids_on_device(name, good, limit, what)  # in range: nothing happens
    for bad in (good.clone().fill_(limit), good.clone().fill_(-1)):
        with pytest.raises(RuntimeError, match=rf"prompt_concat: {name} holds {what} outside \[0, {limit}\)"):
            pc._check_ids_on_device(name, bad, limit, what)


# ---------------------------------------------------------------------------------------------
# The frozen-weight path
# ---------------------------------------------------------------------------------------------
class ShapeRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op returns while the mode is active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_frozen_wte_gets_no_gradient_and_no_table_sized_buffer(backend, seed):
    V, D = 97, 6  # V chosen so a (V, D) tensor is easy to spot
    case = Case(D, 3, 4, 2, True, False, torch.float32, torch.int64)
    prompt, wte, idx, wpe, _ = make_inputs(case, V=V, device=KERNEL_DEVICE)
    wpe.requires_grad_(False)  # the prompt-tuning setting: everything but the prompt is frozen
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = prompt_concat(prompt, wte, idx, wpe=wpe, backend=backend)
    assert saved == [(2, 4)], "backward keeps only the ids (idx; prompt_index is None here)"
    with ShapeRecorder() as rec:
        x.sum().backward()
    assert wte.grad is None and wpe.grad is None
    assert prompt.grad is not None
    assert (V, D) not in rec.shapes

    # Control: the same recorder does see the (V, D) gradient when wte is trainable.
    wte.requires_grad_(True)
    x = prompt_concat(prompt, wte, idx, wpe=wpe, backend=backend)
    with ShapeRecorder() as rec:
        x.sum().backward()
    assert (V, D) in rec.shapes and wte.grad.shape == (V, D)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_trainable_wte_gradient(backend, seed):
    """dwte (the full fine-tuning comparison) is a scatter-add over the token positions."""
    case = Case(10, 2, 6, 3, True, True, torch.float32, torch.int32)
    prompt, wte, idx, wpe, prompt_index = make_inputs(case, V=7, device=KERNEL_DEVICE)
    wte.requires_grad_(True)
    x_ref = prompt_concat_reference(prompt, wte, idx, wpe, prompt_index)
    x = prompt_concat(prompt, wte, idx, wpe, prompt_index, backend=backend)
    dx = torch.randn_like(x)
    grads_ref = torch.autograd.grad(x_ref, (prompt, wte, wpe), dx)
    grads = torch.autograd.grad(x, (prompt, wte, wpe), dx)
    for name, g, g_ref in zip(("prompt", "wte", "wpe"), grads, grads_ref):
        assert_verbose_allclose(g, g_ref, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_unused_prompts_of_a_bank_get_zero_gradient(backend, seed):
    case = Case(8, 2, 3, 4, False, True, torch.float32, torch.int64)
    prompt, wte, idx, _, _ = make_inputs(case, K=3, device=KERNEL_DEVICE)
    prompt_index = torch.tensor([0, 2, 0, 2], device=KERNEL_DEVICE)  # prompt 1 is not used
    x = prompt_concat(prompt, wte, idx, prompt_index=prompt_index, backend=backend)
    (g,) = torch.autograd.grad(x, prompt, torch.ones_like(x))
    assert torch.equal(g[1], torch.zeros_like(g[1]))
    assert torch.equal(g[0], torch.full_like(g[0], 2.0))  # two examples use prompt 0


# ---------------------------------------------------------------------------------------------
# Random shapes
# ---------------------------------------------------------------------------------------------
@needs_triton
@settings(max_examples=15, deadline=None)
@given(
    D=st.integers(1, 40),
    n_p=st.integers(1, 6),
    n=st.integers(1, 6),
    B=st.integers(1, 4),
    wpe=st.booleans(),
    bank=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
    ids=st.sampled_from([torch.int32, torch.int64]),
    data_seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_reference(D, n_p, n, B, wpe, bank, dtype, ids, data_seed):
    torch.manual_seed(data_seed)
    case = Case(D, n_p, n, B, wpe, bank, dtype, ids)
    check_against_reference(make_inputs(case, device=KERNEL_DEVICE), "triton", str(case))


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_torch_compile_fullgraph(backend, seed):
    """One opaque custom op: no graph break at the launch, forward and backward match eager.

    aot_eager runs the whole torch.compile front end (Dynamo with fullgraph=True, the fake
    kernels, AOTAutograd's joint graph) without the minutes of C++ compilation that inductor
    needs on a CPU; the GPU test below uses inductor.
    """
    case = Case(8, 3, 4, 2, True, True, torch.float32, torch.int64)
    prompt, wte, idx, wpe, prompt_index = make_inputs(case, device=KERNEL_DEVICE)

    def loss_fn(prompt, wpe):
        x = prompt_concat(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index, backend=backend)
        return (x.tanh() * x).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(prompt, wpe)
    grads = torch.autograd.grad(loss, (prompt, wpe))
    loss_ref = loss_fn(prompt, wpe)
    grads_ref = torch.autograd.grad(loss_ref, (prompt, wpe))
    assert_verbose_allclose(loss, loss_ref, atol=1e-5, rtol=1e-6, name="loss")
    for g, g_ref in zip(grads, grads_ref):
        assert_verbose_allclose(g, g_ref, atol=1e-5, rtol=1e-5, name="grad")
    # check_ids is a plain flag of the op: False compiles to the same single graph.
    unchecked = torch.compile(
        lambda p: prompt_concat(p, wte, idx, wpe=wpe, prompt_index=prompt_index, backend=backend, check_ids=False),
        fullgraph=True,
        backend="aot_eager",
    )
    assert_verbose_allclose(unchecked(prompt), prompt_concat_reference(prompt, wte, idx, wpe, prompt_index))
    if KERNEL_DEVICE == "cpu":  # on CUDA a bad id is a device-side assert: see the gpu tests below
        # The id check lives inside the op, so it still runs in the compiled function.
        with pytest.raises(ValueError, match="idx holds token ids"):
            bad = torch.full_like(idx, 11)
            torch.compile(
                lambda p: prompt_concat(p, wte, bad, prompt_index=prompt_index, wpe=wpe, backend=backend),
                fullgraph=True,
                backend="aot_eager",
            )(prompt)


# ---------------------------------------------------------------------------------------------
# In the model
# ---------------------------------------------------------------------------------------------
@needs_triton
def test_prompt_tuning_same_loss_and_gradient_with_kernel_and_reference(seed):
    """PromptTuning on a tiny frozen GPT: the kernel and the reference give the same training step."""
    from minipt.model import GPT, GPTConfig
    from minipt.prompt import PromptTuning

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=260, block_size=32)).to(KERNEL_DEVICE)
    idx = torch.randint(0, 260, (2, 8), device=KERNEL_DEVICE)
    targets = torch.randint(0, 260, (2, 8), device=KERNEL_DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        pt = PromptTuning(model, n_prompt=4, init="uniform", seed=0, backend=backend)
        _, loss = pt(idx, targets=targets)
        loss.backward()
        results[backend] = (loss.detach(), pt.prompt.grad)
    (loss_ref, grad_ref), (loss, grad) = results["reference"], results["triton"]
    assert_verbose_allclose(loss, loss_ref, name="loss")  # same x, bit for bit, so the same loss
    assert_verbose_allclose(grad, grad_ref, atol=1e-6, rtol=1e-5, name="prompt grad")
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels (skipped without CUDA)
# ---------------------------------------------------------------------------------------------
GPU_CASES = [
    Case(768, 20, 33, 8, True, False, dtype, torch.int64) for dtype in (torch.float32, torch.float16, torch.bfloat16)
] + [
    Case(127, 5, 17, 5, True, True, torch.bfloat16, torch.int32),
    Case(1000, 7, 3, 3, True, True, torch.float16, torch.int32),
    Case(24, 1, 1, 64, False, True, torch.bfloat16, torch.int64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_kernels_match_reference(case, seed):
    """Compiled kernels, bf16 included: forward bit-identical, backward to rounding."""
    check_against_reference(make_inputs(case, device="cuda", V=50257 if case.D == 768 else 101), "triton")


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(seed):
    case = Case(768, 20, 64, 64, True, True, torch.bfloat16, torch.int64)
    inputs = make_inputs(case, device="cuda")
    _, grads_1, dx = forward_backward(inputs, "triton")
    for _ in range(3):
        _, grads_2, _ = forward_backward(inputs, "triton", dx)
        for g1, g2 in zip(grads_1, grads_2):
            assert torch.equal(g1, g2)


@pytest.mark.gpu
def test_gpu_auto_backend_uses_the_kernel(monkeypatch, seed):
    calls = []
    launch = pc._forward_triton
    monkeypatch.setattr(pc, "_forward_triton", lambda *a: calls.append(1) or launch(*a))
    prompt, wte, idx, wpe, _ = make_inputs(Case(64, 2, 3, 2, True, False, torch.float16, torch.int64), device="cuda")
    prompt_concat(prompt, wte, idx, wpe)
    assert calls == [1]


@pytest.mark.gpu
def test_gpu_offsets_beyond_2_pow_31(seed):
    """B * T * D > 2**31 elements: the int64 row offsets keep the last rows right."""
    free, _ = torch.cuda.mem_get_info()
    D, n_p = 16384, 2
    n = 2**31 // D  # T * D = 2**31 + n_p * D elements, 4.3 GB in fp16
    if free < 12 * 2**30:
        pytest.skip("needs about 12 GB of free GPU memory")
    prompt = torch.randn(n_p, D, device="cuda", dtype=torch.float16)
    wte = torch.randn(100, D, device="cuda", dtype=torch.float16)
    idx = torch.randint(0, 100, (1, n), device="cuda")
    x = prompt_concat(prompt, wte, idx, backend="triton")
    assert x.numel() > 2**31
    assert torch.equal(x[0, -5:], wte[idx[0, -5:]])
    assert torch.equal(x[0, :n_p], prompt)
    del x


@pytest.mark.gpu
def test_gpu_torch_compile_inductor(seed):
    case = Case(64, 4, 8, 4, True, True, torch.bfloat16, torch.int64)
    prompt, wte, idx, wpe, prompt_index = make_inputs(case, device="cuda")

    def loss_fn(prompt):
        x = prompt_concat(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index)
        return x.float().square().sum()

    torch._dynamo.reset()
    loss = torch.compile(loss_fn, fullgraph=True)(prompt)
    (g,) = torch.autograd.grad(loss, prompt)
    loss_ref = loss_fn(prompt)
    (g_ref,) = torch.autograd.grad(loss_ref, prompt)
    assert_verbose_allclose(loss, loss_ref, atol=1e-3, rtol=1e-4, name="loss")
    assert_verbose_allclose(g, g_ref, atol=1e-3, rtol=1e-3, name="grad")


@pytest.mark.gpu
@pytest.mark.parametrize("config", FWD_CONFIGS, ids=config_id)
def test_gpu_every_forward_config_is_bit_identical(config, seed):
    """The compiled kernel of every config, bf16 arithmetic included, at GPT-2's width and odd ones."""
    for case in (
        Case(768, 20, 33, 8, True, True, torch.bfloat16, torch.int64),
        Case(1000, 7, 3, 3, True, False, torch.float16, torch.int32),
        Case(127, 5, 17, 5, True, True, torch.float32, torch.int32),
    ):
        prompt, wte, idx, wpe, prompt_index = make_inputs(case, device="cuda", V=50257 if case.D == 768 else 101)
        x = pc._forward_triton(prompt.detach(), wte, idx, wpe, prompt_index, config=config)
        x_ref = prompt_concat_reference(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index)
        assert_verbose_allclose(x, x_ref, name=f"x {case}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", BWD_CONFIGS, ids=config_id)
def test_gpu_every_backward_config_is_bit_identical(config, seed):
    """Integer-valued gradients make every order of summation exact (see the interpreter test)."""
    B, T, R, D, K = 70, 40, 20, 768, 3
    prompt_index = torch.randint(0, K, (B,), device="cuda")
    for dx_dtype, out_dtype in [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
    ]:
        dx = torch.randint(-8, 9, (B, T, D), device="cuda").to(dx_dtype)  # |sum| <= 560: exact
        for pidx, k in ((None, 1), (prompt_index, K)):
            out = pc._batch_sum_triton(dx, pidx, k, R, out_dtype, config=config)
            assert_verbose_allclose(out, pc._batch_sum_reference(dx, pidx, k, R, out_dtype), name=f"{dx_dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gpu_op_and_its_backward_never_sync(backend, seed):
    """With check_ids=True (the default) the op and its backward issue no host sync on CUDA:
    torch.cuda.set_sync_debug_mode("error") turns any sync into an error."""
    case = Case(64, 5, 7, 4, True, True, torch.bfloat16, torch.int64)
    prompt, wte, idx, wpe, prompt_index = make_inputs(case, device="cuda")
    dx = torch.randn(case.B, case.n_p + case.n, case.D, dtype=torch.bfloat16, device="cuda")

    def step():
        x = prompt_concat(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index, backend=backend)
        return torch.autograd.grad(x, (prompt, wpe), dx)

    expected = step()  # the first call compiles and autotunes (timing syncs, by nature)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for g, g_ref in zip(grads, expected):
        assert torch.equal(g, g_ref)


DEVICE_ASSERT_SCRIPT = """
import sys
import torch
from minipt.kernels import prompt_concat

arg, backend = sys.argv[1:]
torch.manual_seed(0)
V, K, B, n, n_p, D = 50, 3, 4, 6, 5, 64
prompt = torch.randn(K, n_p, D, device="cuda", requires_grad=True)
wte = torch.randn(V, D, device="cuda")
wpe = torch.randn(n_p + n, D, device="cuda")
idx = torch.randint(0, V, (B, n), device="cuda")
prompt_index = torch.randint(0, K, (B,), device="cuda")
prompt_concat(prompt, wte, idx, wpe, prompt_index, backend=backend)  # compile and tune first
torch.cuda.synchronize()
if arg == "idx":
    idx[1, 2] = V
else:
    prompt_index[3] = K
torch.cuda.set_sync_debug_mode("error")  # a host sync inside the op would raise here
x = prompt_concat(prompt, wte, idx, wpe, prompt_index, backend=backend)
torch.cuda.set_sync_debug_mode(0)
print("the op returned without a host sync", flush=True)
torch.cuda.synchronize()
print("no error", flush=True)
"""


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("arg", ["idx", "prompt_index"])
def test_gpu_bad_id_fires_a_device_side_assert_without_a_host_sync(arg, backend):
    """A bad id on CUDA: the device-side assert fires, its message names the argument, and the
    op never synchronised to find out. In a child process: a device-side assert leaves the CUDA
    context unusable for the rest of the process."""
    done = subprocess.run(
        [sys.executable, "-c", DEVICE_ASSERT_SCRIPT, arg, backend], capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "no error" not in done.stdout, output
    assert "device-side assert triggered" in output, output
    assert f"prompt_concat: {arg} holds" in output, output  # printed by the device
    assert "synchronizing CUDA operation" not in output, output  # set_sync_debug_mode("error") did not fire
