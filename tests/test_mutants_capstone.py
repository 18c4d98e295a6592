"""Tests that each kill planted bugs that mutation testing (`make mutate MODULE=minipt/exercises/capstone.py`) found
in the capstone's checker: the whole result of every path, what each piece is handed, and the pass mark's edge.

The real capstone tunes the shipped model for 100 steps (tests/test_exercise_answers.py runs it); here the base is
a small random GPT, the data a few examples and the score a number the test chooses, so each test takes a second."""

import pytest
import torch

import minipt.exercises.capstone as capstone
from helpers import random_gpt
from minipt import ByteTokenizer
from minipt.data import batch_fn, token_frequencies
from minipt.exercises.result import NOT_STARTED, CheckResult, failed, passed
from minipt.loss import mask_padding
from minipt.tasks import make_split, pretraining_mixture

TRIED = (
    "the shipped tiny GPT, frozen; parity without its instruction; 20 prompt rows from vocab_init(top_k=50); "
    "train(steps=100, lr=0.1, warmup=10, max_norm=1.0), batches of 32; test exact match on 500 examples",
)
CONFIG = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=ByteTokenizer().vocab_size, block_size=128)


def refused(message: str) -> CheckResult:
    return CheckResult("capstone", False, message, TRIED)


def concat(prompt, wte, idx, wpe):
    B, n = idx.shape
    x = torch.cat([prompt.expand(B, -1, -1), wte[idx]], dim=1)  # (B, n_p + n, D)
    return x + wpe[: x.shape[1]]


def concat_backward(dx, n_p):
    return dx[:, :n_p].sum(0)  # (n_p, D)


def vocab_init(wte, n_p, counts, top_k, generator):
    return wte[torch.argsort(counts, descending=True)[:n_p]].clone()


def train(pt, get_batch, steps, lr, warmup, max_norm):
    opt = torch.optim.SGD([pt.prompt], lr=lr)
    losses = []
    for step in range(steps):
        loss = pt.loss(*get_batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def run(monkeypatch):
    """run(pieces, accuracy=0.95) -> (result, seen): the checker on a small random base, its data cut to a few
    examples and its test score the given number; `seen` records what each step was handed."""
    seen = {"evaluated": [], "splits": []}

    def evaluate(exercise, answer):
        seen["evaluated"].append((exercise, answer))
        return seen.get("verdict", {}).get(exercise, passed(exercise))

    def small_split(task, split, n, seed):
        seen["splits"].append((task, split, n, seed))
        return make_split(task, split, 8, seed=seed)

    def score(pt, examples, tok):
        seen["scored"] = (pt, examples, tok)
        return seen["accuracy"]

    monkeypatch.setattr(capstone, "load_base", lambda: random_gpt(CONFIG))
    monkeypatch.setattr(capstone, "make_split", small_split)
    monkeypatch.setattr(capstone, "exact_match_accuracy", score)

    def check(pieces, accuracy=0.95, verdict=None):
        seen["accuracy"], seen["verdict"] = accuracy, verdict or {}
        return capstone.check_capstone(pieces, evaluate), seen

    return check


def pieces(**changed):
    return {"concat": concat, "concat_backward": concat_backward, "vocab_init": vocab_init, "train": train, **changed}


def test_pieces_that_fit_pass_with_the_score_and_the_losses(run):
    result, seen = run(pieces(), accuracy=0.95)
    assert result.passed and result.exercise == "capstone" and result.tried == TRIED
    assert result.message.startswith("test exact match 95.0% on parity (loss ")
    assert result.message.endswith(" with your concat, its backward, your init and your loop: at least 90%.")
    assert seen["splits"] == [("parity", "train", 2000, 0), ("parity", "test", 500, 0)]
    pt, examples, tok = seen["scored"]
    assert isinstance(pt, capstone.PromptTuning) and len(examples) == 8 and isinstance(tok, ByteTokenizer)


def test_the_message_gives_the_first_and_the_last_loss_of_the_loop(run):
    def reporting(pt, get_batch, steps, lr, warmup, max_norm):
        train(pt, get_batch, steps, lr, warmup, max_norm)
        return [5.0, 4.0, 3.0, 2.0]

    assert run(pieces(train=reporting))[0] == CheckResult(
        "capstone",
        True,
        "test exact match 95.0% on parity (loss 5.000 -> 2.000), with your concat, its backward, your init and "
        "your loop: at least 90%.",
        TRIED,
    )


def test_the_pass_mark_itself_passes_and_just_below_it_fails(run):
    assert run(pieces(), accuracy=0.90)[0].passed
    result, _ = run(pieces(), accuracy=0.8999)
    assert (result.exercise, result.passed, result.tried) == ("capstone", False, TRIED)
    assert result.message.startswith("test exact match 90.0% on parity (loss ")
    assert result.message.endswith(
        ": below the 90% a correct set of pieces reaches. Every piece passes its own check, so look at how they "
        "fit together."
    )


@pytest.mark.parametrize(
    "answer, got", [({"concat": concat}, "['concat']"), ([concat], "list"), ({**pieces(), "extra": 1}, None)]
)
def test_anything_but_the_four_pieces_is_refused_naming_what_came(run, answer, got):
    got = got or str(sorted(answer))
    assert run(answer)[0] == refused(
        f"hand over a dict of the four pieces ['concat', 'concat_backward', 'vocab_init', 'train'], got {got}"
    )


def test_each_piece_is_checked_by_its_own_exercise_in_order(run):
    answer = pieces()
    _, seen = run(answer)
    assert seen["evaluated"] == [
        ("concat", concat),
        ("concat_backward", concat_backward),
        ("vocab_init", vocab_init),
        ("training_loop", train),
    ]


def test_a_piece_that_fails_its_exercise_is_named_with_that_exercises_message(run):
    verdict = {"training_loop": failed("training_loop", "the prompt differs at step 3")}
    assert run(pieces(), verdict=verdict)[0] == refused(
        "the piece `train` does not pass its own exercise (training_loop): the prompt differs at step 3"
    )
    assert run(pieces(), verdict={"concat": failed("concat", NOT_STARTED)})[0] == refused(NOT_STARTED)


def test_vocab_init_is_handed_the_frozen_table_the_sizes_and_a_generator_seeded_0(run):
    handed = {}

    def recording_init(wte, n_p, counts, top_k, generator):
        handed.update(wte=wte, n_p=n_p, counts=counts, top_k=top_k, draw=torch.rand(3, generator=generator))
        return vocab_init(wte, n_p, counts, top_k, generator)

    run(pieces(vocab_init=recording_init))
    assert handed["wte"].shape == (CONFIG["vocab_size"], CONFIG["n_embd"]) and not handed["wte"].requires_grad
    torch.testing.assert_close(handed["wte"], random_gpt(CONFIG).transformer.wte.weight.detach())
    assert (handed["n_p"], handed["top_k"]) == (20, 50)
    expected = token_frequencies(pretraining_mixture(5000, seed=0), ByteTokenizer())  # the mixture of sec. 3.2
    assert torch.equal(handed["counts"], expected)
    torch.testing.assert_close(handed["draw"], torch.rand(3, generator=torch.Generator().manual_seed(0)))


def test_the_loop_is_handed_the_run_and_batches_whose_padding_takes_no_loss(run):
    handed = {}

    def recording_train(pt, get_batch, steps, lr, warmup, max_norm):
        handed.update(start=pt.prompt.detach().clone(), settings=(steps, lr, warmup, max_norm), batch=get_batch(0))
        return train(pt, get_batch, steps, lr, warmup, max_norm)

    run(pieces(train=recording_train, vocab_init=lambda wte, n_p, *rest: torch.full((n_p, wte.shape[1]), 0.5)))
    assert handed["settings"] == (100, 0.1, 10, 1.0)
    idx, targets = handed["batch"]
    want_idx, want_targets, mask = batch_fn(make_split("parity", "train", 8, seed=0), ByteTokenizer(), 32, seed=0)(0)
    assert torch.equal(idx, want_idx) and torch.equal(targets, mask_padding(want_targets, mask))
    torch.testing.assert_close(handed["start"], torch.full((20, CONFIG["n_embd"]), 0.5))  # vocab_init's output


def test_an_init_or_a_loop_that_raises_is_named(run):
    def raises(*args):
        raise ValueError("bad piece")

    assert run(pieces(vocab_init=raises))[0] == refused("vocab_init raised ValueError: bad piece.")
    assert run(pieces(train=raises))[0] == refused("train raised ValueError: bad piece.")


def test_a_loop_that_skips_the_students_concat_is_refused(run):
    def one_step_short(pt, get_batch, steps, lr, warmup, max_norm):
        return train(pt, get_batch, steps - 1, lr, warmup, max_norm) * 2

    assert run(pieces(train=one_step_short))[0] == refused(
        "your concat ran 99 times and its backward 99 times in 100 steps: the model did not read the prompt "
        "through them"
    )


def test_a_loop_whose_last_forward_has_no_backward_is_refused(run):
    def no_last_backward(pt, get_batch, steps, lr, warmup, max_norm):
        losses = train(pt, get_batch, steps - 1, lr, warmup, max_norm)
        return losses + [pt.loss(*get_batch(steps - 1)).item()]

    assert run(pieces(train=no_last_backward))[0] == refused(
        "your concat ran 100 times and its backward 99 times in 100 steps: the model did not read the prompt "
        "through them"
    )


def test_the_students_concat_gets_detached_tensors_and_its_backward_a_contiguous_gradient():
    calls = {"forward": 0, "backward": 0}
    handed = {}

    def recording_concat(prompt, wte, idx, wpe):
        handed["forward"] = (prompt.requires_grad, wte.requires_grad, wpe.requires_grad)
        return concat(prompt, wte, idx, wpe)

    def recording_backward(dx, n_p):
        handed["backward"] = (dx.is_contiguous(), n_p)
        return concat_backward(dx, n_p)

    fn = capstone.student_concat(recording_concat, recording_backward, calls)
    P = torch.randn(2, 4, requires_grad=True)
    wte, wpe = torch.randn(10, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    x = fn(P, wte, torch.tensor([[1, 2, 3]]), wpe)  # (1, 5, 4)
    (x * torch.arange(20.0).reshape(1, 5, 4)).transpose(1, 2).sum().backward()
    assert handed == {"forward": (False, False, False), "backward": (True, 2)}
    assert calls == {"forward": 1, "backward": 1}
    torch.testing.assert_close(P.grad, torch.arange(8.0).reshape(2, 4))
    assert wte.grad is None and wpe.grad is None  # frozen: nothing flows to them
