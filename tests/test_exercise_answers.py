"""Answers written differently from the solutions: each correct one passes, each plausible wrong one fails
with a message that names the problem. The wrong answers here are beyond those of tests/test_exercises.py.

Also: a patched torch.allclose (or isclose, or equal) cannot turn a wrong answer into a pass, and the kernel
checkers give the same verdicts whether or not TRITON_INTERPRET was set before Triton was imported.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minipt import PromptTuning, exercises
from minipt.exercises.training import reference_loop

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - macOS, Windows
    triton = tl = None

needs_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed (Linux only)")


def accepts(exercise_id, answer):
    result = exercises.check(exercise_id, answer)
    assert result.passed, str(result)


def rejects(exercise_id, answer, *phrases):
    result = exercises.check(exercise_id, answer)
    assert not result.passed, f"{exercise_id} accepted a wrong answer"
    for phrase in phrases:
        assert phrase in result.message, f"{exercise_id}: {phrase!r} not in the message:\n{result}"
    return result


# ---- concat ----------------------------------------------------------------------------------------------


def concat_loop(P, wte, idx, wpe):
    B, n = idx.shape
    n_p, D = P.shape
    x = torch.empty(B, n_p + n, D, dtype=wte.dtype)
    for b in range(B):
        for t in range(n_p + n):
            x[b, t] = (P[t] if t < n_p else wte[idx[b, t - n_p]]) + wpe[t]
    return x


def concat_index_select(P, wte, idx, wpe):
    tokens = wte.index_select(0, idx.flatten()).view(*idx.shape, -1)  # (B, n, D)
    x = torch.cat([P.to(wte.dtype).unsqueeze(0).repeat(len(idx), 1, 1), tokens], dim=1)
    return x + wpe.narrow(0, 0, x.shape[1]).unsqueeze(0)


def concat_fill(P, wte, idx, wpe):
    n_p, n = len(P), idx.shape[1]
    x = torch.empty(len(idx), n_p + n, wte.shape[1], dtype=wte.dtype)
    x[:, :n_p] = P + wpe[:n_p]
    x[:, n_p:] = wte[idx] + wpe[n_p : n_p + n]
    return x


def test_concat_answers():
    for answer in (concat_loop, concat_index_select, concat_fill):
        accepts("concat", answer)

    def refuses_full_context(P, wte, idx, wpe):
        if len(P) + idx.shape[1] >= len(wpe):
            raise ValueError("the sequence is too long for wpe")
        return concat_fill(P, wte, idx, wpe)

    def float32_math(P, wte, idx, wpe):
        return concat_fill(P.float(), wte.float(), idx, wpe.float())

    rejects("concat", refuses_full_context, "fills wpe: n_p + n = n_ctx", "raised ValueError")
    rejects("concat", float32_math, "x: dtype: expected float64, got float32")
    rejects("concat", lambda P, wte, idx, wpe: concat_fill(P, wte, idx, wpe[1:]), "positions start at 1")
    rejects(
        "concat",
        lambda P, wte, idx, wpe: concat_fill(P[:1].expand(len(P), -1), wte, idx, wpe),
        "every prompt row is P[0]",
    )

    def time_major_tokens(P, wte, idx, wpe):
        B, n = idx.shape
        tokens = wte[idx.reshape(-1)].view(n, B, -1).transpose(0, 1)  # (B, n, D), but with the rows of (n, B)
        return torch.cat([P.expand(B, -1, -1), tokens], 1) + wpe[: len(P) + n]

    rejects("concat", time_major_tokens, "reshaped in the wrong order")
    rejects(
        "concat",
        lambda P, wte, idx, wpe: torch.cat([(P + wpe[: len(P)]).expand(len(idx), -1, -1), wte[idx] + wpe[len(P) :]], 1),
        "raised RuntimeError",
    )


# ---- concat_backward -------------------------------------------------------------------------------------


def test_concat_backward_answers():
    accepts("concat_backward", lambda dx, n_p: torch.einsum("btd->td", dx[:, :n_p]))
    accepts("concat_backward", lambda dx, n_p: sum(dx[b, :n_p] for b in range(len(dx))))
    accepts("concat_backward", lambda dx, n_p: dx.narrow(1, 0, n_p).sum(dim=0).contiguous())

    rejects(
        "concat_backward",
        lambda dx, n_p: dx[:, :n_p].float().sum(0),
        "(fp64)",
        "dP: dtype: expected float64, got float32",
    )
    rejects("concat_backward", lambda dx, n_p: dx[:, :n_p].reshape(n_p, len(dx), -1).sum(1), "reshaped as (n_p, B)")
    rejects("concat_backward", lambda dx, n_p: dx[:, 1 : n_p + 1].sum(0), "off by one")
    rejects("concat_backward", lambda dx, n_p: dx[:, n_p : 2 * n_p].sum(0), "the token rows are summed")
    rejects("concat_backward", lambda dx, n_p: dx[:, :n_p].sum(0, keepdim=True), "dP: shape: expected (n_p, D)")
    rejects("concat_backward", lambda dx, n_p: dx[:, :n_p].sum(0) / dx.shape[1], "dP: first difference")


# ---- frozen_head_backward --------------------------------------------------------------------------------


def test_frozen_head_backward_answers():
    def by_logsumexp(h, W, y):
        z = h @ W.T
        p = (z - z.logsumexp(-1, keepdim=True)).exp()
        p[torch.arange(len(y)), y] -= 1
        return p @ W / len(y)

    def by_scatter(h, W, y):
        z = h @ W.T
        return (z.log_softmax(-1).exp() - torch.zeros_like(z).scatter_(1, y[:, None], 1.0)) @ W / z.shape[0]

    def by_autograd_of_definition(h, W, y):
        h = h.detach().clone().requires_grad_()
        z = h @ W.T
        loss = (z.logsumexp(-1) - z.gather(1, y[:, None])[:, 0]).mean()
        (grad,) = torch.autograd.grad(loss, h)
        return grad

    for answer in (by_logsumexp, by_scatter, by_autograd_of_definition):
        accepts("frozen_head_backward", answer)

    onehot = lambda y, W, h: F.one_hot(y, len(W)).to(h.dtype)  # noqa: E731
    rejects(
        "frozen_head_backward",
        lambda h, W, y: ((h @ W.T).float().softmax(-1).double() - onehot(y, W, h)) @ W / len(h),
        "computed in float32",
    )
    rejects(
        "frozen_head_backward", lambda h, W, y: ((h @ W.T).softmax(-1) - onehot(y, W, h)) @ W / len(W), "divided by V"
    )
    rejects(
        "frozen_head_backward",
        lambda h, W, y: ((h @ W.T).log_softmax(-1) - onehot(y, W, h)) @ W / len(h),
        "log_softmax is used",
    )
    rejects("frozen_head_backward", lambda h, W, y: -W[y] / len(h), "the softmax term is forgotten")
    rejects(
        "frozen_head_backward",
        lambda h, W, y: ((h @ W.T).softmax(-1) - onehot(y, W, h)) @ W / h.shape[1],
        "divided by D instead of N",
    )
    rejects(
        "frozen_head_backward",
        lambda h, W, y: ((h @ W.T).softmax(-1) - onehot(y, W, h)) / len(h),
        "dL/dh: shape: expected (N, D)",
    )  # dL/dz, not dL/dh


# ---- causal_attention ------------------------------------------------------------------------------------


def test_causal_attention_answers():
    def by_loop(q, k, v):
        T, hd = q.shape[-2:]
        y = torch.empty_like(q)
        for t in range(T):
            w = (q[..., t : t + 1, :] @ k[..., : t + 1, :].transpose(-2, -1) / math.sqrt(hd)).softmax(-1)
            y[..., t : t + 1, :] = w @ v[..., : t + 1, :]
        return y

    def by_finfo_min(q, k, v):
        T = q.shape[-2]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), torch.finfo(s.dtype).min)
        return s.softmax(-1) @ v

    for answer in (by_loop, by_finfo_min, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)):
        accepts("causal_attention", answer)

    def scores(q, k):
        return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])

    tril = lambda q, d=0: torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril(d)  # noqa: E731
    rejects("causal_attention", lambda q, k, v: (scores(q, k) * tril(q)).softmax(-1) @ v, "set to 0 instead of -inf")
    rejects("causal_attention", lambda q, k, v: (scores(q, k).softmax(-1) * tril(q)) @ v, "after the softmax")
    rejects(
        "causal_attention",
        lambda q, k, v: (
            (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-2])).masked_fill(~tril(q), float("-inf")).softmax(-1) @ v
        ),
        "sqrt(T)",
    )
    rejects(
        "causal_attention",
        lambda q, k, v: scores(q, k).masked_fill(~tril(q, 1), float("-inf")).softmax(-1) @ v,
        "one step ahead",
    )
    rejects(
        "causal_attention",
        lambda q, k, v: scores(q, k).masked_fill(~tril(q), float("-inf")).softmax(-1).float() @ v.float(),
        "y: dtype: expected float64, got float32",
    )


# ---- label_init ------------------------------------------------------------------------------------------


def test_label_init_answers():
    accepts("label_init", lambda wte, labels: torch.stack([sum(wte[i] for i in ids) / len(ids) for ids in labels]))
    accepts(
        "label_init",
        lambda wte, labels: torch.stack([wte.index_select(0, torch.tensor(ids)).mean(0) for ids in labels]),
    )

    def by_index_add(wte, labels):
        rows = torch.tensor([k for k, ids in enumerate(labels) for _ in ids])
        sums = torch.zeros(len(labels), wte.shape[1], dtype=wte.dtype).index_add_(
            0, rows, wte[torch.tensor(sum(labels, []))]
        )
        return sums / torch.tensor([len(ids) for ids in labels], dtype=wte.dtype)[:, None]

    accepts("label_init", by_index_add)

    def padded(wte, labels):
        longest = max(map(len, labels))
        return wte[torch.tensor([ids + [0] * (longest - len(ids)) for ids in labels])].mean(1)

    rejects("label_init", padded, "padded to one length")
    rejects(
        "label_init", lambda wte, labels: torch.stack([wte[sorted(set(ids))].mean(0) for ids in labels]), "counted once"
    )
    rejects(
        "label_init",
        lambda wte, labels: torch.stack([wte[ids].mean(0) for ids in labels]).T,
        "P: shape: expected (K, D)",
    )
    rejects(
        "label_init",
        lambda wte, labels: torch.stack([wte[ids].median(0).values for ids in labels]),
        "P: first difference",
    )
    rejects(
        "label_init",
        lambda wte, labels: torch.stack([wte[ids].float().mean(0) for ids in labels]),
        "(fp64",
        "P: dtype: expected float64, got float32",
    )
    rejects(
        "label_init",
        lambda wte, labels: wte[labels[0]].mean(0).expand(len(labels), -1),
        "every row is the first label's mean",
    )


# ---- ensemble_vote ---------------------------------------------------------------------------------------


def votes_of(p):
    return F.one_hot(p.argmax(-1), p.shape[-1]).sum(0)  # (N, C)


def test_ensemble_vote_answers():
    def by_loop(p):
        K, N, C = p.shape
        out = []
        for i in range(N):
            counts = torch.bincount(p[:, i].argmax(-1), minlength=C)
            tied = (counts == counts.max()).nonzero().flatten()
            out.append(tied[p[:, i, tied].mean(0).argmax()])
        return torch.stack(out)

    def by_one_key(p):  # votes first, then the mean (in [0, 1]) as a fraction that cannot outweigh a vote
        return (votes_of(p).to(p.dtype) + p.mean(0) * 0.5).argmax(-1)

    def by_sum(p):  # the sum of probabilities over prompts orders the tied classes as the mean does
        v = votes_of(p)
        return p.sum(0).masked_fill(v < v.amax(-1, keepdim=True), -1.0).argmax(-1)

    for answer in (by_loop, by_one_key, by_sum):
        accepts("ensemble_vote", answer)

    top = lambda p: votes_of(p) == votes_of(p).amax(-1, keepdim=True)  # noqa: E731
    rejects("ensemble_vote", lambda p: p.log().mean(0).masked_fill(~top(p), -float("inf")).argmax(-1), "geometric mean")

    def top_two(p):
        two = votes_of(p).topk(min(2, p.shape[-1]), dim=-1).indices
        return two.gather(-1, p.mean(0).gather(-1, two).argmax(-1, keepdim=True))[:, 0]

    def first_prompt(p):
        first = p[0].argmax(-1)
        return torch.where(
            top(p).gather(-1, first[:, None])[:, 0] & (top(p).sum(-1) > 1),
            first,
            p.mean(0).masked_fill(~top(p), -1).argmax(-1),
        )

    rejects("ensemble_vote", top_two, "only the two most voted classes")
    rejects("ensemble_vote", first_prompt, "the class the first prompt voted for")
    rejects("ensemble_vote", lambda p: p.shape[-1] - 1 - votes_of(p).flip(-1).argmax(-1), "the highest class id")
    rejects("ensemble_vote", lambda p: p.median(0).values.masked_fill(~top(p), -1).argmax(-1), "first difference")
    rejects(
        "ensemble_vote",
        lambda p: p.mean(0).masked_fill(~top(p), -1).argmax(-1).float(),
        "dtype: expected int64, got float32",
    )


# ---- fix_snippet -----------------------------------------------------------------------------------------


def snippet(
    optimizer_cls=torch.optim.Adam,
    lr=0.1,
    zero_grad="before",
    new_optimizer=False,
    steps_per_step=1,
    item=True,
    **opt_kwargs,
):
    def tune(model, idx, targets, steps):
        pt = PromptTuning(model, n_prompt=4, init="uniform", seed=0, backend="reference")
        optimizer = optimizer_cls([pt.prompt], lr=lr, **opt_kwargs)
        losses = []
        for _ in range(steps):
            if new_optimizer:
                optimizer = optimizer_cls([pt.prompt], lr=lr, **opt_kwargs)
            _, loss = pt(idx, targets)
            if zero_grad == "before":
                optimizer.zero_grad()
            loss.backward()
            for _ in range(steps_per_step):
                optimizer.step()
            if zero_grad == "after":
                optimizer.zero_grad(set_to_none=False)
            losses.append(loss.item() if item else loss)
        return optimizer, losses

    return tune


def test_fix_snippet_answers():
    accepts("fix_snippet", snippet(torch.optim.AdamW, lr=0.3, weight_decay=0.0))
    accepts("fix_snippet", snippet(zero_grad="after"))
    accepts("fix_snippet", snippet(torch.optim.Adam, lr=0.05))

    rejects("fix_snippet", snippet(zero_grad="never"), "zero_grad() is never called")
    rejects("fix_snippet", snippet(new_optimizer=True), "a new optimizer is made inside the loop")
    rejects("fix_snippet", snippet(steps_per_step=2), "optimizer.step() was called 40 times")
    rejects("fix_snippet", snippet(item=False), "losses must be a list of 20 finite floats")
    rejects("fix_snippet", snippet(lr=1e-3), "a far larger learning rate")

    def no_grad_forward(model, idx, targets, steps):
        pt = PromptTuning(model, n_prompt=4, init="uniform", seed=0, backend="reference")
        optimizer = torch.optim.Adam([pt.prompt], lr=0.1)
        with torch.no_grad():
            _, loss = pt(idx, targets)
        loss.backward()
        return optimizer, [loss.item()] * steps

    rejects("fix_snippet", no_grad_forward, "does not require grad")


# ---- training_loop ---------------------------------------------------------------------------------------


def loop(
    clip="library",
    schedule="groups",
    zero_grad="before",
    optimizer_cls=torch.optim.AdamW,
    batch_at=0,
    loss_after=False,
    lr_cap=True,
    clip_norm=None,
):
    def train(pt, get_batch, steps, lr, warmup, max_norm):
        max_norm = clip_norm or max_norm
        optimizer = optimizer_cls([pt.prompt], lr=lr, weight_decay=0.0)
        factor = (lambda s: min(1.0, (s + 1) / warmup)) if lr_cap else (lambda s: (s + 1) / warmup)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor) if schedule == "lambda" else None
        losses = []
        for step in range(steps):
            if scheduler is None:
                for group in optimizer.param_groups:
                    group["lr"] = lr * factor(step)
            idx, targets = get_batch(step + batch_at)
            _, loss = pt(idx, targets)
            if zero_grad == "before":
                optimizer.zero_grad()
            loss.backward()
            if zero_grad == "between":
                optimizer.zero_grad()
            if clip == "library":
                torch.nn.utils.clip_grad_norm_([pt.prompt], max_norm)
            elif clip == "definition":
                with torch.no_grad():
                    norm = pt.prompt.grad.norm()
                    if norm > max_norm:
                        pt.prompt.grad *= max_norm / norm
            elif clip == "per_element":
                pt.prompt.grad.clamp_(-max_norm, max_norm)
            optimizer.step()
            if zero_grad == "after":
                optimizer.zero_grad(set_to_none=False)
            if scheduler is not None:
                scheduler.step()
            losses.append(pt(idx, targets)[1].item() if loss_after else loss.item())
        return losses

    return train


def test_training_loop_answers():
    accepts("training_loop", loop(clip="definition"))  # no 1e-6 in the denominator: within the tolerance
    accepts("training_loop", loop(schedule="lambda", zero_grad="after"))
    accepts("training_loop", loop(optimizer_cls=torch.optim.Adam))  # Adam is AdamW when weight_decay = 0
    accepts("training_loop", lambda *a: reference_loop(*a, clip="definition"))

    rejects("training_loop", loop(lr_cap=False), "as step 4 starts")  # the warmup never stops
    rejects("training_loop", loop(clip="per_element"), "differs from the reference")
    rejects("training_loop", loop(zero_grad="between"), "as step 1 starts")  # the gradient wiped before the step
    rejects("training_loop", loop(loss_after=True), "step 0: expected loss")
    rejects("training_loop", loop(clip_norm=1.0), "not clipped before optimizer.step()")  # 1.0 hard-coded
    rejects("training_loop", loop(batch_at=1), "step 0: expected loss")


# ---- vocab_init ------------------------------------------------------------------------------------------


def candidates_of(counts, top_k):
    return torch.argsort(counts, descending=True, stable=True)[: min(top_k, int((counts > 0).sum()))]


def test_vocab_init_answers():
    def by_multinomial(wte, n_p, counts, top_k, g):
        c = candidates_of(counts, top_k)
        return wte[c[torch.multinomial(torch.ones(len(c)), n_p, replacement=False, generator=g)]].clone()

    def by_topk(wte, n_p, counts, top_k, g):
        k = min(top_k, int((counts > 0).sum()))
        c = counts.topk(k).indices
        return torch.stack([wte[i].clone() for i in c[torch.randperm(k, generator=g)[:n_p]]])

    def by_shuffled_list(wte, n_p, counts, top_k, g):
        c = candidates_of(counts, top_k).tolist()
        order = torch.rand(len(c), generator=g).argsort()
        return wte[[c[i] for i in order[:n_p]]].detach().float().clone()

    for answer in (by_multinomial, by_topk, by_shuffled_list):
        accepts("vocab_init", answer)

    def proportional(wte, n_p, counts, top_k, g):
        c = candidates_of(counts, top_k)
        return wte[c[torch.multinomial(counts[c].float(), n_p, replacement=False, generator=g)]].clone()

    def top_k_minus_one(wte, n_p, counts, top_k, g):
        c = candidates_of(counts, top_k)[:-1]
        return wte[c[torch.randperm(len(c), generator=g)[:n_p]]].clone()

    def randint_high_exclusive(wte, n_p, counts, top_k, g):  # randint(0, k - 1) never draws k - 1
        c = candidates_of(counts, top_k)
        picked = []
        while len(picked) < n_p:
            i = int(torch.randint(0, len(c) - 1, (1,), generator=g)) if len(c) > n_p else len(picked)
            picked += [] if i in picked else [i]
        return wte[c[picked]].clone()

    def first_always_in(wte, n_p, counts, top_k, g):  # the most frequent token always, the rest drawn
        c = candidates_of(counts, top_k)
        rest = c[1:][torch.randperm(len(c) - 1, generator=g)[: n_p - 1]]
        return wte[torch.cat([c[:1], rest])].clone()

    def float16_rows(wte, n_p, counts, top_k, g):
        c = candidates_of(counts, top_k)
        return wte[c[torch.randperm(len(c), generator=g)[:n_p]]].half()

    rejects("vocab_init", proportional, "not in proportion to the counts")
    rejects("vocab_init", top_k_minus_one, "was drawn in 0 of 300 seeds", "last candidate left out")
    rejects("vocab_init", randint_high_exclusive, "was drawn in 0 of 300 seeds")
    rejects("vocab_init", first_always_in, "every seed picks the same tokens")  # n_p = 1: token 5 always
    rejects("vocab_init", float16_rows, "P must be float32, got float16")


# ---- predict_measure --------------------------------------------------------------------------------------


def predictions(**changed):
    return lambda: {"step_ratio_10": 1.6, "step_ratio_108": 0.95, "adamw_state_bytes": 2 * 20 * 768 * 4, **changed}


def test_predict_measure_answers():
    from minipt.exercises.predict import measured

    m = measured()
    accepts("predict_measure", lambda: {k: m[k] for k in ("step_ratio_10", "step_ratio_108", "adamw_state_bytes")})
    accepts("predict_measure", predictions(step_ratio_10=1.3, step_ratio_108=0.7, adamw_state_bytes=122_884))
    accepts("predict_measure", predictions())

    rejects("predict_measure", predictions(step_ratio_10=0.8), "step_ratio_10", "slower than a fine-tuning step")
    rejects("predict_measure", predictions(step_ratio_108=1.3), "step_ratio_108", "faster than a fine-tuning step")
    rejects("predict_measure", predictions(step_ratio_10=4.0), "more than a factor 1.5 away")
    rejects("predict_measure", predictions(adamw_state_bytes=20 * 768 * 4), "two moments")  # one moment only
    rejects("predict_measure", predictions(adamw_state_bytes=2 * 20 * 768 * 2), "each float32")  # fp16 moments
    rejects("predict_measure", lambda: [1.6, 0.95, 122_880], "must return a dict of three positive numbers")
    rejects("predict_measure", predictions(step_ratio_10=float("nan")), "must return a dict")


# ---- capstone: one broken piece is named ----------------------------------------------------------------


def capstone_pieces(**broken):
    return {
        "concat": concat_fill,
        "concat_backward": lambda dx, n_p: dx[:, :n_p].sum(0),
        "vocab_init": lambda wte, n_p, counts, top_k, g: wte[
            candidates_of(counts, top_k)[torch.randperm(min(top_k, int((counts > 0).sum())), generator=g)[:n_p]]
        ].clone(),
        "train": loop(),
        **broken,
    }


@pytest.mark.slow  # two tuning runs of the capstone, ~20 s each on one core
def test_capstone_passes_with_pieces_written_differently():
    """Two sets of pieces unlike the solutions' (test_exercises.py runs the solution notebook itself)."""
    for pieces in (
        capstone_pieces(),
        capstone_pieces(
            concat=concat_index_select,
            concat_backward=lambda dx, n_p: torch.einsum("btd->td", dx[:, :n_p]),
            train=loop(clip="definition", schedule="lambda"),
        ),
    ):
        result = exercises.check("capstone", pieces)
        assert result.passed and "test exact match" in result.message, str(result)


def test_capstone_fails_with_one_broken_piece():
    rejects(
        "capstone",
        capstone_pieces(concat_backward=lambda dx, n_p: dx[:, :n_p].mean(0)),
        "the piece `concat_backward` does not pass its own exercise",
        "a mean over b",
    )
    rejects("capstone", capstone_pieces(train=loop(zero_grad="between")), "the piece `train`", "training_loop")
    rejects(
        "capstone",
        capstone_pieces(concat=lambda P, wte, idx, wpe: torch.cat([P.expand(len(idx), -1, -1), wte[idx]], 1)),
        "the piece `concat`",
        "position embeddings are forgotten",
    )
    top_k_minus_one = capstone_pieces(
        vocab_init=lambda wte, n_p, counts, top_k, g: wte[
            candidates_of(counts, top_k)[: top_k - 1][torch.randperm(top_k - 1, generator=g)[:n_p]]
        ].clone()
    )
    rejects("capstone", top_k_minus_one, "the piece `vocab_init` does not pass its own exercise", "last candidate")

    def not_started(*args):
        raise NotImplementedError

    rejects("capstone", capstone_pieces(train=not_started), "YOUR CODE HERE")
    rejects("capstone", {"concat": concat_fill}, "hand over a dict of the four pieces")


# ---- the judge is out of the answer's reach --------------------------------------------------------------


def test_patched_comparisons_do_not_pass_a_wrong_answer(monkeypatch):
    def always(*args, **kwargs):
        return True

    def patching_concat(P, wte, idx, wpe):  # patches from inside the answer, then answers wrongly
        torch.allclose = torch.equal = always
        torch.isclose = lambda a, b, **kw: torch.ones_like(a, dtype=torch.bool)
        return torch.cat([P.expand(len(idx), -1, -1), wte[idx]], 1)

    saved = torch.allclose, torch.equal, torch.isclose
    try:
        rejects("concat", patching_concat, "the position embeddings are forgotten")
    finally:
        torch.allclose, torch.equal, torch.isclose = saved
    monkeypatch.setattr(torch, "allclose", always)  # patched in a cell before the check runs
    monkeypatch.setattr(torch, "equal", always)
    monkeypatch.setattr(torch, "isclose", lambda a, b, **kw: torch.ones_like(a, dtype=torch.bool))
    rejects("concat_backward", lambda dx, n_p: dx[:, :n_p].mean(0), "a mean over b")
    rejects("training_loop", loop(clip="per_element"), "differs from the reference")
    rejects(
        "vocab_init",
        lambda wte, n_p, counts, top_k, g: wte[
            candidates_of(counts, top_k)[torch.randperm(min(top_k, 8))[:n_p]]
        ].clone(),
        "not the global random state",
    )
    rejects("fix_snippet", snippet(zero_grad="never"), "zero_grad() is never called")


# ---- kernels: correct variants, wrong answers, and TRITON_INTERPRET --------------------------------------

KERNELS = """
import triton
import triton.language as tl


@triton.jit
def concat_where(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    token = tl.load(IDX + b * n + tl.maximum(t - n_p, 0)).to(tl.int64)  # a valid id even for a prompt row
    src = tl.where(t < n_p, P + t * D, WTE + token * D)
    row = tl.load(src + offs, mask=mask) + tl.load(WPE + t * D + offs, mask=mask)
    tl.store(X + (b * (n_p + n) + t).to(tl.int64) * D + offs, row, mask=mask)


@triton.jit
def concat_two_stores(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    out = X + (b * (n_p + n) + t) * D + offs
    pos = tl.load(WPE + t * D + offs, mask=offs < D, other=0.0)
    if t < n_p:
        tl.store(out, tl.load(P + t * D + offs, mask=offs < D, other=0.0) + pos, mask=offs < D)
    else:
        token = tl.load(IDX + b * n + t - n_p)
        tl.store(out, tl.load(WTE + token * D + offs, mask=offs < D, other=0.0) + pos, mask=offs < D)


@triton.jit
def concat_swapped_grid(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)  # the axes swapped: the grid is (B, n_p + n)
    b = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    if t < n_p:
        row = tl.load(P + t * D + offs, mask=mask)
    else:
        row = tl.load(WTE + tl.load(IDX + b * n + (t - n_p)).to(tl.int64) * D + offs, mask=mask)
    row += tl.load(WPE + t * D + offs, mask=mask)
    tl.store(X + (b * (n_p + n) + t) * D + offs, row, mask=mask)


@triton.jit
def concat_x_stride_n(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    if t < n_p:
        row = tl.load(P + t * D + offs, mask=mask)
    else:
        row = tl.load(WTE + tl.load(IDX + b * n + (t - n_p)).to(tl.int64) * D + offs, mask=mask)
    row += tl.load(WPE + t * D + offs, mask=mask)
    tl.store(X + (b * n + t) * D + offs, row, mask=mask)  # the example stride is n_p + n rows, not n


@triton.jit
def concat_block_stride(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    if t < n_p:
        row = tl.load(P + t * BLOCK_D + offs, mask=mask)  # rows are D apart, not BLOCK_D
    else:
        row = tl.load(WTE + tl.load(IDX + b * n + (t - n_p)).to(tl.int64) * D + offs, mask=mask)
    row += tl.load(WPE + t * D + offs, mask=mask)
    tl.store(X + (b * (n_p + n) + t) * D + offs, row, mask=mask)


@triton.jit
def concat_idx_stride(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    if t < n_p:
        row = tl.load(P + t * D + offs, mask=mask)
    else:
        row = tl.load(WTE + tl.load(IDX + b * (n_p + n) + (t - n_p)).to(tl.int64) * D + offs, mask=mask)
    row += tl.load(WPE + t * D + offs, mask=mask)
    tl.store(X + (b * (n_p + n) + t) * D + offs, row, mask=mask)


@triton.jit
def concat_no_prompt_positions(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    if t < n_p:
        row = tl.load(P + t * D + offs, mask=mask)
    else:
        row = tl.load(WTE + tl.load(IDX + b * n + (t - n_p)).to(tl.int64) * D + offs, mask=mask)
        row += tl.load(WPE + t * D + offs, mask=mask)
    tl.store(X + (b * (n_p + n) + t) * D + offs, row, mask=mask)


@triton.jit
def sum_while(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    ptr = DX + t * D + offs
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for _ in range(B):
        acc += tl.load(ptr, mask=offs < D, other=0.0)
        ptr += T * D  # the next example's row t
    tl.store(DP + t * D + offs, acc, mask=offs < D)


@triton.jit
def sum_tile(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    bs = tl.arange(0, 8)  # up to 8 examples at once, then a fixed-order tl.sum: deterministic too
    offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, B, 8):
        rows = start + bs
        block = tl.load(DX + (rows[:, None] * T + t) * D + offs[None, :],
                        mask=(rows[:, None] < B) & (offs[None, :] < D), other=0.0)
        acc += tl.sum(block, axis=0)
    tl.store(DP + t * D + offs, acc, mask=offs < D)


@triton.jit
def sum_unzeroed(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    acc = tl.load(DP + t * D + offs, mask=offs < D)  # dP is not zero before the launch
    for b in range(B):
        acc += tl.load(DX + (b * T + t) * D + offs, mask=offs < D)
    tl.store(DP + t * D + offs, acc, mask=offs < D)


@triton.jit
def sum_skip_first(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for b in range(1, B):
        acc += tl.load(DX + (b * T + t) * D + offs, mask=offs < D)
    tl.store(DP + t * D + offs, acc, mask=offs < D)


@triton.jit
def sum_row_stride(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for b in range(B):
        acc += tl.load(DX + (b * D + t) * D + offs, mask=offs < D)  # b * D rows: the example stride is T rows
    tl.store(DP + t * D + offs, acc, mask=offs < D)


@triton.jit
def sum_block_stride(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for b in range(B):
        acc += tl.load(DX + (b * T + t) * D + offs, mask=offs < D)
    tl.store(DP + t * BLOCK_D + offs, acc, mask=offs < D)  # rows of dP are D apart


@triton.jit
def sum_half(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float16)  # 11 bits: the sum loses its last digits
    for b in range(B):
        acc += tl.load(DX + (b * T + t) * D + offs, mask=offs < D).to(tl.float16)
    tl.store(DP + t * D + offs, acc.to(tl.float32), mask=offs < D)
"""

KERNEL_VERDICTS = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("answer_kernels", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from minipt import exercises
rows = []
for exercise_id, name in [("concat_kernel", "concat_where"), ("concat_kernel", "concat_x_stride_n"),
                          ("concat_kernel", "concat_no_prompt_positions"), ("batch_sum_kernel", "sum_tile"),
                          ("batch_sum_kernel", "sum_unzeroed"), ("batch_sum_kernel", "sum_skip_first")]:
    result = exercises.check(exercise_id, getattr(module, name))
    rows.append([name, result.passed, result.message])
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels") / "answer_kernels.py"
    path.write_text(KERNELS)
    namespace = {}
    exec(compile(KERNELS, str(path), "exec"), namespace)  # a file on disk: Triton reads a kernel's source
    return path, namespace


@needs_triton
def test_concat_kernel_answers(kernels):
    _, k = kernels
    accepts("concat_kernel", k["concat_where"])
    accepts("concat_kernel", k["concat_two_stores"])
    rejects("concat_kernel", k["concat_swapped_grid"], "past the end of x", "the whole row lies outside")
    rejects("concat_kernel", k["concat_x_stride_n"], "was never written")
    rejects("concat_kernel", k["concat_block_stride"], "of P")
    rejects("concat_kernel", k["concat_idx_stride"], "of idx")
    rejects("concat_kernel", k["concat_no_prompt_positions"], "only the token rows get positions")


@needs_triton
def test_batch_sum_kernel_answers(kernels):
    _, k = kernels
    accepts("batch_sum_kernel", k["sum_while"])
    accepts("batch_sum_kernel", k["sum_tile"])
    rejects("batch_sum_kernel", k["sum_unzeroed"], "dP[t=0, d=0] was written, but with NaN", "tl.zeros")
    rejects("batch_sum_kernel", k["sum_skip_first"], "skips example b = 0")
    rejects("batch_sum_kernel", k["sum_row_stride"], "dP: first difference")
    rejects("batch_sum_kernel", k["sum_block_stride"], "dP")
    rejects("batch_sum_kernel", k["sum_half"], "dP: first difference", "lower precision")


@needs_triton
def test_kernel_verdicts_do_not_depend_on_triton_interpret(kernels):
    """The checks run in a process where TRITON_INTERPRET was never set agree with the checks here (where
    tests/conftest.py sets it before Triton is imported, on a machine without a GPU)."""
    path, namespace = kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", KERNEL_VERDICTS, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    without = json.loads(out.stdout.strip().splitlines()[-1])
    for name, passed, message in without:
        exercise_id = "concat_kernel" if name.startswith("concat") else "batch_sum_kernel"
        here = exercises.check(exercise_id, namespace[name])
        assert (here.passed, here.message) == (passed, message), name
    assert [row[1] for row in without] == [True, False, False, True, False, False]


def launcher(
    check=("ids", "length", "widths"),
    strict_length=False,
    dtype=None,
    block=None,
    grid=None,
    error=ValueError,
    alloc="empty",
):
    def launch(kernel, prompt, wte, idx, wpe):
        B, n = idx.shape
        n_p, D = prompt.shape
        if "ids" in check and (bool((idx < 0).any()) or bool((idx >= wte.shape[0]).any())):
            raise error("token id out of range")
        if "length" in check and (n_p + n >= len(wpe) if strict_length else n_p + n > len(wpe)):
            raise error("sequence too long")
        if "widths" in check and len({D, wte.shape[1], wpe.shape[1]}) > 1:
            raise error("widths differ")
        if "prompt width" in check and D != wte.shape[1]:
            raise error("widths differ")
        x = wte.new_empty((B, n_p + n, D)) if alloc == "empty" else torch.zeros(B, n_p + n, D, dtype=dtype or wte.dtype)
        g = grid(B, n_p, n) if grid else (lambda meta: (B, n_p + n))
        kernel[g](x, prompt, wte, wpe, idx, n_p, n, D, BLOCK_D=block(D) if block else triton.next_power_of_2(D))
        return x

    return launch


@needs_triton
def test_concat_launcher_answers():
    accepts("concat_launcher", launcher())
    accepts("concat_launcher", launcher(alloc="zeros"))

    def asserts(kernel, prompt, wte, idx, wpe):
        assert int(idx.max()) < len(wte)
        return launcher()(kernel, prompt, wte, idx, wpe)

    rejects("concat_launcher", launcher(strict_length=True), "fills wpe", "raised ValueError")
    rejects("concat_launcher", launcher(check=("ids", "length", "prompt width")), "a wpe of width 6")
    rejects("concat_launcher", launcher(alloc="zeros", dtype=torch.float32), "x was allocated as float32")
    rejects("concat_launcher", launcher(block=lambda D: max(16, D)), "is not a power of two")
    rejects("concat_launcher", launcher(grid=lambda B, n_p, n: (B * (n_p + n),)), "one program per row")
    rejects("concat_launcher", asserts, "raised AssertionError; it must raise ValueError")


# ---- PromptTuning's concat hook ----------------------------------------------------------------------------


def test_prompt_tuning_concat_hook():
    from minipt.exercises.equations import concat_reference
    from minipt.exercises.training import tiny_model

    model = tiny_model()
    idx = torch.randint(0, 24, (2, 5), generator=torch.Generator().manual_seed(0))
    plain = PromptTuning(model, n_prompt=3, init="uniform", seed=1, backend="reference")
    calls = []

    def mine(prompt, wte, idx, wpe):
        calls.append(tuple(idx.shape))
        return concat_reference(prompt, wte, idx, wpe)

    hooked = PromptTuning(model, n_prompt=3, init="uniform", seed=1, backend="reference", concat=mine)
    logits, _ = hooked(idx)
    assert calls == [(2, 5)] and torch.equal(logits, plain(idx)[0])
    hooked(idx, torch.randint(0, 24, (2, 5)))[1].backward()
    assert hooked.prompt.grad is not None and hooked.prompt.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="concat must be a function"):
        PromptTuning(model, n_prompt=3, init="uniform", concat=42)
