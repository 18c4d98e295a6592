"""Two harder Triton exercises (notebook `05_kernel_track`), checked on the CPU by Triton's interpreter.

* head_ce_kernel: the fused frozen-head cross-entropy of minipt.loss, one program per row of h (grid (N,)):
  logits only for the supervised rows, computed chunk by chunk over the vocabulary (BLOCK_V classes at a time,
  never the whole (N, V) matrix), with a running max so that exp never overflows, then
      loss_i = (logsumexp(h_i W^T) - h_i . W[y_i]) / N_sup,    dh_i = (softmax(h_i W^T) - onehot(y_i)) W / N_sup
  and 0 for a row whose target is -100 (equation (3) of notebook 01_math, with the mean over supervised rows).
* decode_attention_kernel: one decode step's attention over a row's key/value cache (grid (R,), R = B * H):
  the cache holds the prompt's keys and values (computed once by minipt's serving, `PromptBank`) followed by
  the row's own tokens, right-padded to T; the new token's query reads the first L_r positions only,
      o_r = sum_{t < L_r} softmax_t(q_r . k_{r,t} * scale) v_{r,t},
  walking the cache BLOCK_T positions at a time with an online softmax (Milakov & Gimelshein 2018).

Everything `kernel.py` does for the first kernels applies: guarded tensors, every load and store audited,
outputs filled with NaN, seeded cases (irregular sizes, V and T not multiples of the block), and the same
verdict whether or not TRITON_INTERPRET was set before Triton was imported. A check also draws which program
touched which rows (`access_picture`), for the first case.
"""

from __future__ import annotations

import math

import torch

from . import kernel as _kernel  # _kernel.import_triton, looked up at each check (tests replace it)
from .kernel import (
    NO_TRITON,
    Guarded,
    access_picture,
    memory_problem,
    next_power_of_2,
    run_interpreted,
    unwritten,
    written_mask,
)
from .result import (
    Case,
    CheckResult,
    Mistake,
    diagnose_all,
    draw_cases,
    failed,
    first_difference,
    passed,
    randint,
    size_hint,
)

__all__ = [
    "BLOCK_T",
    "BLOCK_V",
    "CHECKERS",
    "DECODE_MISTAKES",
    "HEAD_CE_MISTAKES",
    "IGNORE",
    "PICTURE_CASE",
    "check_decode_attention_kernel",
    "check_head_ce_kernel",
    "decode_case",
    "decode_cases",
    "decode_reference",
    "head_ce_case",
    "head_ce_cases",
    "head_ce_reference",
]

IGNORE = -100
BLOCK_V = 8  # classes per chunk: the cases have V up to 40, so a row takes several chunks
BLOCK_T = 4  # cache positions per chunk
PICTURE_CASE = 2  # head_ce_kernel draws its third case, whose ignored rows read nothing


# ---- head_ce_kernel --------------------------------------------------------------------------------------


def head_ce_reference(h, W, y):
    """(loss (N,), dh (N, D)) in float64, rounded to float32: each row's share of the mean over supervised rows."""
    h64, W64 = h.double(), W.double()
    keep = y != IGNORE
    n_sup = max(int(keep.sum()), 1)
    z = h64 @ W64.T  # (N, V), here only: the kernel never holds it
    lse = z.logsumexp(dim=-1)
    safe_y = y.clamp(min=0)
    loss = torch.where(keep, (lse - z.gather(1, safe_y[:, None])[:, 0]) / n_sup, 0.0)
    p = z.softmax(dim=-1) - torch.nn.functional.one_hot(safe_y, W.shape[0]).double()
    dh = torch.where(keep[:, None], p @ W64 / n_sup, 0.0)
    return loss.float(), dh.float()


def head_ce_case(gen, N, D, V, scale=1.0, ignored=0) -> Case:
    h = torch.randn(N, D, generator=gen) * scale
    W = torch.randn(V, D, generator=gen) * scale
    y = torch.randint(0, V, (N,), generator=gen)
    if ignored:
        y[torch.randperm(N, generator=gen)[:ignored]] = IGNORE
    notes = ([f"logits up to {(h @ W.T).abs().max().item():.0f}"] if scale > 1 else []) + (
        [f"{ignored} row(s) with target -100"] if ignored else []
    )
    return Case(dict(N=N, D=D, V=V), (h, W, y), ", ".join(notes))


def head_ce_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(11)
    fixed = [
        head_ce_case(gen, 3, 5, 19),
        head_ce_case(gen, 1, 4, 8),
        head_ce_case(gen, 4, 6, 21, ignored=2),
        head_ce_case(gen, 2, 8, 13, scale=12.0),
    ]
    return fixed + draw_cases(
        11,
        5,
        lambda g: head_ce_case(
            g,
            randint(g, 1, 5),
            randint(g, 1, 24),
            randint(g, 2, 40),
            [1.0, 1.0, 10.0][randint(g, 0, 2)],
            ignored=randint(g, 0, 1),
        ),
    )


def _ce_variant(h, W, y, *, n_div=None, onehot=True, classes=None, naive=False, ignored_rows=True):
    keep = y != IGNORE if ignored_rows else torch.ones_like(y, dtype=torch.bool)
    n = n_div if n_div is not None else max(int((y != IGNORE).sum()), 1)
    W_used = W if classes is None else W[:classes]
    z = h.double() @ W_used.double().T
    if naive:
        z32 = h @ W_used.T
        p = z32.exp() / z32.exp().sum(-1, keepdim=True)
        lse = z32.exp().sum(-1).log().double()
        p = p.double()
    else:
        p, lse = z.softmax(-1), z.logsumexp(-1)
    safe_y = y.clamp(min=0)
    hot = (torch.nn.functional.one_hot(safe_y, W.shape[0]).double() * (y != IGNORE).double()[:, None])[
        :, : W_used.shape[0]
    ]  # a row with target -100 has no onehot
    loss = torch.where(keep, (lse - (z * hot).sum(-1)) / n, 0.0)
    dh = torch.where(keep[:, None], (p - (hot if onehot else 0)) @ W_used.double() / n, 0.0)
    return loss.float(), dh.float()


HEAD_CE_MISTAKES = [
    Mistake(
        "the rows with target -100 are not skipped: they get a loss and a gradient (with no onehot) as if "
        "they were supervised; store 0 for them and read nothing else",
        lambda h, W, y: _ce_variant(h, W, y, ignored_rows=False),
    ),
    Mistake(
        "the mean divides by N, the rows, instead of N_sup, the supervised rows (targets != -100)",
        lambda h, W, y: _ce_variant(h, W, y, n_div=len(y)),
    ),
    Mistake(
        "the onehot is forgotten in dh: dL/dz = softmax(z) - onehot(y)",
        lambda h, W, y: _ce_variant(h, W, y, onehot=False),
    ),
    Mistake(
        f"only the first chunk of the vocabulary is read: the loop over V must go on past BLOCK_V = {BLOCK_V}",
        lambda h, W, y: _ce_variant(h, W, y, classes=BLOCK_V),
    ),
    Mistake(
        "exp is taken without subtracting the running max: it overflows for large logits (exp(89) is inf "
        "in float32); keep m = max so far and rescale the running sum by exp(m_old - m_new)",
        lambda h, W, y: _ce_variant(h, W, y, naive=True),
    ),
]


def _pair_mistakes(mistakes, which):
    """The mistakes as functions of one output (0: loss, 1: dh), for diagnose_all."""
    return [Mistake(m.explanation, lambda *a, fn=m.fn: fn(*a)[which]) for m in mistakes]


def check_head_ce_kernel(kernel) -> CheckResult:
    """kernel(H, W, Y, LOSS, DH, V, D, n_sup, BLOCK_V, BLOCK_D) on grid (N,): the fused frozen-head CE."""
    exercise = "head_ce_kernel"
    try:
        _kernel.import_triton()
    except ImportError:
        return failed(exercise, NO_TRITON)
    cases, results, first, picture = head_ce_cases(), [], None, ""
    references = [head_ce_reference(*case.args) for case in cases]  # before the kernel runs
    gots = []
    for number, (case, (loss_ref, dh_ref)) in enumerate(zip(cases, references)):
        h, W, y = case.args
        N, D = h.shape
        n_sup = max(int((y != IGNORE).sum()), 1)
        LOSS, DH = Guarded.empty("loss", (N,), torch.float32), Guarded.empty("dh", (N, D), torch.float32)
        ins = [Guarded.around("h", h, float("nan")), Guarded.around("W", W, float("nan")), Guarded.around("y", y, 0)]
        audit, error = run_interpreted(
            kernel,
            (N,),
            (
                ins[0].view,
                ins[1].view,
                ins[2].view,
                LOSS.view,
                DH.view,
                W.shape[0],
                D,
                n_sup,
                BLOCK_V,
                next_power_of_2(D),
            ),
            {g.name: g.view for g in [*ins, LOSS, DH]},
        )
        if number == PICTURE_CASE and audit is not None:  # the case with ignored rows: they read no W
            picture = access_picture(audit, {"W": ins[1].view, "dh": DH.view}, N)
        loss, dh = LOSS.view.clone(), DH.view.clone()
        problem = error or memory_problem(
            audit, [LOSS, DH], {"W": "the classes of a chunk are v0 .. v0 + BLOCK_V - 1: mask those >= V"}
        )
        gots.append((loss, dh) if problem is None else None)
        if problem is None:
            problem = (
                unwritten(loss, ("i",), "loss", written_mask(audit, LOSS.view))
                or unwritten(dh, ("i", "d"), "dh", written_mask(audit, DH.view))
                or first_difference(loss_ref, loss, dims=("i",), shape_doc="(N,)", atol=1e-5, rtol=1e-4, name="loss")
                or first_difference(dh_ref, dh, dims=("i", "d"), shape_doc="(N, D)", atol=1e-5, rtol=1e-4, name="dh")
            )
        results.append((case, problem is None))
        if problem and first is None:
            first = (case, problem)
    return _kernel_report(exercise, cases, results, first, gots, HEAD_CE_MISTAKES, picture, 1e-5, 1e-4)


def _kernel_report(exercise, cases, results, first, gots, mistakes, picture, atol, rtol) -> CheckResult:
    tried = [case.label() for case in cases]
    drawing = f"\n{picture}" if picture else ""
    if first is None:
        return passed(
            exercise,
            f"{len(cases)} launches match the reference under the interpreter; every load "
            f"and store stayed inside its tensor. Who touched what, in one case:{drawing}",
            tried,
        )
    case, problem = first
    if "first difference" in problem:
        which = 0 if problem.startswith("loss") or problem.startswith("o:") else 1
        outs = [None if g is None else (g[which] if isinstance(g, tuple) else g) for g in gots]
        named = mistakes if not isinstance(gots[0], tuple) else _pair_mistakes(mistakes, which)
        problem = problem.rstrip(".") + "." + diagnose_all(named, cases, outs, atol, rtol, first=case)
        problem += size_hint(results)
    passed_n = sum(ok for _, ok in results)
    return failed(
        exercise,
        f"Case {case.label()}: {problem.rstrip('.')}. Passed {passed_n} of {len(cases)} cases.{drawing}",
        tried,
    )


# ---- decode_attention_kernel -----------------------------------------------------------------------------


def decode_reference(q, k, v, lens, scale):
    """o (R, hd): row r attends to its first lens[r] cached positions. Float64, rounded to float32."""
    T = k.shape[1]
    s = torch.einsum("rd,rtd->rt", q.double(), k.double()) * scale  # (R, T)
    s = s.masked_fill(torch.arange(T)[None, :] >= lens[:, None], float("-inf"))
    return torch.einsum("rt,rtd->rd", s.softmax(-1), v.double()).float()


def decode_case(gen, R, T, hd, full=False) -> Case:
    q, k, v = (
        torch.randn(R, hd, generator=gen),
        torch.randn(R, T, hd, generator=gen),
        torch.randn(R, T, hd, generator=gen),
    )
    lens = torch.randint(1, T + 1, (R,), generator=gen)
    if full:
        lens[0] = T
    lens = lens.to(torch.int32)
    return Case(dict(R=R, T=T, hd=hd), (q, k, v, lens), "lengths " + "/".join(str(int(n)) for n in lens))


def decode_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(12)
    fixed = [decode_case(gen, 3, 10, 4, full=True), decode_case(gen, 1, 1, 3), decode_case(gen, 4, 7, 5)]
    return fixed + draw_cases(
        12,
        5,
        lambda g: decode_case(g, randint(g, 1, 6), randint(g, 1, 18), randint(g, 1, 16), full=bool(randint(g, 0, 1))),
    )


def _decode_variant(q, k, v, lens, *, extra=0, scaled=True, chunks=None, all_positions=False):
    T = k.shape[1]
    limit = torch.full_like(lens, T) if all_positions else (lens + extra).clamp(max=T)
    if chunks is not None:
        limit = limit.clamp(max=chunks)
    return decode_reference(q, k, v, limit, 1 / math.sqrt(q.shape[-1]) if scaled else 1.0)


DECODE_MISTAKES = [
    Mistake(
        "the padding past a row's length is read too: mask the positions t >= L_r (their score -inf, or "
        "their weight 0), the cache is right-padded",
        lambda q, k, v, n: _decode_variant(q, k, v, n, all_positions=True),
    ),
    Mistake(
        "one position too many is read (t <= L_r): the row's positions are 0 .. L_r - 1",
        lambda q, k, v, n: _decode_variant(q, k, v, n, extra=1),
    ),
    Mistake(
        "the scores are not multiplied by scale = 1/sqrt(hd)",
        lambda q, k, v, n: _decode_variant(q, k, v, n, scaled=False),
    ),
    Mistake(
        f"only the first chunk of the cache is read: the loop over T must go on past BLOCK_T = {BLOCK_T}",
        lambda q, k, v, n: _decode_variant(q, k, v, n, chunks=BLOCK_T),
    ),
]


def check_decode_attention_kernel(kernel) -> CheckResult:
    """kernel(Q, K, V, O, LENS, T, hd, scale, BLOCK_T, BLOCK_HD) on grid (R,): o_r over its first L_r positions."""
    exercise = "decode_attention_kernel"
    try:
        _kernel.import_triton()
    except ImportError:
        return failed(exercise, NO_TRITON)
    cases, results, first, picture, gots = decode_cases(), [], None, "", []
    references = [decode_reference(*case.args, 1 / math.sqrt(case.args[0].shape[-1])) for case in cases]
    for case, expected in zip(cases, references):
        q, k, v, lens = case.args
        R, T, hd = k.shape
        O = Guarded.empty("o", (R, hd), torch.float32)
        ins = [Guarded.around(name, t, float("nan")) for name, t in (("q", q), ("k", k), ("v", v))]
        ins.append(Guarded.around("lens", lens, 0))
        audit, error = run_interpreted(
            kernel,
            (R,),
            (*(g.view for g in ins[:3]), O.view, ins[3].view, T, hd, 1 / math.sqrt(hd), BLOCK_T, next_power_of_2(hd)),
            {g.name: g.view for g in [*ins, O]},
        )
        if not picture and audit is not None:  # the first case: each row reads only its own L_r positions
            picture = access_picture(audit, {"k": ins[1].view.reshape(R * T, hd), "o": O.view}, R)
        got = O.view.clone()
        problem = error or memory_problem(
            audit,
            [O],
            {
                "k": "the positions of a chunk are t0 .. t0 + BLOCK_T - 1: mask those >= T",
                "lens": "row r's length is LENS + r",
            },
        )
        gots.append(got if problem is None else None)
        if problem is None:
            problem = unwritten(got, ("r", "e"), "o", written_mask(audit, O.view)) or first_difference(
                expected, got, dims=("r", "e"), shape_doc="(R, hd)", atol=1e-5, rtol=1e-4, name="o"
            )
        results.append((case, problem is None))
        if problem and first is None:
            first = (case, problem)
    return _kernel_report(exercise, cases, results, first, gots, DECODE_MISTAKES, picture, 1e-5, 1e-4)


CHECKERS = {"head_ce_kernel": check_head_ce_kernel, "decode_attention_kernel": check_decode_attention_kernel}
