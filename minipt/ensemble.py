"""Prompt ensembling: K soft prompts for one task, one frozen model, one batch, a majority vote.

Lester et al. 2021, section 6: because the model is frozen, K prompts for the same task are K rows of a prompt
bank, and one forward pass over a batch that repeats each input K times (row k*B + b is example b under
prompt k, chosen by `prompt_index`) serves all of them. No copy of the model is made.

    x[k*B + b] = [P_k, wte[idx[b]]] + wpe        a PromptTuning bank (K, n_p, D) and prompt_index (K*B,)
    votes[k, b, t] = argmax_v logits[k, b, t, v]
    ensemble[b, t] = the token most prompts vote for (ties: the larger mean probability over the K prompts)

The vote is taken token by token under teacher forcing. By the argument in `minipt.data`, an example is right
under this rule exactly when greedy decoding with the voted next token (the ensemble decoding the answer
itself) reproduces the answer, so ensemble and single prompts are scored by the same exact match.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data import answers_right, collate
from .model import GPT
from .prompt import PromptTuning
from .tasks import Example

__all__ = ["bank_logits", "check_bank", "ensemble_accuracy", "majority_vote"]


@torch.no_grad()
def bank_logits(model: GPT, prompts: torch.Tensor, idx: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Logits (K, B, n, V) of every input in idx (B, n) under every prompt of the bank (K, n_p, D), in one pass."""
    check_bank(model, prompts)
    bank = PromptTuning.from_tensor(model, prompts, backend=backend)
    K, B, n = prompts.shape[0], *idx.shape
    idx_rep = idx.repeat(K, 1)  # (K*B, n): row k*B + b is example b
    prompt_index = torch.arange(K, device=idx.device).repeat_interleave(B)  # (K*B,): row k*B + b uses prompt k
    logits, _ = bank(idx_rep, prompt_index=prompt_index)  # (K*B, n, V)
    return logits.view(K, B, n, -1)  # (K, B, n, V)


def check_bank(model: GPT, prompts) -> None:
    """prompts: a float tensor (K, n_prompt, n_embd) of finite numbers, K >= 1; an error naming it otherwise."""
    D = model.config.n_embd
    if not isinstance(prompts, torch.Tensor) or not prompts.is_floating_point():
        got = prompts.dtype if isinstance(prompts, torch.Tensor) else type(prompts).__name__
        raise TypeError(f"prompts must be a floating-point tensor (K, n_prompt, n_embd={D}), got {got}")
    if prompts.dim() != 3 or prompts.shape[0] == 0 or prompts.shape[1] == 0 or prompts.shape[2] != D:
        raise ValueError(
            f"prompts must have shape (K, n_prompt, n_embd={D}) with K, n_prompt >= 1, got {tuple(prompts.shape)}"
        )
    if not bool(torch.isfinite(prompts).all()):
        raise ValueError("prompts hold NaN or inf")


def majority_vote(logits: torch.Tensor) -> torch.Tensor:
    """The most-voted token (B, n) from logits (K, B, n, V); ties go to the larger mean probability."""
    V = logits.shape[-1]
    votes = logits.argmax(dim=-1)  # (K, B, n)
    counts = F.one_hot(votes, V).sum(dim=0).float()  # (B, n, V): how many prompts chose each token
    # The tie-breaker is at most 0.5, less than one vote, so it only decides between equal counts.
    mean_prob = logits.float().softmax(dim=-1).mean(dim=0)  # (B, n, V)
    return (counts + 0.5 * mean_prob).argmax(dim=-1)  # (B, n)


@torch.no_grad()
def ensemble_accuracy(
    model: GPT, prompts: torch.Tensor, examples: Sequence[Example], tokenizer, batch_size: int = 128
) -> dict:
    """Exact match of each prompt of the bank alone and of their majority vote, on the same examples.

    Returns {"single": [acc of prompt k for k in range(K)], "ensemble": acc}.
    """
    if len(examples) == 0:
        raise ValueError("examples is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_bank(model, prompts)
    was_training = model.training
    model.eval()
    K = prompts.shape[0]
    single = torch.zeros(K, dtype=torch.float64)  # counts; float64 so the fractions print exactly
    ensemble = 0
    for i in range(0, len(examples), batch_size):
        idx, targets, _ = collate(examples[i : i + batch_size], tokenizer, instruction=False)  # (B, n) each
        logits = bank_logits(model, prompts, idx)  # (K, B, n, V)
        single += answers_right(logits.argmax(dim=-1), targets).sum(dim=1)  # (K,): right answers of each prompt
        ensemble += int(answers_right(majority_vote(logits), targets).sum())
    model.train(was_training)
    return {"single": (single / len(examples)).tolist(), "ensemble": ensemble / len(examples)}
