"""The reference kernel the launcher exercise runs behind its stand-in (imported only when Triton is installed).

One program per output row (b, t), as in the student's kernel of notebook `02_kernel`:

    x[b, t, :] = (P[t, :] if t < n_p else wte[idx[b, t - n_p], :]) + wpe[t, :]

Memory traffic per program: one row of P or wte and one row of wpe read, one row of x written (3 D elements),
plus one token id for the token rows.
"""

import triton
import triton.language as tl

__all__ = ["concat_kernel"]


@triton.jit
def concat_kernel(
    X,  # (B, n_p + n, D) output
    P,  # (n_p, D) the soft prompt
    WTE,  # (V, D) token embeddings
    WPE,  # (n_ctx, D) position embeddings
    IDX,  # (B, n) token ids, int64
    n_p,  # number of prompt rows
    n,  # number of input tokens
    D,  # width of a row
    BLOCK_D: tl.constexpr,  # a power of two >= D
):
    b = tl.program_id(0)
    t = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D  # BLOCK_D may exceed D: the extra lanes neither load nor store
    if t < n_p:
        row = tl.load(P + t * D + offs, mask=mask)
    else:
        token = tl.load(IDX + b * n + (t - n_p)).to(tl.int64)  # int64 row offsets: V * D may pass 2**31
        row = tl.load(WTE + token * D + offs, mask=mask)
    row += tl.load(WPE + t * D + offs, mask=mask)
    tl.store(X + (b * (n_p + n) + t).to(tl.int64) * D + offs, row, mask=mask)
