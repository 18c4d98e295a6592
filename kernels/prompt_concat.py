"""The fused prompt-concat op: build the prompt-tuning input in one pass over memory.

Prompt tuning (Lester et al. 2021, section 2) feeds a frozen GPT the sequence [P; wte[idx]]:

    x[b, t] = (P[k_b, t] if t < n_p else wte[idx[b, t - n_p]]) + wpe[t]        t < T = n_p + n

    P             (n_p, D) one prompt shared by the batch, or a bank (K, n_p, D) with
    prompt_index  (B,) choosing prompt k_b for example b (one batch can mix tasks)
    wte, wpe      (V, D) token and (n_ctx, D) position tables of the frozen model (wpe optional)
    idx           (B, n) token ids

and its backward only needs the prompt rows of the upstream gradient dx = dL/dx:

    dP[k, t]  = sum over b with k_b = k of dx[b, t]       t < n_p     (the only trained tensor)
    dwpe[t]   = sum_b dx[b, t]                             t < T       (only when wpe.requires_grad)
    dwte[v]   = sum over (b, i) with idx[b, i] = v of dx[b, n_p + i]  (only when wte.requires_grad)

The file follows the usual layout of a Triton op (Triton tutorials, Liger-Kernel's ops):

1. the `@triton.jit` kernels (`_prompt_concat_fwd_kernel`, `_prompt_concat_bwd_kernel`);
2. launchers that allocate outputs and launch, with block sizes and warps autotuned on a GPU over
   a short, commented list of configs (a fixed one under the interpreter);
3. the plain PyTorch reference (`prompt_concat_reference`), a few lines long;
4. the autograd formula, registered with the kernels as `torch.library` custom ops
   (`minipt::prompt_concat` and the batch reduction `minipt::prompt_concat_batch_sum` that its
   backward uses for dP and dwpe), so `torch.compile(fullgraph=True)` sees opaque ops instead of
   breaking the graph on a Triton launch;
5. input validation shared by both backends, and the dispatcher `prompt_concat`.

Who calls it: `minipt.prompt.PromptTuning.embed` only (training, evaluation, generation). Serving
(`minipt.serve.PromptBank`) goes through it too: the prompts of one length form a (K, n_p, D) bank and each
batch calls the op with `prompt_index`, once per prompt length. With the prompt-prefix KV cache the prompt
positions' keys and values come from the cache, so serving keeps only the token rows of the output,
x[:, n_p:] = wte[idx] + wpe[n_p + t]; without it the whole output goes to the prefill. Serving never runs
the backward.

Triton is optional: without it (macOS, Windows) the module imports and the reference runs.

References: Lester, Al-Rfou, Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(EMNLP 2021); the Triton tutorials (vector add, fused softmax); Liger-Kernel (linkedin/Liger-Kernel);
PyTorch "Python custom operators" (torch.library.custom_op).
"""

import contextlib

import torch
import torch.nn.functional as F

try:  # Triton ships for Linux only; everywhere else the reference runs.
    import triton
    import triton.language as tl

    HAS_TRITON = True
    # @triton.jit decides when it decorates a kernel (here, at import) whether the kernel is
    # compiled for the GPU or run by the CPU interpreter; TRITON_INTERPRET=1 must be set before.
    TRITON_INTERPRET = bool(triton.knobs.runtime.interpret)
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_INTERPRET = False

__all__ = ["prompt_concat", "prompt_concat_reference", "HAS_TRITON", "TRITON_INTERPRET"]

BACKENDS = ("auto", "triton", "reference")
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------------
# 1. Kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _prompt_concat_fwd_kernel(
        X,  # (B, T, D) output, contiguous, in the table dtype; T = n_p + n
        P,  # (K, n_p, D) prompt bank (K = 1 for one shared prompt), any float dtype
        PIDX,  # (B,) int32/int64 prompt index per example, read only when IS_BANK
        WTE,  # (V, D) token embedding table
        IDX,  # (B, n) int32/int64 token ids, contiguous
        WPE,  # (n_ctx, D) position table, read only when HAS_WPE
        stride_pk,  # elements between two prompts of the bank
        stride_pt,  # elements between two rows of one prompt
        stride_wte,  # elements between two rows of wte
        stride_wpe,  # elements between two rows of wpe
        n_rows,  # B * T, the rows of X
        n_p,  # prompt length
        n,  # tokens per example
        D,  # embedding width (any value: the last column block is masked)
        K,  # prompts in the bank: a prompt index outside [0, K) reads nothing
        V,  # rows of wte: a token id outside [0, V) reads nothing
        IS_BANK: tl.constexpr,  # P is a bank indexed by PIDX
        HAS_WPE: tl.constexpr,  # add the position row
        ALIGN: tl.constexpr,  # a power of two (<= 16) dividing D and every row stride
        BLOCK_T: tl.constexpr,  # output rows per program, a power of two
        BLOCK_D: tl.constexpr,  # columns per program, a power of two
    ):
        # Alignment hint: x // ALIGN * ALIGN equals x (ALIGN divides it) but lets the compiler
        # prove that every row starts on an ALIGN-element boundary and that the column mask is
        # constant over ALIGN columns, so rows are moved with 16-byte vector loads and stores
        # (ld.global.v4.b32 for 16-bit rows with D % 8 == 0). Triton's own specialisation only
        # marks integer arguments divisible by 16, and tl.multiple_of does not apply to scalars.
        D = D // ALIGN * ALIGN
        stride_pk = stride_pk // ALIGN * ALIGN
        stride_pt = stride_pt // ALIGN * ALIGN
        stride_wte = stride_wte // ALIGN * ALIGN
        stride_wpe = stride_wpe // ALIGN * ALIGN

        # Grid: (cdiv(B * T, BLOCK_T), cdiv(D, BLOCK_D)). Program (i, c) writes columns
        # [c*BLOCK_D, (c+1)*BLOCK_D) of the BLOCK_T rows r = i*BLOCK_T + [0, BLOCK_T) of x seen as
        # (B * T, D), with r = b * T + t. Rows may cross from one example into the next, and from
        # prompt rows into token rows, so every row gets its own b, t and source. Row offsets are
        # int64: B * T * D may exceed 2**31.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        row_mask = rows < n_rows  # the last row block may be partial
        T = n_p + n
        b = rows // T  # (BLOCK_T,) example of each row
        t = rows % T  # (BLOCK_T,) position of each row
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        col_mask = cols < D  # the last column block may be partial

        # Memory traffic, s = bytes per element: each row reads one source row (D * s, from P or
        # wte), with wpe one position row (D * s), writes one output row (D * s), and reads one
        # id (4 or 8 bytes). A program moves BLOCK_T such rows (BLOCK_D columns of them); prompt
        # and position rows are shared by the whole batch, so after the first example they come
        # from L2. DRAM traffic per example: n wte rows read + T rows written = (2n + n_p) * D * s
        # bytes, against about 4n + 3n_p rows (+ 3T with wpe) for eager embedding -> expand ->
        # cat -> add, which writes and re-reads every intermediate.
        #
        # Each row is a prompt row or a token row. Both loads are issued, each masked to the rows
        # it serves, and tl.where picks per row: masked lanes move no memory, so the traffic is
        # that of one load per row. (One select of pointers cannot do it: P and wte may differ in
        # dtype, an fp32 prompt beside a bf16 table.)
        is_prompt = t < n_p  # (BLOCK_T,)
        take_p = row_mask & is_prompt
        k = tl.zeros([BLOCK_T], dtype=tl.int64)
        if IS_BANK:
            k = tl.load(PIDX + b, mask=take_p, other=0).to(tl.int64)  # (BLOCK_T,) k_b per row
            take_p = take_p & (k >= 0) & (k < K)  # a bad index reads nothing (the op checks ids)
        # x[b, t] = P[k_b, t], cast to the table dtype like the reference's P.to(wte.dtype)
        p_rows = P + k * stride_pk + t * stride_pt  # (BLOCK_T,) row pointers
        p_mask = take_p[:, None] & col_mask[None, :]  # (BLOCK_T, BLOCK_D)
        p_vals = tl.load(p_rows[:, None] + cols[None, :], mask=p_mask, other=0.0)

        take_w = row_mask & (t >= n_p)
        # x[b, t] = wte[idx[b, t - n_p]]; the id is widened to int64 before the multiply
        tok = tl.load(IDX + b * n + (t - n_p), mask=take_w, other=0).to(tl.int64)  # (BLOCK_T,)
        take_w = take_w & (tok >= 0) & (tok < V)  # an id outside the table reads nothing
        w_rows = WTE + tok * stride_wte  # (BLOCK_T,) row pointers
        w_mask = take_w[:, None] & col_mask[None, :]  # (BLOCK_T, BLOCK_D)
        w_vals = tl.load(w_rows[:, None] + cols[None, :], mask=w_mask, other=0.0)

        vals = tl.where(is_prompt[:, None], p_vals.to(X.dtype.element_ty), w_vals)
        mask = row_mask[:, None] & col_mask[None, :]  # (BLOCK_T, BLOCK_D)
        if HAS_WPE:
            # x[b, t] += wpe[t], added in the table dtype (as the reference's x + wpe[:T])
            vals += tl.load((WPE + t * stride_wpe)[:, None] + cols[None, :], mask=mask, other=0.0)
        tl.store((X + rows * D)[:, None] + cols[None, :], vals, mask=mask)

    @triton.jit
    def _prompt_concat_bwd_kernel(
        OUT,  # (K, R, D) output, contiguous: OUT[k, t] = sum over b with k_b = k of DX[b, t]
        DX,  # (B, T, D) upstream gradient dL/dx, contiguous
        PIDX,  # (B,) int32/int64 prompt index per example, read only when IS_BANK
        B,  # batch size
        T,  # rows of DX per example, n_p + n
        R,  # rows of OUT per bank entry: n_p for dP, T for dwpe
        D,  # embedding width
        IS_BANK: tl.constexpr,  # sum only the examples whose prompt index is k
        ACC_DTYPE: tl.constexpr,  # tl.float32 (tl.float64 for fp64 gradients)
        ALIGN: tl.constexpr,  # a power of two (<= 16) dividing D: the same hint as the forward
        BLOCK_B: tl.constexpr,  # examples per step of the batch loop, a power of two
        BLOCK_D: tl.constexpr,  # columns per program, a power of two
    ):
        D = D // ALIGN * ALIGN  # alignment hint, see the forward kernel
        # Grid: (K * R, cdiv(D, BLOCK_D)). Program (r, c) owns columns [c*BLOCK_D, (c+1)*BLOCK_D)
        # of output row r = k * R + t and walks the whole batch itself, in a fixed order: the sum
        # is a reduction inside one program, never atomics, so two runs give the same bits.
        # Memory traffic: each needed row of DX is read once (B * R * D * s bytes; with a bank
        # the K programs of a row skip the examples that are not theirs: masked lanes issue no
        # load), and K * R * D output elements are written once.
        row = tl.program_id(0).to(tl.int64)
        k = row // R
        t = row % R
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        col_mask = cols < D

        # The accumulator has the tile's shape: each step adds its (BLOCK_B, BLOCK_D) tile
        # element-wise, in the registers of the threads that loaded it, so the loop needs no
        # communication between threads; the BLOCK_B partial sums are reduced once, at the end.
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC_DTYPE)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)  # (BLOCK_B,) examples of this step
            take = bs < B
            if IS_BANK:
                take = take & (tl.load(PIDX + bs, mask=take, other=-1) == k)
            offs = (bs.to(tl.int64) * T + t)[:, None] * D + cols[None, :]  # (BLOCK_B, BLOCK_D)
            tile = tl.load(DX + offs, mask=take[:, None] & col_mask[None, :], other=0.0)
            acc += tile.to(ACC_DTYPE)  # accumulated in fp32 (fp64 for fp64)
        # dP[k, t] = sum_b dX[b, t] over the examples of prompt k
        tl.store(OUT + row * D + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------
# 2. Launchers (inputs validated by `_check_inputs`; id values by `_check_values` unless the caller
#    passed check_ids=False, and masked in the kernels either way)
# ---------------------------------------------------------------------------------------------
# Block sizes and warps are tuned, not guessed: on a GPU `triton.autotune` times every config below
# the first time it meets a new key and keeps the fastest. The configs are few, and each is there
# for a reason. Bytes are per program, at GPT-2's D = 768 (a bf16 row is 1.5 KB, fp32 3 KB).
#
# Forward: a program writes BLOCK_T rows of BLOCK_D columns and reads as many, so it moves about
# 2 * BLOCK_T * min(BLOCK_D, D) * s bytes. Every config but the first holds 32 elements of the
# block per thread (BLOCK_T * BLOCK_D / (32 * num_warps)): enough loads in flight per thread to
# hide DRAM latency, few enough registers to keep several programs on each SM.
#                                                      writes per program, D = 768: bf16 / fp32
FWD_CONFIG_SPECS = (
    (1, 1024, 4),  # 1.5 KB / 3 KB: the one-row kernel; the most programs, for small B * T
    (4, 1024, 4),  # 6 KB / 12 KB: four rows, one column block per row up to D = 1024
    (8, 1024, 8),  # 12 KB / 24 KB: large batches: fewer, longer programs, twice the warps
    (16, 256, 4),  # 8 KB / 16 KB: 256 columns divide D = 768, 1024 and 4096 exactly (1024
    #                columns leave a quarter of the lanes idle at D = 768)
    (32, 256, 8),  # 16 KB / 32 KB: the most bytes per program, again without idle lanes at 768
)
# Backward: a program reduces one (row, column block) over the batch, a (BLOCK_B, BLOCK_D) tile
# per step, and reads B * min(BLOCK_D, D) * s bytes in all. Its parallelism is K * R * cdiv(D,
# BLOCK_D) programs: for one prompt of n_p = 20 rows at D = 768 that is 60 programs with 256
# columns, fewer than the SMs of a large GPU, so narrower blocks are in the list too.
#                                                      tile per step: bf16 / fp32
BWD_CONFIG_SPECS = (
    (16, 256, 4),  # 8 KB / 16 KB: the middle of the road (60 programs for n_p = 20, D = 768)
    (32, 64, 2),  # 4 KB / 8 KB: four times the programs, for short prompts on many SMs
    (8, 512, 4),  # 8 KB / 16 KB: wide column blocks for small batches (B <= 8)
    (32, 256, 8),  # 16 KB / 32 KB: large batches: the most bytes in flight per program
)
# Under the interpreter (no GPU) nothing can be timed: the launchers use one fixed config, the
# one that needs the fewest program instances on the test shapes (the interpreter costs about a
# millisecond per instance). The tests still run every config, passed explicitly.
FWD_INTERPRETER_CONFIG = 4  # index into the configs: (32, 256, 8)
BWD_INTERPRETER_CONFIG = 2  # (8, 512, 4)

if HAS_TRITON:
    FWD_CONFIGS = tuple(triton.Config({"BLOCK_T": t, "BLOCK_D": d}, num_warps=w) for t, d, w in FWD_CONFIG_SPECS)
    BWD_CONFIGS = tuple(triton.Config({"BLOCK_B": b, "BLOCK_D": d}, num_warps=w) for b, d, w in BWD_CONFIG_SPECS)

    def _autotune_bench(fn, quantiles):
        """Triton's do_bench with a shorter warm-up and fewer repetitions than its defaults (25 and
        100 ms): the kernels take microseconds, so 25 ms still times each config hundreds of times,
        and a new key costs about 30 ms per config instead of 125."""
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    # The key: a new sequence length n, width D or dtype (Triton adds the dtype of every tensor
    # argument to the key itself) is tuned again, once; the batch size is not in the key, so the
    # choice made for one B serves every B. The grid depends on the config (BLOCK_T, BLOCK_D),
    # which is why the launchers pass it as a function of the config's meta-parameters.
    _prompt_concat_fwd_tuned = triton.autotune(configs=list(FWD_CONFIGS), key=["n", "D"], do_bench=_autotune_bench)(
        _prompt_concat_fwd_kernel
    )
    _prompt_concat_bwd_tuned = triton.autotune(
        configs=list(BWD_CONFIGS), key=["B", "R", "D"], do_bench=_autotune_bench
    )(_prompt_concat_bwd_kernel)
else:  # pragma: no cover - exercised on machines without Triton
    FWD_CONFIGS = BWD_CONFIGS = ()


def config_name(config):
    """'BLOCK_T=4 BLOCK_D=1024 num_warps=4': a config in a table or a test id."""
    sizes = [f"{k}={v}" for k, v in config.kwargs.items()]
    return " ".join([*sizes, f"num_warps={config.num_warps}"])


def _on_device(device):
    """Launch on the tensors' GPU (Triton uses the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(kernel, tuned, grid, config, interpreter_config, *args, **meta):
    """kernel[grid](*args, **meta) with `config`'s block sizes and warps.

    config None: on a GPU the autotuned kernel picks the config (benchmarking all of them the
    first time it sees a key); under the interpreter the fixed `interpreter_config` runs, as no
    timing is possible there. An explicit config (tests, the config sweep) always runs as given.
    """
    if config is None and TRITON_INTERPRET:
        config = interpreter_config
    if config is None:
        tuned[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, **config.all_kwargs())


def _unit_column_stride(t):
    """Kernels index columns with stride 1 and take any row stride; copy only if needed."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _alignment(*sizes):
    """The kernels' ALIGN hint: the largest power of two, at most 16, dividing every size."""
    align = 16
    while any(size % align for size in sizes):
        align //= 2
    return align


def _acc_dtype(*dtypes):
    """Accumulate in fp32, or in fp64 when fp64 is involved (gradcheck)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _forward_triton(prompt, wte, idx, wpe, prompt_index, config=None):
    """x (B, T, D) by the forward kernel; config: a triton.Config from FWD_CONFIGS, None to tune."""
    B, n = idx.shape
    bank = prompt.dim() == 3
    P = _unit_column_stride(prompt if bank else prompt.unsqueeze(0))  # (K, n_p, D)
    if P.dtype == torch.float64 and wte.element_size() == 2:
        # torch casts fp64 to fp16/bf16 through fp32 (two roundings); do the same to match the
        # reference bit for bit. The prompt is small: K * n_p * D elements.
        P = P.float()
    wte = _unit_column_stride(wte)  # (V, D), a non-contiguous row stride is fine
    idx = idx.contiguous()  # (B, n), small
    K, n_p, D = P.shape
    T = n_p + n
    x = torch.empty(B, T, D, dtype=wte.dtype, device=wte.device)  # (B, T, D)
    if wpe is not None:
        wpe = _unit_column_stride(wpe)
    pidx = prompt_index.contiguous() if bank else idx  # placeholder pointer when unused
    strides = (P.stride(0), P.stride(1), wte.stride(0), wpe.stride(0) if wpe is not None else 0)

    def grid(meta):  # the grid follows the config's block sizes
        return (triton.cdiv(B * T, meta["BLOCK_T"]), triton.cdiv(D, meta["BLOCK_D"]))

    with _on_device(x.device):
        _launch(
            _prompt_concat_fwd_kernel,
            _prompt_concat_fwd_tuned,
            grid,
            config,
            FWD_CONFIGS[FWD_INTERPRETER_CONFIG],
            x,
            P,
            pidx,
            wte,
            idx,
            wpe if wpe is not None else x,  # placeholder pointer when unused
            *strides,  # stride_pk, stride_pt, stride_wte, stride_wpe
            B * T,
            n_p,
            n,
            D,
            K,
            wte.shape[0],
            IS_BANK=bank,
            HAS_WPE=wpe is not None,
            ALIGN=_alignment(D, *strides),
        )
    return x


def _batch_sum_triton(dx, prompt_index, K, R, out_dtype, config=None):
    """out[k, t] = sum over b with k_b = k of dx[b, t], t < R (all b when prompt_index is None).

    config: a triton.Config from BWD_CONFIGS, None to tune.
    """
    dx = dx.contiguous()  # (B, T, D)
    B, T, D = dx.shape
    out = torch.empty(K, R, D, dtype=out_dtype, device=dx.device)  # (K, R, D)
    bank = prompt_index is not None
    acc = tl.float64 if _acc_dtype(dx.dtype, out_dtype) == torch.float64 else tl.float32

    def grid(meta):  # BLOCK_B sets the loop step, BLOCK_D the grid
        return (K * R, triton.cdiv(D, meta["BLOCK_D"]))

    with _on_device(dx.device):
        _launch(
            _prompt_concat_bwd_kernel,
            _prompt_concat_bwd_tuned,
            grid,
            config,
            BWD_CONFIGS[BWD_INTERPRETER_CONFIG],
            out,
            dx,
            prompt_index.contiguous() if bank else dx,  # placeholder pointer when unused
            B,
            T,
            R,
            D,
            IS_BANK=bank,
            ACC_DTYPE=acc,
            ALIGN=_alignment(D),
        )
    return out


# ---------------------------------------------------------------------------------------------
# 3. The plain PyTorch reference
# ---------------------------------------------------------------------------------------------
def prompt_concat_reference(prompt, wte, idx, wpe=None, prompt_index=None):
    """Plain PyTorch version of the op: embedding, expand, cat, + wpe (no validation)."""
    B, n = idx.shape
    if prompt.dim() == 3:  # a bank (K, n_p, D): one prompt per example
        p = prompt[prompt_index.long()]  # (B, n_p, D)
    else:
        p = prompt.unsqueeze(0).expand(B, -1, -1)  # (B, n_p, D)
    tok = F.embedding(idx.long(), wte)  # (B, n, D); same rows as wte[idx], a faster gather on CPU
    x = torch.cat([p.to(wte.dtype), tok], dim=1)  # (B, n_p + n, D)
    if wpe is not None:
        x = x + wpe[: x.shape[1]]  # (B, n_p + n, D)
    return x


def _batch_sum_reference(dx, prompt_index, K, R, out_dtype):
    """Same contract as `_batch_sum_triton`, in PyTorch (a matmul with a one-hot of k_b)."""
    acc = _acc_dtype(dx.dtype, out_dtype)
    g = dx[:, :R].to(acc)  # (B, R, D)
    if prompt_index is None:
        return g.sum(0, keepdim=True).to(out_dtype)  # (1, R, D)
    onehot = F.one_hot(prompt_index.long(), K).to(acc)  # (B, K)
    return torch.einsum("bk,brd->krd", onehot, g).to(out_dtype)  # (K, R, D)


# ---------------------------------------------------------------------------------------------
# 4. Custom ops and the autograd formula
# ---------------------------------------------------------------------------------------------
# torch.library.custom_op makes each op one opaque node for torch.compile (no graph break at the
# Triton launch, no tracing into the interpreter); register_fake tells the compiler the output's
# shape and dtype; register_autograd builds the autograd.Function from `_setup_context` and
# `_backward` below. Optional tensors (wpe, prompt_index) are `Tensor?` in the schema.


@torch.library.custom_op("minipt::prompt_concat", mutates_args=())
def _prompt_concat_op(
    prompt: torch.Tensor,
    wte: torch.Tensor,
    idx: torch.Tensor,
    wpe: torch.Tensor | None,
    prompt_index: torch.Tensor | None,
    use_triton: bool,
    check_ids: bool,
) -> torch.Tensor:
    if check_ids:
        _check_values(prompt, wte, idx, prompt_index)  # data-dependent: here, not at trace time
    if use_triton:
        return _forward_triton(prompt, wte, idx, wpe, prompt_index)
    return prompt_concat_reference(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index)


@_prompt_concat_op.register_fake
def _(prompt, wte, idx, wpe, prompt_index, use_triton, check_ids):
    B, n = idx.shape
    n_p, D = prompt.shape[-2:]
    return wte.new_empty(B, n_p + n, D)  # (B, T, D) in the table dtype


@torch.library.custom_op("minipt::prompt_concat_batch_sum", mutates_args=())
def _batch_sum_op(
    dx: torch.Tensor,
    prompt_index: torch.Tensor | None,
    K: int,
    R: int,
    out_dtype: torch.dtype,
    use_triton: bool,
) -> torch.Tensor:
    if use_triton:
        return _batch_sum_triton(dx, prompt_index, K, R, out_dtype)
    return _batch_sum_reference(dx, prompt_index, K, R, out_dtype)


@_batch_sum_op.register_fake
def _(dx, prompt_index, K, R, out_dtype, use_triton):
    return dx.new_empty(K, R, dx.shape[-1], dtype=out_dtype)  # (K, R, D)


def _setup_context(ctx, inputs, output):
    prompt, wte, idx, wpe, prompt_index, use_triton, _ = inputs
    ctx.save_for_backward(idx, prompt_index)  # ids only: no (V, D) or (B, T, D) tensor is kept
    ctx.prompt_shape = prompt.shape
    ctx.prompt_dtype = prompt.dtype
    ctx.wte_shape = wte.shape
    ctx.wte_dtype = wte.dtype
    ctx.n_pos = 0 if wpe is None else wpe.shape[0]
    ctx.use_triton = use_triton


def _backward(ctx, dx):
    """dP always, dwpe and dwte only for the inputs that require grad (ctx.needs_input_grad).

    The frozen path (wte.requires_grad False, as in prompt tuning) returns None for wte and never
    allocates a (V, D) gradient. When wte does require grad (the full fine-tuning comparison),
    dwte is a scatter-add (`index_add_`): exact on CPU, but on the GPU it uses atomics, so it is
    not bit-deterministic there. dP and dwpe are deterministic everywhere.
    """
    idx, prompt_index = ctx.saved_tensors
    n_p, D = ctx.prompt_shape[-2:]
    K = ctx.prompt_shape[0] if len(ctx.prompt_shape) == 3 else 1
    d_prompt = d_wte = d_wpe = None
    if ctx.needs_input_grad[0]:
        # dP[k, t] = sum over b with k_b = k of dx[b, t], t < n_p, in the prompt's dtype
        d_prompt = _batch_sum_op(dx, prompt_index, K, n_p, ctx.prompt_dtype, ctx.use_triton)
        d_prompt = d_prompt.reshape(ctx.prompt_shape)  # (n_p, D) or (K, n_p, D)
    if ctx.needs_input_grad[1]:
        # dwte[v] = sum over (b, i) with idx[b, i] = v of dx[b, n_p + i], accumulated in fp32
        V = ctx.wte_shape[0]
        acc = _acc_dtype(ctx.wte_dtype)
        rows = dx[:, n_p:].reshape(-1, D).to(acc)  # (B * n, D)
        # index_add_ writes into the fresh zero tensor it is called on: no input is modified
        d_wte = torch.zeros(V, D, dtype=acc, device=dx.device).index_add_(0, idx.reshape(-1), rows)
        d_wte = d_wte.to(ctx.wte_dtype)  # (V, D)
    if ctx.needs_input_grad[3]:
        # dwpe[t] = sum_b dx[b, t] for t < T; rows T .. n_ctx - 1 were not used: zero
        T = dx.shape[1]
        used = _batch_sum_op(dx, None, 1, T, dx.dtype, ctx.use_triton)[0]  # (T, D)
        d_wpe = F.pad(used, (0, 0, 0, ctx.n_pos - T))  # (n_ctx, D)
    return d_prompt, d_wte, None, d_wpe, None, None, None


_prompt_concat_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# 5. Validation and the dispatcher
# ---------------------------------------------------------------------------------------------
def _dtype_names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_inputs(prompt, wte, idx, wpe, prompt_index):
    """Shapes, dtypes and devices: metadata only, so it also runs while torch.compile traces."""
    named = {"prompt": prompt, "wte": wte, "idx": idx, "wpe": wpe, "prompt_index": prompt_index}
    for name, t in named.items():
        if (t is not None or name in ("prompt", "wte", "idx")) and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name in ("prompt", "wte", "wpe"):
        t = named[name]
        if t is not None and t.dtype not in TABLE_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of {_dtype_names(TABLE_DTYPES)}")
    for name in ("idx", "prompt_index"):
        t = named[name]
        if t is not None and t.dtype not in ID_DTYPES:
            raise TypeError(f"{name} must hold integer ids (int32 or int64), got dtype {t.dtype}")
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"prompt_concat inputs must be on one device, got {where}")

    if idx.dim() != 2:
        raise ValueError(f"idx must be 2-D (B, n), got shape {tuple(idx.shape)}")
    B, n = idx.shape
    if B == 0:
        raise ValueError("idx is an empty batch (B == 0); prompt_concat needs B >= 1")
    if wte.dim() != 2:
        raise ValueError(f"wte must be 2-D (V, D), got shape {tuple(wte.shape)}")
    if prompt.dim() == 2:
        if prompt_index is not None:
            raise ValueError(
                "prompt_index is given but prompt is a single (n_p, D) prompt; "
                "pass a bank (K, n_p, D) or drop prompt_index"
            )
    elif prompt.dim() == 3:
        if prompt_index is None:
            raise ValueError(
                f"prompt is a bank of shape {tuple(prompt.shape)} (K, n_p, D): "
                "prompt_index (B,) must say which prompt each example uses"
            )
        if prompt_index.shape != (B,):
            raise ValueError(f"prompt_index must have shape (B,) = ({B},), got {tuple(prompt_index.shape)}")
        if prompt.shape[0] == 0:
            raise ValueError("prompt is an empty bank (K == 0)")
    else:
        raise ValueError(f"prompt must be (n_p, D) or a bank (K, n_p, D), got shape {tuple(prompt.shape)}")
    n_p, D = prompt.shape[-2:]
    if n_p == 0:
        raise ValueError("prompt has no rows (n_p == 0); prompt_concat needs n_p >= 1")
    if D == 0:
        raise ValueError("prompt has D == 0 columns")
    if wte.shape[1] != D:
        raise ValueError(f"D mismatch: prompt has D={D} but wte has D={wte.shape[1]}")
    if wpe is not None:
        if wpe.dim() != 2:
            raise ValueError(f"wpe must be 2-D (n_ctx, D), got shape {tuple(wpe.shape)}")
        if wpe.shape[1] != D:
            raise ValueError(f"D mismatch: prompt has D={D} but wpe has D={wpe.shape[1]}")
        if wpe.dtype != wte.dtype:
            raise TypeError(f"wpe dtype {wpe.dtype} must match wte dtype {wte.dtype}")
        if n_p + n > wpe.shape[0]:
            raise ValueError(f"n_p + n = {n_p} + {n} = {n_p + n} positions exceed wpe's {wpe.shape[0]} rows")


def _id_ranges(prompt, wte, idx, prompt_index):
    """(name, ids, limit, what the ids are, what they index) per id tensor: 0 <= ids < limit."""
    ranges = []
    if idx.numel() > 0:
        ranges.append(("idx", idx, wte.shape[0], "token ids", f"wte has V={wte.shape[0]} rows"))
    if prompt_index is not None:
        K = prompt.shape[0]
        ranges.append(("prompt_index", prompt_index, K, "values", f"the bank has K={K} prompts"))
    return ranges


def _check_values(prompt, wte, idx, prompt_index):
    """Id ranges, checked on the data before any launch: no kernel reads out of bounds.

    On the CPU a clear ValueError (the ids are host memory: reading their range costs no sync).
    On a GPU reading the range back to the host would stall the CPU until the GPU caught up, on
    every call; instead a device-side assert is queued on the stream ahead of the op's kernels:
    one reduction of the ids (B * n of them, a few bytes each) and torch._assert_async, whose
    failure prints a message naming the argument and stops the stream before the kernels run.
    (The kernels themselves also mask every id outside its table, so they never read out of
    bounds, even with check_ids=False.) Called inside the custom op, so torch.compile does not
    have to trace data-dependent Python.
    """
    for name, ids, limit, what, table in _id_ranges(prompt, wte, idx, prompt_index):
        if ids.device.type == "cuda":
            _check_ids_on_device(name, ids, limit, what)
            continue
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()
        if lo < 0 or hi >= limit:
            raise ValueError(
                f"{name} holds {what} in [{lo}, {hi}] but {table}: "
                f"{'ids' if name == 'idx' else 'indices'} must be in [0, {limit})"
            )


def _check_ids_on_device(name, ids, limit, what):
    """0 <= ids < limit as a device-side assert: queued on the stream, no host sync.

    On CUDA a failure prints `prompt_concat: <name> holds <what> outside [0, <limit>)` from the
    device and turns the next synchronising call into `RuntimeError: CUDA error: device-side
    assert triggered`; the CUDA context is unusable after that (as after any device-side
    assert), so the process must restart. On CPU tensors torch._assert_async raises at once, a
    RuntimeError with the same message (the tests use that to check the condition and message).
    """
    lo, hi = torch.aminmax(ids)  # two 0-dim tensors on the ids' device
    message = f"prompt_concat: {name} holds {what} outside [0, {limit})"
    torch._assert_async((lo >= 0) & (hi < limit), message)


def _resolve_backend(backend, device):
    """True for the Triton kernels (compiled or interpreted), False for the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if not HAS_TRITON:
        reason = "Triton is not installed (it ships for Linux only)"
    elif device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRET):
        return True
    elif device.type == "cpu":
        reason = (
            "the tensors are on the CPU and Triton's interpreter is off "
            "(set TRITON_INTERPRET=1 before importing triton)"
        )
    else:
        reason = f"Triton does not run on {device.type} tensors"
    if backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run here: {reason}; use backend='reference' or 'auto'")
    return False


def prompt_concat(prompt, wte, idx, wpe=None, prompt_index=None, backend="auto", check_ids=True):
    """x = [P; wte[idx]] (+ wpe[:T]) as one (B, n_p + n, D) tensor in wte's dtype.

    Args:
        prompt: (n_p, D) one prompt for the whole batch, or (K, n_p, D) a bank of prompts.
            Any float dtype; cast to wte's dtype in the output. Its gradient comes back in its
            own dtype, accumulated in fp32 over the batch, deterministically.
        wte: (V, D) token embedding table: float32, float16, bfloat16 or float64.
        idx: (B, n) int32 or int64 token ids in [0, V).
        wpe: optional (n_ctx, D) position table with n_ctx >= n_p + n, wte's dtype.
        prompt_index: (B,) ids in [0, K), required with a bank, not allowed without.
        backend: "auto" runs the Triton kernels on CUDA tensors (and on CPU tensors under
            TRITON_INTERPRET=1) and the PyTorch reference elsewhere; "triton" insists on the
            kernels (RuntimeError where they cannot run); "reference" is plain PyTorch.
        check_ids: check that 0 <= idx < V and 0 <= prompt_index < K (the default). False
            when the caller has validated the ids already (PromptTuning does, once, at its own
            boundary): the op then reads no id values at all. Either way the kernels never read
            outside the tables: a bad id's row comes out as zeros (+ wpe) on the Triton path,
            and the reference fails in torch's own indexing.

    What a bad id looks like, by device (shapes, dtypes and devices are checked on the host
    everywhere, before anything runs, with a TypeError or ValueError naming the argument):
        CPU   ValueError before any launch, e.g. "idx holds token ids in [0, 10] but wte has
              V=10 rows: ids must be in [0, 10)".
        CUDA  no host sync (the check is a device-side assert queued ahead of the kernels):
              the device prints "prompt_concat: idx holds token ids outside [0, 10)" and the
              next synchronising call raises "RuntimeError: CUDA error: device-side assert
              triggered"; as after any device-side assert, the process must be restarted.

    Gradients flow to prompt, and to wte and wpe only when they require grad: a frozen table
    gets None and no (V, D) gradient is ever allocated. Both backends share the validation, so
    a bad input raises the same TypeError or ValueError, naming the argument, on either.
    """
    _check_inputs(prompt, wte, idx, wpe, prompt_index)
    use_triton = _resolve_backend(backend, wte.device)
    return _prompt_concat_op(prompt, wte, idx, wpe, prompt_index, use_triton, bool(check_ids))
