"""Tests for minipt.data: batches are a pure function of the step, and exact match by teacher forcing gives
the same verdict as real greedy decoding with `generate`."""

import pytest
import torch

from minipt import GPT, ByteTokenizer, GPTConfig, PromptTuning
from minipt.data import batch_fn, exact_match_accuracy, query_ids
from minipt.tasks import Example, get_task, make_split
from minipt.train import TrainConfig, train

tok = ByteTokenizer()
TRAIN = make_split("copy", "train", 300)
INSTRUCTION = get_task("copy").instruction + " "


# --- batch_fn ----------------------------------------------------------------------------------------


def test_batch_is_a_pure_function_of_the_step():
    get_batch = batch_fn(TRAIN, tok, batch_size=8, seed=1)
    first = get_batch(5)
    torch.manual_seed(1234)  # the global RNG plays no part
    torch.randn(10)
    again = get_batch(5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    twin = batch_fn(TRAIN, tok, batch_size=8, seed=1)(5)  # another closure, same arguments: same batch
    assert all(torch.equal(a, b) for a, b in zip(first, twin))
    assert not torch.equal(get_batch(6)[0], first[0])  # another step
    assert not torch.equal(batch_fn(TRAIN, tok, batch_size=8, seed=2)(5)[0], first[0])  # another seed


def test_batch_contents():
    idx, targets, mask = batch_fn(TRAIN, tok, batch_size=8, seed=0)(0)
    B, T = idx.shape
    assert B == 8 and targets.shape == mask.shape == (B, T) and idx.dtype == torch.long
    assert bool(((mask == 0) <= (targets == -100)).all())  # padding is never supervised
    assert bool((idx[mask == 0] == tok.pad_id).all())
    assert bool((targets == tok.eos_id).sum(dim=1).eq(1).all())  # each row ends its answer with one <|eos|>
    with_instruction, _, _ = batch_fn(TRAIN, tok, batch_size=8, seed=0, instruction=True)(0)
    assert with_instruction.shape[1] == T + len(INSTRUCTION)  # same examples, instruction in front
    with pytest.raises(ValueError, match="examples is empty"):
        batch_fn([], tok, batch_size=8)


# --- exact match by teacher forcing == greedy decoding -------------------------------------------------


@pytest.fixture(scope="module")
def model():
    """A small GPT trained a little on `copy` with its instruction: it answers with letters, then <|eos|>."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=260, block_size=64))
    cfg = TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, progress=False)
    train(model, batch_fn(TRAIN, tok, cfg.batch_size, instruction=True), cfg)
    return model.eval()


def greedy_answer(module, example, instruction, max_new_tokens=12):
    """Decode greedily with `generate` until <|eos|>; None if it never stops."""
    ids = torch.tensor([query_ids(example, tok, instruction)])
    new = module.generate(ids, max_new_tokens, temperature=0)[0, ids.shape[1] :].tolist()
    if tok.eos_id not in new:
        return None
    return tok.decode(new[: new.index(tok.eos_id)], skip_special=False)  # special tokens stay visible


def mixed_examples(module, instruction, n=24):
    """Answers the module gets right (its own greedy output), wrong in the last letter only, right but for
    the stop (a prefix of its output: it goes on where <|eos|> is due), and the task's real answers, so the
    accuracy is neither 0 nor 1 and every way of being wrong is there."""
    examples = []
    for i, ex in enumerate(make_split("copy", "val", n)):
        own = greedy_answer(module, ex, instruction)
        clean = own is not None and own.isascii() and "<|" not in own and len(own) >= 2
        if i % 4 == 0 and clean:
            answer = own
        elif i % 4 == 1 and clean:
            answer = own[:-1] + ("b" if own[-1] == "a" else "a")
        elif i % 4 == 2 and clean:
            answer = own[:-1]
        else:
            answer = ex.answer
        examples.append(Example(ex.task, ex.input, answer))
    return examples


def check_teacher_forcing_equals_greedy(module, instruction):
    examples = mixed_examples(module, instruction)
    verdicts = [greedy_answer(module, ex, instruction) == ex.answer for ex in examples]
    accuracy = exact_match_accuracy(module, examples, tok, instruction=instruction)
    assert 0 < accuracy < 1, verdicts  # a mix of right and wrong answers, or the test proves nothing
    assert accuracy == sum(verdicts) / len(verdicts)
    # example by example, and in padded batches of several sizes
    for ex, right in zip(examples, verdicts):
        assert exact_match_accuracy(module, [ex], tok, instruction=instruction) == float(right), ex
    assert exact_match_accuracy(module, examples, tok, instruction=instruction, batch_size=4) == accuracy


def test_exact_match_equals_greedy_decoding_for_a_gpt_with_instruction(model):
    check_teacher_forcing_equals_greedy(model, instruction=True)


def test_exact_match_equals_greedy_decoding_for_a_prompt_without_instruction(model):
    # the instruction's text as the prompt, nudged so that it is a soft prompt and not the instruction itself
    pt = PromptTuning(
        model, n_prompt=len(INSTRUCTION), init="text", init_text=INSTRUCTION, tokenizer=tok, backend="reference"
    ).eval()
    with torch.no_grad():
        pt.prompt.add_(0.05 * torch.randn(pt.prompt.shape, generator=torch.Generator().manual_seed(0)))
    check_teacher_forcing_equals_greedy(pt, instruction=False)


def test_exact_match_accuracy_scores_in_eval_mode_and_restores_the_mode(model):
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        for start in (True, False):  # from training mode and from eval mode
            model.train(start)
            seen.clear()
            exact_match_accuracy(model, make_split("copy", "val", 4), tok, instruction=True)
            assert seen and not any(seen)  # every forward pass ran in eval mode (no dropout)
            assert model.training is start  # and the caller's mode is back
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="examples is empty"):
        exact_match_accuracy(model, [], tok)
