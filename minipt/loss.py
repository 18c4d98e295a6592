"""Every language-model loss minipt computes: the plain one, and the fused frozen head.

    L = (1 / N) sum over supervised positions i of  -log softmax(h_i W^T)[y_i]                         (1)

h (.., D) are the hidden states after ln_f, W (V, D) is the output head (tied with wte), y the targets and
N the number of supervised positions (targets != -100, and attention_mask != 0 when a mask is given).
Targets are already shifted: targets[:, t] is the token that position t predicts (nanoGPT's convention).

lm_loss computes (1) from logits. frozen_lm_loss computes it from h when W is frozen, without ever keeping
the (N, V) logits: the gradient dL/dh is computed in the forward pass, chunk by chunk (eqs. 2-3 below), and
is all that autograd keeps. The inputs are checked once, at the public boundary (`minipt.checks`); the
functions here trust them.

References: Lester et al. 2021 (prompt tuning, a frozen model); Liger-Kernel's fused linear cross-entropy
(chunked logits, gradient computed in the forward pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "IGNORE_INDEX",
    "CHUNK_ELEMENTS",
    "mask_padding",
    "lm_loss",
    "check_targets",
    "supervised_count",
    "FrozenHeadCrossEntropy",
    "frozen_head_cross_entropy",
    "frozen_lm_loss",
]

IGNORE_INDEX = -100  # a target that is not supervised (F.cross_entropy's default ignore_index)
# Rows of logits computed at once: a chunk of logits is at most this many elements (32 MiB in fp32).
CHUNK_ELEMENTS = 2**23


def mask_padding(targets: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """targets with -100 at padded positions (attention_mask == 0); unchanged when there is no mask.

    With right padding, causal attention already keeps real tokens from seeing the padding after them, so the
    mask is needed only here, to take no loss at the padded positions.
    """
    if attention_mask is None:
        return targets
    return targets.masked_fill(attention_mask == 0, IGNORE_INDEX)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. (1) from logits (B, T, V) and targets (B, T) with -100 where no loss is taken."""
    # fp16/bf16 logits are upcast to fp32 for the softmax; fp64 stays fp64 (float64 gradient checks)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def check_targets(targets, shape) -> None:
    """targets is an int64 tensor of the shape of idx (metadata only): int64 is what cross-entropy takes, and a
    narrower integer could not hold the ignore index -100 (uint8) or fails inside torch with no word of targets."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.shape != torch.Size(shape):
        raise ValueError(f"targets must have the shape of idx {tuple(shape)}, got {tuple(targets.shape)}")
    if targets.dtype != torch.long:
        raise TypeError(
            f"targets must hold int64 token ids (torch.long, -100 where no loss is taken), got dtype {targets.dtype}"
        )


def supervised_count(keep: torch.Tensor | int) -> int:
    """How many positions take a loss (keep: the (B, T) mask, one host read, or the count itself); an error when
    there is none."""
    n = int(keep.sum()) if isinstance(keep, torch.Tensor) else int(keep)
    if n == 0:
        raise ValueError("targets has no supervised position (every entry is -100)")
    return n


# ---- the frozen head fused with the cross-entropy ---------------------------------------------------------


def _chunk_rows(W: torch.Tensor, chunk_size: int | None) -> int:
    """Rows per chunk: chunk_size, else as many as keep a chunk of logits under CHUNK_ELEMENTS."""
    return chunk_size or max(1, CHUNK_ELEMENTS // W.shape[0])


def _chunked_loss(h, W, targets, chunk_size, ignore_index, need_dh):
    """Sum of the cross-entropy of the rows of h @ W^T, the number of rows counted, and dh (or None).

    Per chunk of rows, with logits z = h W^T, p = softmax(z), y the target:
        loss_i = logsumexp(z_i) - z_i[y_i]
        dL/dz_i = (p_i - onehot(y_i)) / N          N = number of rows with y_i != ignore_index   (2)
        dL/dh_i = dL/dz_i W                                                                       (3)
    The softmax, logsumexp and loss sum are in fp32 (fp64 stays fp64); the two matmuls run in W's dtype,
    which on GPUs accumulates in fp32 already. A chunk's logits are freed before the next chunk.
    """
    acc = torch.promote_types(h.dtype, torch.float32)
    valid = targets != ignore_index  # (N,)
    n_valid = valid.sum()
    loss_sum = torch.zeros((), dtype=acc, device=h.device)
    dh = torch.empty_like(h) if need_dh else None  # (N, D)
    for start in range(0, h.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        z = (h[rows] @ W.t()).to(acc)  # (C, V)
        ok = valid[rows]  # (C,)
        y = torch.where(ok, targets[rows], 0)[:, None]  # (C, 1), any valid index on ignored rows
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (C, 1)
        loss_sum += ((lse - z.gather(1, y)).squeeze(1) * ok).sum()
        if need_dh:
            g = z.sub_(lse).exp_()  # (C, V) softmax, in place: z is not needed any more
            g.scatter_add_(1, y, torch.full_like(y, -1, dtype=acc))  # p - onehot(y)       (2)
            g.mul_((ok.to(acc) / n_valid)[:, None])  # / N, and 0 on ignored rows
            dh[rows] = g.to(W.dtype) @ W  # (C, V) @ (V, D) -> (C, D)                    (3)
        # Free this chunk's logits now: the loop would otherwise make the next chunk's (z = ...) while these
        # still live (as z and g), two (C, V) blocks at the peak instead of one.
        del z, lse
        if need_dh:
            del g
    return loss_sum, n_valid, dh


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """loss = F.cross_entropy(h W^T, targets, ignore_index) with W frozen, without keeping the logits.

    F.cross_entropy keeps the (N, V) log-softmax for backward. Here the gradient dh (N, D) is computed in
    the forward pass, chunk by chunk (eqs. 2-3 of `_chunked_loss`), and is all that is saved; backward only
    scales it by the upstream gradient. The mean is over rows with targets != ignore_index (NaN if none,
    as for F.cross_entropy). W must not require grad: no (V, D) gradient is ever made.
    """

    @staticmethod
    def forward(ctx, h, W, targets, chunk_size=None, ignore_index=IGNORE_INDEX):
        if W.requires_grad:
            raise ValueError("FrozenHeadCrossEntropy is for a frozen head: W must not require grad")
        loss_sum, n_valid, dh = _chunked_loss(h, W, targets, _chunk_rows(W, chunk_size), ignore_index, need_dh=True)
        ctx.save_for_backward(dh)  # (N, D): the only tensor kept
        return loss_sum / n_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        (dh,) = ctx.saved_tensors
        return (dh * dloss).to(dh.dtype), None, None, None, None  # dL/dh = dloss * dh; nothing for W


def frozen_head_cross_entropy(
    h: torch.Tensor,
    W: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """F.cross_entropy(F.linear(h, W), targets) for h (N, D), a frozen W (V, D), targets (N,).

    The loss is in fp32 for 16-bit inputs (fp64 for fp64). Without a gradient to compute (no_grad, or h
    not requiring grad) it skips dh and saves nothing.
    """
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(
            f"expected h (N, D), W (V, D), targets (N,); got {tuple(h.shape)}, {tuple(W.shape)}, {tuple(targets.shape)}"
        )
    if torch.is_grad_enabled() and h.requires_grad:
        return FrozenHeadCrossEntropy.apply(h, W, targets, chunk_size, ignore_index)
    loss_sum, n_valid, _ = _chunked_loss(h, W, targets, _chunk_rows(W, chunk_size), ignore_index, need_dh=False)
    return loss_sum / n_valid


def frozen_lm_loss(
    h: torch.Tensor,
    W: torch.Tensor,
    targets: torch.Tensor,
    n_supervised: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Eq. (1) from hidden states h (B, T, D) and a frozen head W (V, D), with logits only where targets != -100.

    n_supervised, the number of such positions, comes from `minipt.checks.check_batch`, which has already
    read it from the device; without it, it is read here (one more host sync).
    """
    check_targets(targets, h.shape[:2])
    keep = targets.reshape(-1) != IGNORE_INDEX  # (B*T,)
    if n_supervised is None:
        n_supervised = supervised_count(keep)
    # The indices of the supervised rows, without a host sync: `keep.nonzero()` would have to ask the device
    # how many there are, but we know it. A stable sort puts the True entries first, in their order.
    rows = torch.argsort(keep.to(torch.int8), descending=True, stable=True)[:n_supervised]  # (M,)
    h_rows = h.reshape(-1, h.shape[-1]).index_select(0, rows)  # (M, D)
    return frozen_head_cross_entropy(h_rows, W, targets.reshape(-1).index_select(0, rows), chunk_size)
