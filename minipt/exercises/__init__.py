"""Exercises that grade themselves: write a function, hand it to `check`, read what differs.

    >>> from minipt import exercises
    >>> def concat(prompt, wte, idx, wpe):
    ...     ...                                   # your code
    >>> print(exercises.check("concat", concat))
    concat: not yet. Case B=2, n_p=3, n=4, D=8: first difference at (b=0, t=3, d=0): expected ..., got ...

`EXERCISES` lists them (id -> title, learning goal, minutes, notebook, signature), in the order of the
notebooks under notebooks/exercises/: 01_math (the equations of Lester et al. 2021, section 2), 02_kernel
(the fused Triton kernel, run by the CPU interpreter), 03_training (training and using a prompt), 04_capstone
(four of those pieces tune the frozen tiny GPT, through `PromptTuning(..., concat=...)`), 05_kernel_track (the
fused frozen-head cross-entropy and a decode step's attention over the cached prompt prefix, in Triton),
06_predict_measure (numbers predicted from shapes, then checked against the committed measurements).

`check(exercise_id, answer)` never raises on a wrong answer: it returns a `CheckResult` whose `str()` says
what was tried and, on failure, the first shape or value that differs (expected vs got, the index, the
inputs), and names the mistake when it recognises one. The last result of each exercise is kept
(`results()`), which is how `python -m minipt.exercises check NOTEBOOK.ipynb` grades a notebook.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from . import capstone, equations, kernel, kernel_track, predict, training
from .result import NOT_STARTED, CheckResult

RESULTS_ENV = "MINIPT_EXERCISE_RESULTS"  # set by the grader (grade.py): where check() appends each result

__all__ = ["EXERCISES", "Exercise", "CheckResult", "check", "results", "summary"]


@dataclass(frozen=True)
class Exercise:
    id: str
    title: str
    goal: str  # what the student can do afterwards
    minutes: int  # estimated time for a student who has read the notebook's text
    notebook: str  # the notebook it belongs to, e.g. "01_math" (notebooks/exercises/01_math.ipynb)
    signature: str


def _exercises(*rows) -> dict[str, Exercise]:
    return {row[0]: Exercise(*row) for row in rows}


EXERCISES: dict[str, Exercise] = _exercises(
    (
        "concat",
        "The input x = [P, wte[idx]] + wpe",
        "build the prompt-tuning input, with the positions the prompt shifts",
        10,
        "01_math",
        "concat(prompt (n_p, D), wte (V, D), idx (B, n) int64, wpe (n_ctx, D)) -> x (B, n_p + n, D)",
    ),
    (
        "concat_backward",
        "The prompt's gradient: a sum over the batch",
        "derive dL/dP from dL/dx by the chain rule",
        10,
        "01_math",
        "concat_backward(dx (B, n_p + n, D), n_p) -> dP (n_p, D)",
    ),
    (
        "frozen_head_backward",
        "Cross-entropy through a frozen head, by hand",
        "differentiate softmax cross-entropy and a linear head without autograd, stably",
        25,
        "01_math",
        "frozen_head_backward(h (N, D), W (V, D), targets (N,) int64) -> dL/dh (N, D)",
    ),
    (
        "causal_attention",
        "Causal attention, and why the prompt reaches every token",
        "write masked scaled dot-product attention and see that the causal mask lets every token read the prompt",
        20,
        "01_math",
        "causal_attention(q, k, v each (B, H, T, hd)) -> y (B, H, T, hd)",
    ),
    (
        "concat_kernel",
        "The fused Triton kernel: gather, add, store",
        "write a row-per-program Triton kernel with masked loads and stores and int64 row offsets",
        30,
        "02_kernel",
        "@triton.jit concat_kernel(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr), grid (B, n_p + n)",
    ),
    (
        "concat_launcher",
        "The launcher: validate, allocate, launch",
        "refuse bad inputs before a launch (a kernel does not bounds-check), pick BLOCK_D and the grid",
        20,
        "02_kernel",
        "launch_concat(kernel, prompt, wte, idx, wpe) -> x (B, n_p + n, D)",
    ),
    (
        "batch_sum_kernel",
        "The backward kernel: a deterministic sum over the batch",
        "reduce over the batch inside one program, without atomics, so every run gives the same bits",
        25,
        "02_kernel",
        "@triton.jit batch_sum_kernel(DX, DP, B, T, D, BLOCK_D: tl.constexpr), grid (n_p,)",
    ),
    (
        "fix_snippet",
        "Fix a 'prompt tuning' snippet that fine-tunes the whole model",
        "make only the prompt train: a frozen model, an optimizer that holds one tensor, a learning rate that works",
        15,
        "03_training",
        "tune(model, idx, targets, steps) -> (optimizer, losses)",
    ),
    (
        "training_loop",
        "A ten-line training loop for the prompt",
        "write warmup, clipping and AdamW in the right order, step for step as a reference",
        20,
        "03_training",
        "train(pt, get_batch, steps, lr, warmup, max_norm) -> losses",
    ),
    (
        "vocab_init",
        "Sampled-vocabulary initialisation",
        "initialise a prompt from distinct frequent tokens, reproducibly (Lester et al., sections 2.1 and 3.2)",
        15,
        "03_training",
        "vocab_init(wte (V, D), n_p, token_counts (V,), top_k, generator) -> P (n_p, D)",
    ),
    (
        "label_init",
        "Class-label initialisation",
        "initialise prompt rows from the mean embedding of each class label's tokens",
        10,
        "03_training",
        "label_init(wte (V, D), label_ids: list of K lists of ids) -> (K, D)",
    ),
    (
        "ensemble_vote",
        "Prompt ensembling by majority vote",
        "combine K prompts' predictions by vote, with a tie-break that is only a tie-break (section 6)",
        20,
        "03_training",
        "ensemble_vote(probs (K, N, C)) -> (N,) int64",
    ),
    (
        "capstone",
        "Capstone: your pieces tune a frozen GPT",
        "plug your concat, its backward, your init and your loop into PromptTuning and reach 90% on parity",
        30,
        "04_capstone",
        "{'concat': fn, 'concat_backward': fn, 'vocab_init': fn, 'train': fn}",
    ),
    (
        "head_ce_kernel",
        "The fused frozen-head cross-entropy, in Triton",
        "compute a row's loss and dL/dh chunk by chunk over the vocabulary with a running max, never the (N, V) "
        "logits, and skip the rows without a target",
        40,
        "05_kernel_track",
        "@triton.jit head_ce_kernel(H, W, Y, LOSS, DH, V, D, n_sup, BLOCK_V, BLOCK_D), grid (N,)",
    ),
    (
        "decode_attention_kernel",
        "A decode step's attention over the cached prompt prefix",
        "read a row's key/value cache (the prompt's, computed once, then its own tokens) chunk by chunk with an "
        "online softmax, masked at the row's length",
        35,
        "05_kernel_track",
        "@triton.jit decode_attention_kernel(Q, K, V, O, LENS, T, hd, scale, BLOCK_T, BLOCK_HD), grid (R,)",
    ),
    (
        "predict_measure",
        "Predict, measure, explain: step time and optimizer memory",
        "predict from shapes alone whether a prompt-tuning step is faster than fine-tuning at 10 and 108 tokens, and "
        "how many bytes AdamW keeps for a prompt",
        15,
        "06_predict_measure",
        "predict() -> {'step_ratio_10': x, 'step_ratio_108': y, 'adamw_state_bytes': z}",
    ),
)

_CHECKERS: dict[str, Callable] = {
    **equations.CHECKERS,
    **kernel.CHECKERS,
    **training.CHECKERS,
    **kernel_track.CHECKERS,
    **predict.CHECKERS,
    # the capstone runs its pieces' checkers through `evaluate` (defined below)
    "capstone": lambda answer: capstone.check_capstone(answer, evaluate),
}
assert set(_CHECKERS) == set(EXERCISES)

_RESULTS: dict[str, CheckResult] = {}


def check(exercise_id: str, answer) -> CheckResult:
    """Check a student's `answer` for `exercise_id`; never raises on a wrong answer (see the module docstring)."""
    result = evaluate(exercise_id, answer)
    _RESULTS[exercise_id] = result
    _record(result)
    return result


def evaluate(exercise_id: str, answer) -> CheckResult:
    """The result `check` returns, without keeping it as the exercise's result (the capstone checks its pieces)."""
    if exercise_id not in EXERCISES:
        raise ValueError(f"unknown exercise {exercise_id!r}; the exercises are {', '.join(EXERCISES)}")
    try:
        result = _CHECKERS[exercise_id](answer)
    except Exception as err:  # noqa: BLE001 - an answer odd enough to trip the checker is still only a result
        result = CheckResult(
            exercise_id,
            False,
            f"the checker could not evaluate this answer "
            f"({type(err).__name__}: {err}); check its signature: "
            f"{EXERCISES[exercise_id].signature}",
        )
    if not result.passed and "NotImplementedError" in result.message:  # the placeholder is still there
        result = CheckResult(exercise_id, False, NOT_STARTED, result.tried)
    return result


def _record(result: CheckResult) -> None:
    """Append the result to the grader's results file (see grade.py) when a notebook is being graded."""
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(result.to_dict()) + "\n")


def results() -> dict[str, CheckResult]:
    """The last result of each exercise checked in this process, in the order they were checked."""
    return dict(_RESULTS)


def summary(notebook: str) -> str:
    """One line per exercise of `notebook` ("01_math", ...): passed, not yet, or not checked yet."""
    lines, done = [], 0
    for ex in EXERCISES.values():
        if ex.notebook == notebook:
            result = _RESULTS.get(ex.id)
            status = "not checked yet" if result is None else "passed" if result.passed else "not yet"
            done += status == "passed"
            lines.append(f"{ex.id:<22} {ex.minutes:>3} min   {status}")
    return "\n".join(lines + [f"{done} of {len(lines)} passed"])
