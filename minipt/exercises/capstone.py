"""The capstone (notebook `04_capstone`): the student's own pieces tune the shipped frozen `tiny` GPT on parity.

The pieces are four earlier exercises, handed over as a dict:

    concat(prompt, wte, idx, wpe) -> x              exercise 1, equation (1)
    concat_backward(dx, n_p) -> dP                  exercise 2, equation (2)
    vocab_init(wte, n_p, token_counts, top_k, generator) -> P     exercise 10 (Lester et al., sections 2.1, 3.2)
    train(pt, get_batch, steps, lr, warmup, max_norm) -> losses   exercise 9

Each piece is first checked by its own exercise's checker, so a broken piece is named. Then they are plugged
together: `StudentConcat` is an autograd.Function whose forward is the student's concat and whose backward is
the student's concat_backward (nothing flows to the frozen wte and wpe), handed to `PromptTuning(...,
concat=...)`; the prompt starts from the student's vocab_init and trains with the student's loop. It passes
when the tuned prompt reaches PASS_MARK test exact match on parity's 500 test examples, and the student's
forward and backward were the ones used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minipt import ByteTokenizer, PromptTuning
from minipt.assets import load_base
from minipt.data import batch_fn, exact_match_accuracy, token_frequencies
from minipt.loss import mask_padding
from minipt.tasks import make_split, pretraining_mixture

from .result import NOT_STARTED, CheckResult, call_answer, failed, passed
from .training import one_thread

__all__ = ["PASS_MARK", "PIECES", "PIECE_EXERCISE", "RUN", "check_capstone", "student_concat"]

PIECES = ("concat", "concat_backward", "vocab_init", "train")
PIECE_EXERCISE = {
    "concat": "concat",
    "concat_backward": "concat_backward",
    "vocab_init": "vocab_init",
    "train": "training_loop",
}
PASS_MARK = 0.90  # test exact match on parity
RUN = dict(n_prompt=20, top_k=50, steps=100, lr=0.1, warmup=10, max_norm=1.0, batch_size=32, seed=0)


def student_concat(concat, concat_backward, calls: dict):
    """x = concat(P, wte, idx, wpe) forward, dP = concat_backward(dx, n_p) backward: the student's equations (1)
    and (2) as one differentiable operation. `calls` counts how often each ran."""

    class StudentConcat(torch.autograd.Function):
        @staticmethod
        def forward(ctx, prompt, wte, idx, wpe):
            ctx.n_p = prompt.shape[0]
            calls["forward"] += 1
            return concat(prompt.detach(), wte.detach(), idx, wpe.detach())  # (B, n_p + n, D)

        @staticmethod
        def backward(ctx, dx):
            calls["backward"] += 1
            return concat_backward(dx.contiguous(), ctx.n_p), None, None, None  # dP (n_p, D); wte, wpe frozen

    return lambda prompt, wte, idx, wpe: StudentConcat.apply(prompt, wte, idx, wpe)


def check_capstone(answer, evaluate: Callable[[str, object], CheckResult]) -> CheckResult:
    """answer: a dict of the four pieces (see the module docstring). evaluate(exercise_id, answer) runs a piece's own
    checker without recording its result; it is passed in by `minipt.exercises` so that this module does not import
    its package back."""

    exercise = "capstone"
    tried = [
        f"the shipped tiny GPT, frozen; parity without its instruction; {RUN['n_prompt']} prompt rows from "
        f"vocab_init(top_k={RUN['top_k']}); train(steps={RUN['steps']}, lr={RUN['lr']}, warmup={RUN['warmup']}, "
        f"max_norm={RUN['max_norm']}), batches of {RUN['batch_size']}; test exact match on 500 examples"
    ]
    if not isinstance(answer, dict) or set(answer) != set(PIECES):
        got = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
        return failed(exercise, f"hand over a dict of the four pieces {list(PIECES)}, got {got}", tried)
    for piece in PIECES:
        result = evaluate(PIECE_EXERCISE[piece], answer[piece])
        if result.message == NOT_STARTED:
            return failed(exercise, NOT_STARTED, tried)
        if not result.passed:
            return failed(
                exercise,
                f"the piece `{piece}` does not pass its own exercise ({PIECE_EXERCISE[piece]}): {result.message}",
                tried,
            )
    tok = ByteTokenizer()
    model = load_base()
    train_ex, test_ex = make_split("parity", "train", 2000, seed=0), make_split("parity", "test", 500, seed=0)
    counts = token_frequencies(pretraining_mixture(5000, seed=0), tok)
    wte = model.transformer.wte.weight.detach()
    P0, error = call_answer(
        answer["vocab_init"],
        (wte.clone(), RUN["n_prompt"], counts, RUN["top_k"], torch.Generator().manual_seed(RUN["seed"])),
    )
    if error:
        return failed(exercise, f"vocab_init {error}.", tried)
    calls = {"forward": 0, "backward": 0}
    pt = PromptTuning(model, prompt=P0, concat=student_concat(answer["concat"], answer["concat_backward"], calls))
    batches = batch_fn(train_ex, tok, RUN["batch_size"], seed=RUN["seed"])

    def get_batch(step):  # (idx, targets): the padding's targets set to -100, as the loop exercise expects
        idx, targets, mask = batches(step)
        return idx, mask_padding(targets, mask)

    with one_thread():
        losses, error = call_answer(
            answer["train"], (pt, get_batch, RUN["steps"], RUN["lr"], RUN["warmup"], RUN["max_norm"])
        )
        if error:
            return failed(exercise, f"train {error}.", tried)
        accuracy = exact_match_accuracy(pt, test_ex, tok)
    if calls["forward"] < RUN["steps"] or calls["backward"] < RUN["steps"]:
        return failed(
            exercise,
            f"your concat ran {calls['forward']} times and its backward {calls['backward']} "
            f"times in {RUN['steps']} steps: the model did not read the prompt through them",
            tried,
        )
    summary = (
        f"test exact match {accuracy:.1%} on parity (loss {losses[0]:.3f} -> {losses[-1]:.3f}), with your "
        f"concat, its backward, your init and your loop"
    )
    if accuracy >= PASS_MARK:
        return passed(exercise, f"{summary}: at least {PASS_MARK:.0%}.", tried)
    return failed(
        exercise,
        f"{summary}: below the {PASS_MARK:.0%} a correct set of pieces reaches. Every piece "
        f"passes its own check, so look at how they fit together.",
        tried,
    )
