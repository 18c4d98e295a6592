"""Exercises on the math of prompt tuning (notebook `01_math`): the input, its gradient, the head, attention.

Each checker tries a few hand-made edge cases and a dozen cases drawn from seeded generators (`draw_cases`:
irregular sizes, B = 1 and B > 1, n_p = 1, a sequence that exactly fills wpe, float64, and float16 for the
concatenation), computes the expected output with a few lines of PyTorch (autograd in float64 wherever a
gradient is asked for) before the answer runs, and lists the wrong answers it can name.

Equations (Lester et al. 2021, section 2; the numbers are those of notebook 1):

    (1) x[b, t] = (P[t] if t < n_p else wte[idx[b, t - n_p]]) + wpe[t]          x: (B, n_p + n, D)
    (2) dL/dP[t] = sum_b dL/dx[b, t]                        (t < n_p)           dP: (n_p, D)
    (3) L = (1/N) sum_i -log softmax(h_i W^T)[y_i]  =>  dL/dh = (softmax(h W^T) - onehot(y)) W / N
    (4) y = softmax(q k^T / sqrt(hd) + causal mask) v: position t sees positions 0 .. t, the prompt included
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .result import Case, CheckResult, Mistake, check_function, draw_cases, pick, randint

__all__ = [
    "CAUSAL_ATTENTION_MISTAKES",
    "CHECKERS",
    "CONCAT_BACKWARD_MISTAKES",
    "CONCAT_MISTAKES",
    "DTYPE_NOTE",
    "FROZEN_HEAD_MISTAKES",
    "attention_case",
    "causal_attention_cases",
    "causal_attention_reference",
    "check_causal_attention",
    "check_concat",
    "check_concat_backward",
    "check_frozen_head_backward",
    "concat_backward_case",
    "concat_backward_cases",
    "concat_backward_reference",
    "concat_backward_tolerances",
    "concat_case",
    "concat_cases",
    "concat_reference",
    "concat_tolerances",
    "draw_concat_case",
    "frozen_head_backward_cases",
    "frozen_head_backward_reference",
    "frozen_head_case",
]


def _randn(gen: torch.Generator, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype)


# ---- concat: equation (1) -------------------------------------------------------------------------------


def concat_reference(prompt, wte, idx, wpe):
    B, n = idx.shape
    n_p = prompt.shape[0]
    x = torch.cat([prompt.to(wte.dtype).expand(B, -1, -1), wte[idx]], dim=1)  # (B, n_p + n, D)
    return x + wpe[: n_p + n]


DTYPE_NOTE = {torch.float32: "", torch.float64: "fp64", torch.float16: "fp16"}


def concat_case(gen, B, n_p, n, D, dtype=torch.float32, V=11, extra_ctx=3) -> Case:
    """extra_ctx: rows of wpe beyond the n_p + n the sequence needs (0: the sequence fills the context)."""
    args = (
        _randn(gen, n_p, D, dtype=dtype),
        _randn(gen, V, D, dtype=dtype),
        torch.randint(0, V, (B, n), generator=gen),
        _randn(gen, n_p + n + extra_ctx, D, dtype=dtype),
    )
    notes = [DTYPE_NOTE[dtype]] + (["fills wpe: n_p + n = n_ctx"] if extra_ctx == 0 else [])
    return Case(dict(B=B, n_p=n_p, n=n, D=D), args, ", ".join(x for x in notes if x))


def draw_concat_case(gen) -> Case:
    return concat_case(
        gen,
        randint(gen, 1, 4),
        randint(gen, 1, 5),
        randint(gen, 1, 6),
        randint(gen, 1, 13),
        pick(gen, [torch.float32, torch.float32, torch.float64, torch.float16]),
        V=randint(gen, 2, 20),
        extra_ctx=pick(gen, [0, 0, 1, 4]),
    )


def concat_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(1)
    fixed = [
        concat_case(gen, 2, 3, 4, 8),
        concat_case(gen, 1, 1, 1, 5),
        concat_case(gen, 3, 1, 5, 7, extra_ctx=0),
        concat_case(gen, 2, 2, 1, 3, torch.float64),
        concat_case(gen, 2, 2, 3, 6, torch.float16),
    ]
    return fixed + draw_cases(1, 12, draw_concat_case)


def concat_tolerances(case: Case) -> tuple[float, float]:
    """float16 keeps 11 bits: adding in float32 and rounding once may differ from adding in float16 by an ulp."""
    return (2e-3, 2e-3) if case.args[1].dtype == torch.float16 else (1e-6, 1e-6)


CONCAT_MISTAKES = [
    Mistake(
        "the token rows restart their positions at 0 (wpe[0:n] instead of wpe[n_p:n_p + n])",
        lambda P, wte, idx, wpe: torch.cat(
            [(P + wpe[: len(P)]).expand(len(idx), -1, -1), wte[idx] + wpe[: idx.shape[1]]], dim=1
        ),
    ),
    Mistake(
        "the prompt is put after the tokens instead of in front of them",
        lambda P, wte, idx, wpe: (
            torch.cat([wte[idx], P.expand(len(idx), -1, -1)], dim=1) + wpe[: len(P) + idx.shape[1]]
        ),
    ),
    Mistake(
        "the position embeddings are forgotten (no + wpe[:n_p + n])",
        lambda P, wte, idx, wpe: torch.cat([P.expand(len(idx), -1, -1), wte[idx]], dim=1),
    ),
    Mistake(
        "only the token rows get positions (wpe[n_p:n_p + n]); the prompt rows get none",
        lambda P, wte, idx, wpe: torch.cat(
            [P.expand(len(idx), -1, -1), wte[idx] + wpe[len(P) : len(P) + idx.shape[1]]], dim=1
        ),
    ),
    Mistake(
        "the prompt rows get no positions and the token rows keep the model's usual wpe[0:n]",
        lambda P, wte, idx, wpe: torch.cat([P.expand(len(idx), -1, -1), wte[idx] + wpe[: idx.shape[1]]], dim=1),
    ),
    Mistake(
        "the token rows are reshaped in the wrong order ((n, B) where the ids are (B, n)): example b then "
        "gets tokens of other examples",
        lambda P, wte, idx, wpe: (
            torch.cat(
                [
                    P.to(wte.dtype).expand(len(idx), -1, -1),
                    wte[idx.reshape(-1)].reshape(idx.shape[1], len(idx), -1).transpose(0, 1),
                ],
                dim=1,
            )
            + wpe[: len(P) + idx.shape[1]]
        ),
    ),
    Mistake(
        "every prompt row is P[0]: the n_p prompt rows are P[0], ..., P[n_p - 1]",
        lambda P, wte, idx, wpe: (
            torch.cat([P[:1].to(wte.dtype).expand(len(idx), len(P), -1), wte[idx]], dim=1)
            + wpe[: len(P) + idx.shape[1]]
        ),
    ),
    Mistake(
        "the positions start at 1 (wpe[1:n_p + n + 1]): row t of x gets wpe[t], from wpe[0]",
        lambda P, wte, idx, wpe: (
            torch.cat([P.to(wte.dtype).expand(len(idx), -1, -1), wte[idx]], dim=1) + wpe[1 : len(P) + idx.shape[1] + 1]
        ),
    ),
]


def check_concat(answer) -> CheckResult:
    """answer(prompt (n_p, D), wte (V, D), idx (B, n) int64, wpe (n_ctx, D)) -> x (B, n_p + n, D)."""
    return check_function(
        "concat",
        answer,
        concat_cases(),
        concat_reference,
        arg_names=("prompt", "wte", "idx", "wpe"),
        dims=("b", "t", "d"),
        name="x",
        shape_doc="(B, n_p + n, D)",
        mistakes=CONCAT_MISTAKES,
        tolerances=concat_tolerances,
    )


# ---- concat_backward: equation (2) ----------------------------------------------------------------------


def concat_backward_reference(dx, n_p):
    return dx[:, :n_p].sum(dim=0)  # (n_p, D)


def concat_backward_case(gen, B, n_p, n, D, dtype=torch.float64) -> Case:
    return Case(dict(B=B, n_p=n_p, n=n, D=D), (_randn(gen, B, n_p + n, D, dtype=dtype), n_p), DTYPE_NOTE[dtype])


def concat_backward_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(2)
    fixed = [concat_backward_case(gen, *sizes) for sizes in [(2, 3, 4, 8), (1, 1, 1, 5), (3, 1, 5, 7), (4, 2, 1, 3)]]
    return fixed + draw_cases(
        2,
        12,
        lambda g: concat_backward_case(
            g,
            randint(g, 1, 5),
            randint(g, 1, 5),
            randint(g, 1, 6),
            randint(g, 1, 11),
            pick(g, [torch.float64, torch.float64, torch.float32]),
        ),
    )


def concat_backward_tolerances(case: Case) -> tuple[float, float]:
    """A float32 sum of B terms in another order differs by a few ulps."""
    return (1e-12, 1e-10) if case.args[0].dtype == torch.float64 else (1e-5, 1e-5)


CONCAT_BACKWARD_MISTAKES = [
    Mistake(
        "the batch is averaged (a mean over b) instead of summed: every example adds its own dL/dx",
        lambda dx, n_p: dx[:, :n_p].mean(dim=0),
    ),
    Mistake(
        "the last n_p rows are taken (dx[:, -n_p:]): the prompt sits in front, at t = 0 .. n_p - 1",
        lambda dx, n_p: dx[:, -n_p:].sum(dim=0),
    ),
    Mistake("only the first example is used (dx[0, :n_p]): that is right for B = 1 only", lambda dx, n_p: dx[0, :n_p]),
    Mistake(
        "the sum runs over the positions (dim=1) instead of over the batch (dim=0)",
        lambda dx, n_p: dx[:, :n_p].sum(dim=1),
    ),
    Mistake(
        "every position is kept (dx.sum(0)): only the first n_p rows of x come from P", lambda dx, n_p: dx.sum(dim=0)
    ),
    Mistake(
        "the (B, n_p) rows are reshaped as (n_p, B) before the sum: each prompt row then sums rows of other positions",
        lambda dx, n_p: dx[:, :n_p].reshape(n_p, dx.shape[0], -1).sum(dim=1),
    ),
    Mistake(
        "the rows 1 .. n_p are taken (off by one): the prompt rows are t = 0 .. n_p - 1",
        lambda dx, n_p: dx[:, 1 : n_p + 1].sum(dim=0),
    ),
    Mistake(
        "the token rows are summed (dx[:, n_p:]): the prompt's gradient comes from its own rows",
        lambda dx, n_p: dx[:, n_p : 2 * n_p].sum(dim=0),
    ),
]


def check_concat_backward(answer) -> CheckResult:
    """answer(dx (B, n_p + n, D), n_p) -> dP (n_p, D): equation (2), in float64 and float32."""
    return check_function(
        "concat_backward",
        answer,
        concat_backward_cases(),
        concat_backward_reference,
        arg_names=("dx", "n_p"),
        dims=("t", "d"),
        shape_doc="(n_p, D)",
        name="dP",
        mistakes=CONCAT_BACKWARD_MISTAKES,
        tolerances=concat_backward_tolerances,
    )


# ---- frozen_head_backward: equation (3) -----------------------------------------------------------------


def frozen_head_backward_reference(h, W, targets):
    h = h.clone().requires_grad_()
    F.cross_entropy(h @ W.T, targets).backward()  # the mean over the N rows
    return h.grad  # (N, D)


def frozen_head_case(gen, N, D, V, scale=1.0) -> Case:
    h = _randn(gen, N, D, dtype=torch.float64) * scale
    W = _randn(gen, V, D, dtype=torch.float64) * scale
    note = f"fp64, logits up to {(h @ W.T).abs().max().item():.0f}" if scale > 1 else "fp64"
    return Case(dict(N=N, D=D, V=V), (h, W, torch.randint(0, V, (N,), generator=gen)), note)


def frozen_head_backward_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(3)
    fixed = [frozen_head_case(gen, *sizes) for sizes in [(6, 8, 11), (1, 5, 3), (4, 7, 2), (3, 4, 5, 60.0)]]
    return fixed + draw_cases(
        3,
        12,
        lambda g: frozen_head_case(
            g, randint(g, 1, 7), randint(g, 1, 9), randint(g, 2, 13), pick(g, [1.0, 1.0, 3.0, 40.0])
        ),
    )


def _softmax_naive(z):  # exp overflows for logits above ~709 in float64
    return z.exp() / z.exp().sum(dim=-1, keepdim=True)


def _onehot(targets, V, like):
    return F.one_hot(targets, V).to(like.dtype)


FROZEN_HEAD_MISTAKES = [
    Mistake(
        "the onehot is forgotten: dL/dz = softmax(z) - onehot(y), not softmax(z)",
        lambda h, W, y: (h @ W.T).softmax(-1) @ W / len(h),
    ),
    Mistake(
        "the 1/N of the mean is forgotten: L averages over the N rows, so each row's gradient is divided by N",
        lambda h, W, y: ((h @ W.T).softmax(-1) - _onehot(y, len(W), h)) @ W,
    ),
    Mistake(
        "the sign is flipped: dL/dz = softmax(z) - onehot(y), not onehot(y) - softmax(z)",
        lambda h, W, y: (_onehot(y, len(W), h) - (h @ W.T).softmax(-1)) @ W / len(h),
    ),
    Mistake(
        "the softmax runs over the rows (dim=0) instead of over the vocabulary (dim=-1)",
        lambda h, W, y: ((h @ W.T).softmax(0) - _onehot(y, len(W), h)) @ W / len(h),
    ),
    Mistake(
        "the softmax is computed as exp(z) / sum(exp(z)) without subtracting max(z) first: exp overflows "
        "for large logits (softmax(z) = softmax(z - max z))",
        lambda h, W, y: (_softmax_naive(h @ W.T) - _onehot(y, len(W), h)) @ W / len(h),
    ),
    Mistake(
        "the softmax is computed in float32: its 7 digits are far from float64's (keep the input's dtype)",
        lambda h, W, y: ((h @ W.T).float().softmax(-1).to(h.dtype) - _onehot(y, len(W), h)) @ W / len(h),
    ),
    Mistake(
        "the gradient is divided by V (the vocabulary) instead of N (the rows the loss averages over)",
        lambda h, W, y: ((h @ W.T).softmax(-1) - _onehot(y, len(W), h)) @ W / len(W),
    ),
    Mistake(
        "log_softmax is used where the gradient needs softmax: dL/dz = softmax(z) - onehot(y)",
        lambda h, W, y: ((h @ W.T).log_softmax(-1) - _onehot(y, len(W), h)) @ W / len(h),
    ),
    Mistake(
        "the softmax term is forgotten: -W[y] / N is only the onehot's part of (softmax(z) - onehot(y)) W / N",
        lambda h, W, y: -W[y] / len(h),
    ),
    Mistake(
        "the gradient is divided by D instead of N (the rows the loss averages over)",
        lambda h, W, y: ((h @ W.T).softmax(-1) - _onehot(y, len(W), h)) @ W / h.shape[1],
    ),
]


def check_frozen_head_backward(answer) -> CheckResult:
    """answer(h (N, D), W (V, D), targets (N,) int64) -> dL/dh (N, D), L = mean cross-entropy of h W^T."""
    return check_function(
        "frozen_head_backward",
        answer,
        frozen_head_backward_cases(),
        frozen_head_backward_reference,
        arg_names=("h", "W", "targets"),
        dims=("i", "d"),
        shape_doc="(N, D)",
        name="dL/dh",
        mistakes=FROZEN_HEAD_MISTAKES,
        atol=1e-10,
        rtol=1e-8,
    )


# ---- causal_attention: equation (4) ---------------------------------------------------------------------


def _attention(q, k, v, mask, scale, dim=-1):
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=dim) @ v  # (B, H, T, hd)


def _lower(T):
    return torch.ones(T, T, dtype=torch.bool).tril()  # row t may look at columns 0 .. t


def causal_attention_reference(q, k, v):
    return _attention(q, k, v, _lower(q.shape[-2]), 1 / math.sqrt(q.shape[-1]))


def attention_case(gen, B, H, T, hd) -> Case:
    q, k, v = (_randn(gen, B, H, T, hd, dtype=torch.float64) for _ in range(3))
    return Case(dict(B=B, H=H, T=T, hd=hd), (q, k, v), "fp64")


def causal_attention_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(4)
    fixed = [attention_case(gen, *sizes) for sizes in [(2, 2, 5, 4), (1, 1, 1, 3), (1, 3, 4, 5), (3, 1, 6, 2)]]
    return fixed + draw_cases(
        4, 12, lambda g: attention_case(g, randint(g, 1, 3), randint(g, 1, 3), randint(g, 1, 9), randint(g, 1, 7))
    )


CAUSAL_ATTENTION_MISTAKES = [
    Mistake(
        "there is no causal mask: every position also reads the positions after it",
        lambda q, k, v: _attention(
            q, k, v, torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool), 1 / math.sqrt(q.shape[-1])
        ),
    ),
    Mistake(
        "the mask is transposed (triu instead of tril): position t reads t .. T-1, the future. The input "
        "tokens would then never see the soft prompt in front of them, and dL/dP would be exactly zero",
        lambda q, k, v: _attention(q, k, v, _lower(q.shape[-2]).T, 1 / math.sqrt(q.shape[-1])),
    ),
    Mistake(
        "the diagonal is masked too (strictly lower): position 0 then has nothing to attend to (NaN)",
        lambda q, k, v: _attention(q, k, v, _lower(q.shape[-2]).tril(-1), 1 / math.sqrt(q.shape[-1])),
    ),
    Mistake(
        "the scores are not divided by sqrt(hd) (Vaswani et al. 2017, eq. 1)",
        lambda q, k, v: _attention(q, k, v, _lower(q.shape[-2]), 1.0),
    ),
    Mistake(
        "the scores are divided by hd instead of sqrt(hd)",
        lambda q, k, v: _attention(q, k, v, _lower(q.shape[-2]), 1 / q.shape[-1]),
    ),
    Mistake(
        "the softmax runs over the queries (dim=-2) instead of over the keys (dim=-1)",
        lambda q, k, v: _attention(q, k, v, _lower(q.shape[-2]), 1 / math.sqrt(q.shape[-1]), dim=-2),
    ),
    Mistake(
        "the masked scores are set to 0 instead of -inf: exp(0) = 1, so the future still gets weight",
        lambda q, k, v: ((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])) * _lower(q.shape[-2])).softmax(-1) @ v,
    ),
    Mistake(
        "the mask is applied after the softmax (weights zeroed, not renormalised): each row must sum to 1 "
        "over the positions it may see",
        lambda q, k, v: ((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) * _lower(q.shape[-2])) @ v,
    ),
    Mistake(
        "the scores are divided by sqrt(T) (the sequence length) instead of sqrt(hd)",
        lambda q, k, v: _attention(q, k, v, _lower(q.shape[-2]), 1 / math.sqrt(q.shape[-2])),
    ),
    Mistake(
        "the mask lets each position see one step ahead (tril(1)): position t may read 0 .. t only",
        lambda q, k, v: _attention(
            q, k, v, torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril(1), 1 / math.sqrt(q.shape[-1])
        ),
    ),
]


def check_causal_attention(answer) -> CheckResult:
    """answer(q, k, v each (B, H, T, hd)) -> y (B, H, T, hd): causal scaled dot-product attention, fp64."""
    return check_function(
        "causal_attention",
        answer,
        causal_attention_cases(),
        causal_attention_reference,
        arg_names=("q", "k", "v"),
        dims=("b", "h", "t", "e"),
        shape_doc="(B, H, T, hd)",
        name="y",
        mistakes=CAUSAL_ATTENTION_MISTAKES,
        atol=1e-10,
        rtol=1e-8,
    )


CHECKERS = {
    "concat": check_concat,
    "concat_backward": check_concat_backward,
    "frozen_head_backward": check_frozen_head_backward,
    "causal_attention": check_causal_attention,
}
