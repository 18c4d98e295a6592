"""Batches for training and exact-match accuracy for evaluation, on the built-in task suite.

Exact match by teacher forcing. Greedy decoding reproduces the answer (and then stops at <eos>) exactly when,
at every answer position, the most likely next token given the *correct* prefix is the correct token: by
induction, the greedy prefix then stays equal to the correct one. So one forward pass over the answer with
argmax at the supervised positions gives the same verdict as decoding token by token, at the cost of a single
batched forward (tests check the equivalence against `generate`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .tasks import IGNORE_INDEX, Example, collate


def batch_fn(examples: Sequence[Example], tokenizer, batch_size: int, seed: int = 0, instruction: bool = False,
             device="cpu") -> Callable[[int], tuple]:
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
def exact_match_accuracy(module, examples: Sequence[Example], tokenizer, instruction: bool = False,
                         batch_size: int = 256, device="cpu") -> float:
    """Fraction of examples whose greedy answer (up to <eos>) is exactly right; see the module docstring."""
    if len(examples) == 0:
        raise ValueError("examples is empty")
    was_training = module.training
    module.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        idx, targets, _ = collate(examples[i: i + batch_size], tokenizer, instruction=instruction)
        idx, targets = idx.to(device), targets.to(device)
        logits, _ = module(idx)  # (B, T, V)
        correct += int(answers_right(logits.argmax(dim=-1), targets).sum())
    module.train(was_training)
    return correct / len(examples)
