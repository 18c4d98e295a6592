"""From examples to tensors and back to a score: encoding, batches, and exact-match accuracy.

An example is written as ``[instruction + " "] + input + <|sep|> + answer + <|eos|>``; `collate` turns a list of
examples into right-padded (idx, targets, attention_mask) tensors, `batch_fn` makes the training batches, and
`exact_match_accuracy` scores a model.

Exact match by teacher forcing. Greedy decoding reproduces the answer (and then stops at <eos>) exactly when,
at every answer position, the most likely next token given the *correct* prefix is the correct token: by
induction, the greedy prefix then stays equal to the correct one. So one forward pass over the answer with
argmax at the supervised positions gives the same verdict as decoding token by token, at the cost of a single
batched forward (tests check the equivalence against `generate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .loss import IGNORE_INDEX
from .tasks import Example, get_task
from .tokenizer import ByteTokenizer

__all__ = [
    "query_ids",
    "encode_example",
    "collate",
    "token_frequencies",
    "batch_fn",
    "answers_right",
    "exact_match_accuracy",
]


def query_ids(example: Example, tokenizer: ByteTokenizer, instruction: bool) -> list[int]:
    """The ids a model sees before it must answer: ``[instruction + " "] + input + <|sep|>``.

    Feed these to ``generate`` and read the answer up to <|eos|>.
    """
    prefix = (get_task(example.task).instruction + " " if instruction else "") + example.input
    return tokenizer.encode(prefix) + [tokenizer.sep_id]


def encode_example(example: Example, tokenizer: ByteTokenizer, instruction: bool) -> tuple[list[int], list[int]]:
    """``(idx, targets)`` for next-token training, both of length len(full) - 1.

        full    = query_ids(example) + answer_ids + [eos]     (query_ids ends with <|sep|>)
        idx     = full[:-1]
        targets[t] = full[t + 1]  if full[t + 1] is an answer token or the <|eos|>, else -100

    So the <|sep|> position predicts the first answer byte and the last answer byte predicts <|eos|>;
    the instruction and the input are context only.
    """
    prompt = query_ids(example, tokenizer, instruction)
    full = prompt + tokenizer.encode(example.answer) + [tokenizer.eos_id]
    idx = full[:-1]
    # position t predicts full[t + 1]; the answer starts at full[len(prompt)], so it is predicted from
    # t = len(prompt) - 1, the <|sep|> position: the len(prompt) - 1 positions before it get -100
    targets = [IGNORE_INDEX] * (len(prompt) - 1) + full[len(prompt) :]
    assert len(idx) == len(targets)
    return idx, targets


def collate(
    examples: Sequence[Example], tokenizer: ByteTokenizer, instruction: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode and right-pad a batch: ``(idx, targets, attention_mask)``, int64 tensors of shape (B, T).

    Padding is ``pad_id`` in ``idx``, -100 in ``targets`` (never supervised) and 0 in ``attention_mask``.
    """
    if len(examples) == 0:
        raise ValueError("examples is empty: collate needs at least one example")
    encoded = [encode_example(ex, tokenizer, instruction) for ex in examples]
    B, T = len(encoded), max(len(idx) for idx, _ in encoded)
    idx = torch.full((B, T), tokenizer.pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, (ids, tgt) in enumerate(encoded):
        idx[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        targets[b, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
        mask[b, : len(ids)] = 1
    return idx, targets, mask


def token_frequencies(examples: Sequence[Example], tokenizer: ByteTokenizer, instruction: bool = False) -> torch.Tensor:
    """How often each token id occurs in the encoded examples: int64 tensor of shape (vocab_size,).

    Counts the full sequences (prompt, answer and <|eos|>). Used for the "sampled vocabulary" prompt
    init of Lester et al. (2021), which starts the soft prompt from embeddings of the most frequent tokens.
    """
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long)  # (V,)
    for ex in examples:
        idx, targets = encode_example(ex, tokenizer, instruction)
        full = torch.tensor(idx + [targets[-1]], dtype=torch.long)  # targets[-1] is always the <|eos|>
        counts += torch.bincount(full, minlength=tokenizer.vocab_size)
    return counts


def batch_fn(
    examples: Sequence[Example], tokenizer, batch_size: int, seed: int = 0, instruction: bool = False, device="cpu"
) -> Callable[[int], tuple]:
    """get_batch(step) -> (idx, targets, attention_mask): the same batch for the same step, always.

    Each step draws its examples with a generator seeded by (seed, step), so a resumed run sees exactly the
    batches an uninterrupted run would have seen.
    """
    if len(examples) == 0:
        raise ValueError("examples is empty")

    def get_batch(step: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        picks = torch.randint(len(examples), (batch_size,), generator=g).tolist()
        idx, targets, mask = collate([examples[i] for i in picks], tokenizer, instruction=instruction)
        return idx.to(device), targets.to(device), mask.to(device)

    return get_batch


def answers_right(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Which rows are exactly right: predicted (..., B, T) token ids equal targets (B, T) at every supervised
    position. Returns (..., B) booleans; leading dimensions (e.g. K prompts) broadcast."""
    return ((predicted == targets) | (targets == IGNORE_INDEX)).all(dim=-1)


@torch.no_grad()
def exact_match_accuracy(
    module, examples: Sequence[Example], tokenizer, instruction: bool = False, batch_size: int = 256, device="cpu"
) -> float:
    """Fraction of examples whose greedy answer (up to <eos>) is exactly right; see the module docstring."""
    if len(examples) == 0:
        raise ValueError("examples is empty")
    was_training = module.training
    module.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        idx, targets, _ = collate(examples[i : i + batch_size], tokenizer, instruction=instruction)
        idx, targets = idx.to(device), targets.to(device)
        logits, _ = module(idx)  # (B, T, V)
        correct += int(answers_right(logits.argmax(dim=-1), targets).sum())
    module.train(was_training)
    return correct / len(examples)
