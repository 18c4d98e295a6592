"""Exercises on training and using a soft prompt (notebook `03_training`).

* fix_snippet: a "prompt tuning" recipe that trains every weight; make only the prompt train.
* training_loop: ten lines, step for step the same as a reference loop (warmup, clipping, AdamW).
* vocab_init, label_init: Lester et al.'s initialisations (sections 2.1 and 3.2: sampled vocabulary, class labels).
* ensemble_vote: prompt ensembling by majority vote (section 6).

The models here are tiny random GPTs built from a fixed seed, so each check takes well under a second.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from minipt import GPT, GPTConfig, PromptTuning

from .result import (
    Case,
    CheckResult,
    Mistake,
    _allclose,
    _equal,
    call_answer,
    check_function,
    draw_cases,
    failed,
    fmt,
    passed,
    pick,
    randint,
)

__all__ = [
    "CHECKERS",
    "ENSEMBLE_MISTAKES",
    "FALSE_REJECTION",
    "LABEL_MISTAKES",
    "LOOP",
    "LOOP_MISTAKES",
    "MIN_DROP",
    "Recorder",
    "SNIPPET_STEPS",
    "TOL",
    "VOCAB_SEEDS",
    "VOCAB_SETTINGS",
    "batch",
    "binomial_range",
    "check_ensemble_vote",
    "check_fix_snippet",
    "check_label_init",
    "check_training_loop",
    "check_vocab_init",
    "ensemble_cases",
    "ensemble_vote_reference",
    "first_change",
    "label_init_cases",
    "label_init_reference",
    "loop_outcome",
    "loop_prompt_tuning",
    "loop_tolerances",
    "one_thread",
    "reference_loop",
    "snippet_loop_problem",
    "tiny_model",
    "vocab_task",
]

VOCAB, N_PROMPT = 24, 4


def tiny_model(seed: int = 0) -> GPT:
    """A 2-layer GPT of width 16, the same weights for the same seed; the global RNG is left as it was.

    GPT-2's init (std 0.02) makes a random model's attention nearly uniform and its blocks nearly silent, so
    no prompt could change its output. Every matrix is scaled by 10, which gives the prompt a visible effect:
    a few steps of prompt tuning then lower the loss by several percent.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, block_size=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
    return model


def batch(step: int, B: int = 4, n: int = 10):
    """(idx, targets) of step `step`: a pure function of the step. Targets are the ids shifted by one."""
    gen = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, VOCAB, (B, n), generator=gen)  # (B, n)
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100  # the last position has no next token
    return idx, targets


@contextlib.contextmanager
def one_thread():
    """One intra-op thread while a check trains: for a model this small, more threads only wait on each other
    (on a busy two-core laptop a step goes from about 3 ms to over 100 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def first_change(model: GPT, before: dict) -> str | None:
    for name, t in model.state_dict().items():
        if not _equal(t, before[name]):
            return f"{name} (max |change| {fmt((t - before[name]).abs().max().item())})"
    return None


# ---- fix_snippet -----------------------------------------------------------------------------------------

SNIPPET_STEPS = 20
MIN_DROP = 0.03  # the loss must fall by at least 3% in SNIPPET_STEPS steps (lr 0.1: about 7%)


def check_fix_snippet(answer) -> CheckResult:
    """answer(model, idx, targets, steps) -> (optimizer, losses): only the prompt trains."""
    exercise = "fix_snippet"
    model = tiny_model()
    idx, targets = batch(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tried = [f"a 2-layer GPT (D=16, V={VOCAB}), one batch B=4, n=10, {SNIPPET_STEPS} steps"]
    steps_seen = []  # (optimizer, its tensors' values and gradients) at every optimizer.step() of the answer

    def record(optimizer, args, kwargs):
        held = [p for group in optimizer.param_groups for p in group["params"]]
        steps_seen.append(
            (optimizer, [(p.detach().clone(), None if p.grad is None else p.grad.detach().clone()) for p in held])
        )

    hook = register_optimizer_step_pre_hook(record)
    try:
        with one_thread():
            out, error = call_answer(answer, (model, idx, targets, SNIPPET_STEPS))
    finally:
        hook.remove()
    if error:
        return failed(exercise, f"the answer {error}.", tried)
    if not (isinstance(out, tuple) and len(out) == 2):
        return failed(exercise, f"return (optimizer, losses); got {type(out).__name__}", tried)
    optimizer, losses = out
    changed = first_change(model, before)
    if changed:
        return failed(
            exercise,
            f"the base model changed: {changed}. Every weight the optimizer holds is trained, "
            f"so this is full fine-tuning. Hand the optimizer the prompt alone, and keep the "
            f"model frozen.",
            tried,
        )
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    if with_grad:
        return failed(
            exercise,
            f"the base model's weights received gradients ({with_grad[0]}.grad is set, "
            f"{len(with_grad)} tensors in all): they were made trainable again. Nothing changed "
            f"this time, but autograd computed and stored a gradient for every weight; leave "
            f"the model frozen (PromptTuning freezes it).",
            tried,
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        return failed(
            exercise, f"the first value returned must be the optimizer, got {type(optimizer).__name__}", tried
        )
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if len(held) != 1:
        return failed(
            exercise,
            f"the optimizer holds {len(held)} tensors; it must hold exactly one, the prompt "
            f"P ({N_PROMPT}, 16). (pt.parameters() also yields every frozen weight of the "
            f"model: pass [pt.prompt].)",
            tried,
        )
    prompt = held[0]
    if prompt.shape != (N_PROMPT, 16):
        return failed(
            exercise,
            f"the optimizer's tensor has shape {tuple(prompt.shape)}; the prompt is (n_prompt, D) = ({N_PROMPT}, 16)",
            tried,
        )
    if not (
        isinstance(losses, (list, tuple))
        and len(losses) == SNIPPET_STEPS
        and all(isinstance(v, float) and math.isfinite(v) for v in losses)
    ):
        return failed(
            exercise, f"losses must be a list of {SNIPPET_STEPS} finite floats (loss.item() at each step)", tried
        )
    problem = snippet_loop_problem(model, idx, targets, steps_seen, prompt)
    if problem:
        return failed(exercise, problem, tried)
    if len(set(losses)) == 1:
        return failed(
            exercise,
            f"the loss never changed ({fmt(losses[0])} at every step): the optimizer's tensor "
            f"never received a gradient, so it is not the prompt the model uses (a copy, or a "
            f"tensor made with .detach()?). Pass pt.prompt itself.",
            tried,
        )
    drop = 1 - losses[-1] / losses[0]
    if drop < MIN_DROP:
        return failed(
            exercise,
            f"the loss fell only from {fmt(losses[0])} to {fmt(losses[-1])} ({drop:.2%}) in "
            f"{SNIPPET_STEPS} steps. A soft prompt needs a far larger learning rate than "
            f"fine-tuning (Lester et al. use 0.3); try 0.1.",
            tried,
        )
    return passed(
        exercise,
        f"The base model is bit-identical, the optimizer holds only the prompt "
        f"{tuple(prompt.shape)}, and the loss fell from {fmt(losses[0])} to "
        f"{fmt(losses[-1])}.",
        tried,
    )


def snippet_loop_problem(model, idx, targets, steps_seen, prompt) -> str | None:
    """What is wrong with the loop itself, read from the optimizer steps it took: one optimizer for all steps,
    and at each step the gradient of that step's loss alone (zero_grad between steps)."""
    optimizers = {id(opt) for opt, _ in steps_seen}
    if len(optimizers) > 1:
        return (
            f"{len(optimizers)} optimizers took the {len(steps_seen)} steps: a new optimizer is made inside the "
            f"loop, so Adam's running averages (and its step count) start over at every step. Make the optimizer "
            f"once, before the loop."
        )
    if len(steps_seen) != SNIPPET_STEPS:
        return f"optimizer.step() was called {len(steps_seen)} times for {SNIPPET_STEPS} steps: call it once per step"
    with torch.random.fork_rng(devices=[]), one_thread():
        judge = PromptTuning(model, n_prompt=N_PROMPT, init="uniform", seed=0, backend="reference")
    for step in (1, 2):  # the gradient each step used, against the gradient of that step's loss alone
        ((value, grad),) = [(v, g) for v, g in steps_seen[step][1] if v.shape == prompt.shape] or [(None, None)]
        ((_, grad_before),) = [(v, g) for v, g in steps_seen[step - 1][1] if v.shape == prompt.shape] or [(None, None)]
        if grad is None or grad_before is None:
            return None
        with torch.no_grad():
            judge.prompt.copy_(value)
        judge.prompt.grad = None
        judge(idx, targets)[1].backward()
        fresh = judge.prompt.grad
        if _allclose(grad, fresh, atol=1e-6, rtol=1e-4):
            continue
        if _allclose(grad, fresh + grad_before, atol=1e-6, rtol=1e-4):
            return (
                f"at step {step}, prompt.grad is this step's gradient plus the previous one's: "
                f"optimizer.zero_grad() is never called, so the gradients of all earlier steps add up in .grad. "
                f"Call it once per step, before loss.backward()."
            )
        return None  # another loss than pt(idx, targets): the other checks below judge the outcome
    return None


# ---- training_loop ---------------------------------------------------------------------------------------

LOOP = dict(steps=8, lr=0.1, warmup=3, max_norm=0.05)  # max_norm below the gradient's norm: clipping acts
TOL = 1e-6  # rounding: the same operations in another order (e.g. a scheduler's lr) differ in the last bits
# The judge's own optimizer and clipping, taken at import: an answer that patches torch cannot move the reference.
_AdamW, _clip_grad_norm_ = torch.optim.AdamW, torch.nn.utils.clip_grad_norm_


def reference_loop(
    pt,
    get_batch,
    steps,
    lr,
    warmup,
    max_norm,
    *,
    zero_grad=True,
    warmup_from=1,
    clip="before",
    weight_decay=0.0,
    same_batch=False,
):
    """The loop of the exercise; the keyword arguments switch on the mistakes the checker can name.

    clip="definition" clips as the definition reads, g * min(1, max_norm / ||g||): a correct answer too, whose
    only difference from clip_grad_norm_ (which divides by ||g|| + 1e-6) is the size of the tolerance."""
    optimizer = _AdamW([pt.prompt], lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + warmup_from) / warmup)  # linear warmup, then constant
        idx, targets = get_batch(0 if same_batch else step)
        _, loss = pt(idx, targets)
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip == "before":
            _clip_grad_norm_([pt.prompt], max_norm)
        if clip == "definition":
            with torch.no_grad():
                pt.prompt.grad.mul_((max_norm / pt.prompt.grad.norm()).clamp(max=1.0))
        optimizer.step()
        if clip == "after":  # too late: the step has used the unclipped gradient
            _clip_grad_norm_([pt.prompt], max_norm)
        losses.append(loss.item())
    return losses


LOOP_MISTAKES = [
    (
        "optimizer.zero_grad() is never called: the gradients of all earlier steps add up in .grad",
        dict(zero_grad=False),
    ),
    (
        "the warmup starts at 0 (lr * step / warmup): the first step then has learning rate 0; the rule is "
        "lr * min(1, (step + 1) / warmup)",
        dict(warmup_from=0),
    ),
    (
        "the gradient is not clipped before optimizer.step() (clipping after the step, or not at all, leaves the "
        "step unclipped): call torch.nn.utils.clip_grad_norm_ between backward() and step()",
        dict(clip="after"),
    ),
    ("AdamW keeps its default weight_decay=0.01: the exercise asks for weight_decay=0.0", dict(weight_decay=0.01)),
    ("the same batch get_batch(0) is used at every step instead of get_batch(step)", dict(same_batch=True)),
]


def loop_prompt_tuning(seed: int = 0) -> PromptTuning:
    return PromptTuning(tiny_model(seed), n_prompt=N_PROMPT, init="uniform", seed=seed, backend="reference")


class Recorder:
    """Stands in for get_batch: hands out get_batch(step) and keeps the prompt as it is when each step starts."""

    def __init__(self, get_batch, pt):
        self.get_batch, self.pt, self.calls, self.prompts = get_batch, pt, [], []

    def __call__(self, step):
        self.calls.append(step)
        self.prompts.append(self.pt.prompt.detach().clone())
        return self.get_batch(step)

    def in_step_order(self, steps: int) -> bool:
        return self.calls == list(range(steps))


@functools.cache
def loop_outcome(slip: tuple = ()) -> tuple[tuple, tuple, torch.Tensor]:
    """(losses, the prompt at the start of each step, the final prompt) of the reference loop or of one of its
    mistakes: computed once per process."""
    pt = loop_prompt_tuning()
    recorder = Recorder(batch, pt)
    with one_thread():
        losses = reference_loop(pt, recorder, **LOOP, **dict(slip))
    return tuple(losses), tuple(recorder.prompts), pt.prompt.detach().clone()


def loop_tolerances() -> tuple[list, list, float]:
    """Per-step tolerances for the losses and the prompts, and the final prompt's: TOL plus ten times the gap
    between the two correct ways to clip (clip_grad_norm_'s ||g|| + 1e-6 against ||g||), so the epsilon inside
    a library call is never counted as a student's error, and a real slip (a gap of 1e-3 or more) still is."""
    losses, prompts, final = loop_outcome()
    d_losses, d_prompts, d_final = loop_outcome((("clip", "definition"),))
    loss_tol = [TOL + 10 * abs(a - b) for a, b in zip(losses, d_losses)]
    prompt_tol = [TOL + 10 * (a - b).abs().max().item() for a, b in zip(prompts, d_prompts)]
    return loss_tol, prompt_tol, TOL + 10 * (final - d_final).abs().max().item()


def check_training_loop(answer) -> CheckResult:
    """answer(pt, get_batch, steps, lr, warmup, max_norm) -> losses: the reference loop, step by step.

    Compared at every step: the prompt as the step starts (recorded when the answer calls get_batch(step)) and
    the step's loss; then the final prompt. The reference is computed before the answer runs."""
    exercise = "training_loop"
    tried = ["a 2-layer GPT (D=16), uniform prompt (4, 16), " + ", ".join(f"{k}={v}" for k, v in LOOP.items())]
    expected, ref_prompts, ref_prompt = loop_outcome()
    loss_tol, prompt_tol, final_tol = loop_tolerances()
    for slip in LOOP_MISTAKES:  # the mistakes' outcomes too, before the answer could patch anything
        loop_outcome(tuple(sorted(slip[1].items())))
    pt = loop_prompt_tuning()
    before = {k: v.clone() for k, v in pt.model.state_dict().items()}
    recorder = Recorder(batch, pt)
    with one_thread():  # as for the reference: the thread count can change the last bits of a matmul
        got, error = call_answer(answer, (pt, recorder, *LOOP.values()))
    if error:
        return failed(exercise, f"the answer {error}.", tried)
    if not (isinstance(got, (list, tuple)) and all(isinstance(v, float) for v in got)):
        return failed(exercise, f"return the list of losses (floats, loss.item()), got {type(got).__name__}", tried)
    if len(got) != LOOP["steps"]:
        return failed(exercise, f"{len(got)} losses for {LOOP['steps']} steps: record one loss per step", tried)
    changed = first_change(pt.model, before)
    if changed:
        return failed(exercise, f"the base model changed: {changed}; only pt.prompt may train", tried)
    final = pt.prompt.detach()
    problem = None
    for s in range(len(got)):
        if s and recorder.in_step_order(len(got)):
            gap = (recorder.prompts[s] - ref_prompts[s]).abs().max().item()
            if gap > prompt_tol[s]:
                problem = (
                    f"pt.prompt after step {s - 1} (as step {s} starts) differs from the reference by up to "
                    f"{fmt(gap)} (tolerance {fmt(prompt_tol[s])}); the losses up to step {s - 1} match."
                )
                break
        if abs(got[s] - expected[s]) > loss_tol[s]:
            problem = f"step {s}: expected loss {fmt(expected[s])}, got {fmt(got[s])}."
            break
    if problem is None:
        gap = (final - ref_prompt).abs().max().item()
        if gap <= final_tol:
            return passed(
                exercise,
                f"{len(got)} losses, the prompt at every step and the final prompt match the "
                f"reference loop (loss {fmt(got[0])} -> {fmt(got[-1])}; tolerance on the prompt "
                f"{fmt(final_tol)}, from the 1e-6 inside clip_grad_norm_).",
                tried,
            )
        problem = (
            f"every loss matches, but the final prompt differs from the reference by up to {fmt(gap)} "
            f"(tolerance {fmt(final_tol)})."
        )
    for explanation, flags in LOOP_MISTAKES:
        losses, _, prompt = loop_outcome(tuple(sorted(flags.items())))
        if (
            all(abs(a - b) <= t for a, b, t in zip(losses, got, loss_tol))
            and (prompt - final).abs().max().item() <= final_tol
        ):
            problem += f" This is what you get when {explanation}."
            break
    return failed(exercise, problem, tried)


# ---- vocab_init ------------------------------------------------------------------------------------------


def vocab_task():
    """wte (12, 5) with distinct rows; counts: ids 9, 10, 11 (the 'special tokens') and 4 never occur."""
    gen = torch.Generator().manual_seed(8)
    wte = torch.randn(12, 5, generator=gen)
    counts = torch.tensor([50, 7, 31, 12, 0, 90, 3, 64, 20, 0, 0, 0])
    return wte, counts


VOCAB_SEEDS = 300  # generator seeds per setting: each prompt is drawn 300 times
FALSE_REJECTION = 1e-6  # the chance that a correct (uniform) answer fails the uniformity test, at most
VOCAB_SETTINGS = [(1, 6), (4, 6), (3, 10)]  # (n_p, top_k); top_k = 10 is more than the 8 tokens that occur


def binomial_range(trials: int, p: float, alpha: float) -> tuple[int, int]:
    """(lo, hi): a Binomial(trials, p) count falls below lo, or above hi, with probability at most alpha (alpha/2
    on each side), from the exact distribution (log-space terms, so 300 trials do not underflow)."""
    log_pmf = [
        math.lgamma(trials + 1)
        - math.lgamma(k + 1)
        - math.lgamma(trials - k + 1)
        + (k * math.log(p) if k else 0.0)
        + ((trials - k) * math.log1p(-p) if k < trials else 0.0)
        for k in range(trials + 1)
    ]
    pmf = [math.exp(v) for v in log_pmf]
    lo, tail = 0, 0.0
    while tail + pmf[lo] <= alpha / 2:
        tail += pmf[lo]
        lo += 1
    hi, tail = trials, 0.0
    while tail + pmf[hi] <= alpha / 2:
        tail += pmf[hi]
        hi -= 1
    return lo, hi


def check_vocab_init(answer) -> CheckResult:
    """answer(wte (V, D), n_p, token_counts (V,), top_k, generator) -> P (n_p, D).

    Each draw is checked (distinct rows of wte, copied, from the top_k tokens that occur, reproducible with the
    generator); then, over VOCAB_SEEDS seeds per setting, how often each candidate was drawn. A uniform draw of
    n_p distinct tokens among k includes a given one with probability n_p / k, so its count over S seeds is
    Binomial(S, n_p / k), whatever the other tokens do. Each count must fall inside the exact range that holds
    it with probability 1 - FALSE_REJECTION / 20 (20 candidates are counted in all): by the union bound, a
    correct answer fails with probability below FALSE_REJECTION = 1e-6. Drawing in proportion to the counts,
    or from the top_k - 1, moves a count by about 8 standard deviations (n_p = 1, top_k = 6), far outside it.
    """
    exercise = "vocab_init"
    wte, counts = vocab_task()
    ranked = torch.argsort(counts, descending=True, stable=True).tolist()
    rank = {i: r for r, i in enumerate(ranked)}
    candidates_in_all = sum(min(top_k, int((counts > 0).sum())) for _, top_k in VOCAB_SETTINGS)
    tried = []
    for n_p, top_k in VOCAB_SETTINGS:
        allowed = ranked[: min(top_k, int((counts > 0).sum()))]
        tried.append(f"V=12, n_p={n_p}, top_k={top_k}, {VOCAB_SEEDS} seeds")
        drawn = dict.fromkeys(allowed, 0)  # candidate -> the number of seeds whose prompt holds it
        for seed in range(VOCAB_SEEDS):
            P, error, given = _call_vocab(answer, wte, n_p, counts, top_k, seed, global_seed=seed)
            label = f"n_p={n_p}, top_k={top_k}, seed {seed}"
            if error:
                return failed(exercise, f"{label}: the answer {error}.", tried)
            if not isinstance(P, torch.Tensor) or P.shape != (n_p, 5):
                shape = tuple(P.shape) if isinstance(P, torch.Tensor) else type(P).__name__
                return failed(exercise, f"{label}: expected P of shape (n_p, D) = ({n_p}, 5), got {shape}", tried)
            if P.dtype != torch.float32:
                return failed(exercise, f"{label}: P must be float32, got {str(P.dtype).replace('torch.', '')}", tried)
            if P.untyped_storage().data_ptr() == given.untyped_storage().data_ptr():
                return failed(
                    exercise,
                    f"{label}: P shares memory with wte (a view such as wte[:n_p]): training P "
                    f"would change the model's embedding table. Return a copy.",
                    tried,
                )
            ids = []
            for row in range(n_p):
                same = (wte == P[row].detach()).all(dim=1).nonzero().flatten().tolist()
                if not same:
                    return failed(
                        exercise,
                        f"{label}: row {row} of P is not a row of wte; each row must be the "
                        f"embedding of one sampled token, copied exactly",
                        tried,
                    )
                ids.append(same[0])
            if len(set(ids)) < len(ids):
                twice = next(i for i in ids if ids.count(i) > 1)
                return failed(
                    exercise,
                    f"{label}: token {twice} was picked twice (ids {ids}): sample without "
                    f"replacement (torch.randperm), so the prompt has n_p distinct tokens",
                    tried,
                )
            outside = [i for i in ids if i not in drawn]
            if outside:
                i = outside[0]
                why = (
                    "never occurs in the corpus (count 0): special tokens and unseen ids are excluded"
                    if counts[i] == 0
                    else f"is only the {rank[i] + 1}th most frequent, outside the top_k = {top_k}"
                )
                return failed(
                    exercise,
                    f"{label}: token {i} (ids {ids}) {why}. Sample among the top_k most frequent "
                    f"tokens that occur at all.",
                    tried,
                )
            if seed < 8:  # reproducible: the same seed under another global random state gives the same prompt
                again, _, _ = _call_vocab(answer, wte, n_p, counts, top_k, seed, global_seed=seed + 100)
                if not (isinstance(again, torch.Tensor) and _equal(again, P)):
                    return failed(
                        exercise,
                        f"{label}: two calls with generators seeded alike gave different "
                        f"prompts: draw with generator=generator, not the global random state",
                        tried,
                    )
            for i in ids:
                drawn[i] += 1
        if n_p < len(allowed) and max(drawn.values()) == VOCAB_SEEDS:
            return failed(
                exercise,
                f"n_p={n_p}, top_k={top_k}: every seed picks the same tokens "
                f"{sorted(i for i, c in drawn.items() if c == VOCAB_SEEDS)}: sample them at "
                f"random among the top_k (torch.randperm(k, generator=generator)) instead of "
                f"taking the first n_p",
                tried,
            )
        lo, hi = binomial_range(VOCAB_SEEDS, n_p / len(allowed), FALSE_REJECTION / candidates_in_all)
        for i, c in drawn.items():
            if not lo <= c <= hi:
                advice = (
                    "Is the last candidate left out (randint(0, k - 1), or [:top_k - 1])?"
                    if c == 0
                    else "Draw uniformly among the candidates (torch.randperm), not in proportion to the counts."
                )
                return failed(
                    exercise,
                    f"with n_p={n_p}, top_k={top_k}: token {i} (count {int(counts[i])}, "
                    f"frequency rank {rank[i] + 1}) was drawn in {c} of {VOCAB_SEEDS} seeds. "
                    f"A uniform draw of {n_p} of the "
                    f"{len(allowed)} candidates holds each in {VOCAB_SEEDS * n_p / len(allowed):.0f} "
                    f"on average, and in {lo} to {hi} except with probability "
                    f"{FALSE_REJECTION / candidates_in_all:.0e} (this test fails a correct "
                    f"answer with probability below {FALSE_REJECTION:.0e}). {advice}",
                    tried,
                )
    return passed(
        exercise,
        f"Distinct tokens, from the top_k that occur, copied exactly from wte, reproducible with "
        f"the generator, and drawn uniformly: over {VOCAB_SEEDS} seeds per setting, every "
        f"candidate's count is inside its range (a correct answer fails this with probability "
        f"below {FALSE_REJECTION:.0e}).",
        tried,
    )


def _call_vocab(answer, wte, n_p, counts, top_k, seed, global_seed):
    """(P, error, the wte handed over), the global RNG set to `global_seed`: an answer ignoring `generator`
    then gives two different prompts for one seed."""
    given = wte.clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        P, error = call_answer(answer, (given, n_p, counts.clone(), top_k, torch.Generator().manual_seed(seed)))
    return P, error, given


# ---- label_init ------------------------------------------------------------------------------------------


def label_init_reference(wte, label_ids):
    return torch.stack([wte[torch.tensor(ids)].mean(dim=0) for ids in label_ids])  # (K, D)


def label_init_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(9)
    wte = torch.randn(10, 6, generator=gen)
    fixed = [
        Case(dict(K=K, D=6), (wte, labels), note)
        for K, labels, note in [
            (2, [[3, 8], [5, 1, 2]], "labels of 2 and 3 tokens"),
            (1, [[0, 4]], "one label"),
            (3, [[2, 9, 9], [7], [1, 6, 8, 3]], "labels of 3, 1 and 4 tokens"),
        ]
    ]

    def draw(g):  # labels of 1 to 4 tokens, a token may repeat (" no" and " no." share a piece)
        V, D, K = randint(g, 3, 15), randint(g, 1, 8), randint(g, 1, 5)
        labels = [torch.randint(0, V, (randint(g, 1, 4),), generator=g).tolist() for _ in range(K)]
        dtype = pick(g, [torch.float32, torch.float32, torch.float64])
        note = "fp64, " if dtype == torch.float64 else ""
        return Case(
            dict(K=K, D=D),
            (torch.randn(V, D, generator=g, dtype=dtype), labels),
            note + "label lengths " + "/".join(str(len(ids)) for ids in labels),
        )

    return fixed + draw_cases(9, 12, draw)


def _padded_mean(wte, labels):
    longest = max(len(ids) for ids in labels)
    padded = torch.tensor([ids + [0] * (longest - len(ids)) for ids in labels])  # (K, longest), padded with id 0
    return wte[padded].mean(dim=1)


LABEL_MISTAKES = [
    Mistake(
        "the label's token embeddings are summed instead of averaged",
        lambda wte, labels: torch.stack([wte[torch.tensor(ids)].sum(0) for ids in labels]),
    ),
    Mistake(
        "only the first token of each label is used; a label of several tokens is their mean",
        lambda wte, labels: torch.stack([wte[ids[0]] for ids in labels]),
    ),
    Mistake(
        "the tokens of all labels are pooled into one mean: each class gets its own row",
        lambda wte, labels: wte[torch.tensor([i for ids in labels for i in ids])].mean(0).expand(len(labels), -1),
    ),
    Mistake(
        "only the last token of each label is used", lambda wte, labels: torch.stack([wte[ids[-1]] for ids in labels])
    ),
    Mistake(
        "the labels are padded to one length (with id 0) before the mean: a short label's mean then counts "
        "the padding rows; average each label over its own tokens only",
        _padded_mean,
    ),
    Mistake(
        "every row is the first label's mean: row k is the mean of label k's tokens",
        lambda wte, labels: wte[torch.tensor(labels[0])].mean(0).expand(len(labels), -1),
    ),
    Mistake(
        "a token repeated within a label is counted once (set(ids)): the mean runs over the label's tokens "
        "as they are, repeats included",
        lambda wte, labels: torch.stack([wte[sorted(set(ids))].mean(0) for ids in labels]),
    ),
]


def check_label_init(answer) -> CheckResult:
    """answer(wte (V, D), label_ids: list of K lists of token ids) -> (K, D): row k = mean of label k's rows."""
    return check_function(
        "label_init",
        answer,
        label_init_cases(),
        label_init_reference,
        arg_names=("wte", "label_ids"),
        dims=("k", "d"),
        shape_doc="(K, D)",
        name="P",
        mistakes=LABEL_MISTAKES,
        atol=1e-6,
        rtol=1e-6,
        size_words={"K": "every class label, not just the first"},
    )


# ---- ensemble_vote ---------------------------------------------------------------------------------------


def ensemble_vote_reference(probs):
    K, N, C = probs.shape
    counts = torch.nn.functional.one_hot(probs.argmax(dim=-1), C).sum(dim=0)  # (N, C) votes per class
    mean = probs.mean(dim=0)  # (N, C)
    tied = counts == counts.max(dim=-1, keepdim=True).values  # (N, C) the classes with the most votes
    return mean.masked_fill(~tied, -1.0).argmax(dim=-1)  # (N,) the tied class with the largest mean


def ensemble_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(10)

    def random(K, N, C):
        return torch.randn(K, N, C, generator=gen, dtype=torch.float64).mul(2).softmax(-1)

    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    outvoted = t([[[0.4, 0.35, 0.25]], [[0.4, 0.35, 0.25]], [[0.0, 0.9, 0.1]]])  # votes 0, 0, 1; the mean favours 1
    three_way = t([[[0.02, 0.08, 0.9]], [[0.45, 0.55, 0.0]], [[0.55, 0.45, 0.0]]])  # 1 : 1 : 1; mean favours 1, max 2
    tie_mean_vs_max = t([[[0.95, 0.03, 0.02]], [[0.34, 0.33, 0.33]], [[0.1, 0.8, 0.1]], [[0.1, 0.8, 0.1]]])  # 2 : 2
    tie_third_class = t([[[0.5, 0.1, 0.4]], [[0.05, 0.5, 0.45]]])  # 1 : 1, and class 2 has the largest mean
    sure_minority = t([[[0.26, 0.25, 0.25, 0.24]]] * 3 + [[[0.0, 0.97, 0.02, 0.01]]] * 2)  # 3 : 2, the 2 far surer
    # 1 : 1; class 0 has the larger mean (.4955 vs .402), class 1 the larger geometric mean (.031 vs .057)
    tie_mean_vs_geometric = t([[[0.99, 0.004, 0.006]], [[0.001, 0.8, 0.199]]])
    # 1 : 1 : 1; class 2 has the largest mean: a tie-break among the first two classes only misses it
    three_way_third = t([[[0.34, 0.33, 0.33]], [[0.33, 0.34, 0.33]], [[0.0, 0.0, 1.0]]])

    def draw(g):  # few classes and an even K or so: ties between the most voted classes are common
        K, N, C = randint(g, 1, 6), randint(g, 1, 6), randint(g, 2, 4)
        return Case(dict(K=K, N=N, C=C), (random_with(g, K, N, C),))

    def random_with(g, K, N, C):
        return torch.randn(K, N, C, generator=g, dtype=torch.float64).mul(2).softmax(-1)

    return [
        Case(dict(K=2, N=1, C=3), (tie_mean_vs_geometric,), "a 1 : 1 tie, mean and geometric mean disagree"),
        Case(dict(K=3, N=1, C=3), (three_way_third,), "a 1 : 1 : 1 tie won by the third class"),
        Case(
            dict(K=3, N=5, C=3),
            (torch.cat([outvoted, three_way, random(3, 3, 3)], dim=1),),
            "a majority against the mean, a 1 : 1 : 1 tie",
        ),
        Case(dict(K=4, N=1, C=3), (tie_mean_vs_max,), "a 2 : 2 tie"),
        Case(dict(K=2, N=3, C=3), (torch.cat([tie_third_class, random(2, 2, 3)], dim=1),), "a 1 : 1 tie"),
        Case(dict(K=1, N=5, C=4), (random(1, 5, 4),), "one prompt"),
        Case(
            dict(K=5, N=6, C=4),
            (torch.cat([sure_minority, random(5, 5, 4)], dim=1),),
            "a 3 : 2 majority against a surer minority",
        ),
    ] + draw_cases(10, 12, draw)


def _votes(probs):
    return torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0)  # (N, C)


ENSEMBLE_MISTAKES = [
    Mistake(
        "a tie goes to the highest class id: it must go to the tied class with the larger mean probability",
        lambda p: p.shape[-1] - 1 - _votes(p).flip(-1).argmax(-1),
    ),
    Mistake(
        "only the first prompt's prediction is used (probs[0].argmax(-1)): every prompt of the ensemble votes",
        lambda p: p[0].argmax(-1),
    ),
    Mistake(
        "the mean probability decides alone (argmax of probs.mean(0)): a majority of prompts must win",
        lambda p: p.mean(0).argmax(-1),
    ),
    Mistake(
        "a tie goes to the lowest class id (argmax of the vote counts): it must go to the tied class with "
        "the larger mean probability",
        lambda p: _votes(p).argmax(-1),
    ),
    Mistake(
        "a tie goes to the tied class with the largest single probability (max over prompts), not the "
        "largest mean probability",
        lambda p: p.amax(0).masked_fill(_votes(p) != _votes(p).amax(-1, keepdim=True), -1.0).argmax(-1),
    ),
    Mistake(
        "the tie-break looks at every class, not only the tied ones (a class with fewer votes can win)",
        lambda p: (_votes(p) + p.mean(0) * p.shape[0]).argmax(-1),
    ),
    Mistake(
        "a tie goes to the class the first prompt voted for: the rule is the tied class with the larger mean "
        "probability over all K prompts",
        lambda p: torch.where(_tied_count(p) > 1, _first_prompt_tied(p), _votes(p).argmax(-1)),
    ),
    Mistake(
        "a tie is broken by the geometric mean (the product of the probabilities), not the arithmetic mean",
        lambda p: p.log().mean(0).masked_fill(_votes(p) != _votes(p).amax(-1, keepdim=True), -float("inf")).argmax(-1),
    ),
    Mistake(
        "the tie-break compares only the two most voted classes (topk(2)): a tie of three or more classes "
        "must compare all of them",
        lambda p: _top_two_tiebreak(p),
    ),
]


def _tied_count(p):
    return (_votes(p) == _votes(p).amax(-1, keepdim=True)).sum(-1)  # (N,) how many classes share the top vote


def _first_prompt_tied(p):
    tied = _votes(p) == _votes(p).amax(-1, keepdim=True)  # (N, C)
    first = p[0].argmax(-1)  # (N,)
    return torch.where(tied.gather(-1, first[:, None])[:, 0], first, p.mean(0).masked_fill(~tied, -1).argmax(-1))


def _top_two_tiebreak(p):
    two = _votes(p).topk(2, dim=-1).indices if p.shape[-1] > 1 else _votes(p).argmax(-1, keepdim=True)  # (N, 2)
    means = p.mean(0).gather(-1, two)
    return two.gather(-1, means.argmax(-1, keepdim=True))[:, 0]


def check_ensemble_vote(answer) -> CheckResult:
    """answer(probs (K, N, C)) -> (N,) int64: majority vote of K prompts, ties to the larger mean probability."""
    return check_function(
        "ensemble_vote",
        answer,
        ensemble_cases(),
        ensemble_vote_reference,
        arg_names=("probs",),
        dims=("i",),
        shape_doc="(N,)",
        mistakes=ENSEMBLE_MISTAKES,
        atol=0,
        rtol=0,
        name="the votes",
        size_words={"K": "every prompt of the ensemble"},
    )


CHECKERS = {
    "fix_snippet": check_fix_snippet,
    "training_loop": check_training_loop,
    "vocab_init": check_vocab_init,
    "label_init": check_label_init,
    "ensemble_vote": check_ensemble_vote,
}
