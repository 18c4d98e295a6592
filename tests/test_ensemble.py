"""Tests for minipt.ensemble: one batched pass through the prompt bank equals K separate prompts, the vote
rule, and ensemble exact match against a by-hand count."""

import pytest
import torch

from helpers import random_gpt
from minipt import ByteTokenizer, PromptTuning
from minipt.ensemble import bank_logits, ensemble_accuracy, majority_vote
from minipt.tasks import make_split

CFG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=260, block_size=64)
tok = ByteTokenizer()


def prompts_for(model, K=3, n_prompt=4):
    return [
        PromptTuning(model, n_prompt=n_prompt, init="uniform", seed=k, backend="reference").eval() for k in range(K)
    ]


def test_one_pass_through_the_bank_equals_each_prompt_alone():
    model = random_gpt(CFG, std=0.3).eval()
    pts = prompts_for(model)
    bank = torch.stack([pt.prompt.detach() for pt in pts])  # (K, n_p, D)
    idx = torch.randint(256, (5, 7), generator=torch.Generator().manual_seed(0))
    logits = bank_logits(model, bank, idx)  # (K, B, n, V)
    assert logits.shape == (3, 5, 7, 260)
    for k, pt in enumerate(pts):
        torch.testing.assert_close(logits[k], pt(idx)[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prompts must have shape"):
        bank_logits(model, bank[0], idx)


def test_majority_vote_counts_votes_and_breaks_ties_by_mean_probability():
    V = 4
    logits = torch.full((3, 1, 2, V), -10.0)  # K=3 prompts, B=1, n=2 positions
    # position 0: votes for tokens 2, 2, 1 -> 2 wins although prompt 2 is very sure of 1
    logits[0, 0, 0, 2] = 1.0
    logits[1, 0, 0, 2] = 1.0
    logits[2, 0, 0, 1] = 50.0
    # position 1: votes 0, 3 and 3 -> 3; then a two-prompt tie 0 vs 3 goes to the more probable one
    logits[0, 0, 1, 0] = 5.0
    logits[1, 0, 1, 3] = 1.0
    logits[2, 0, 1, 3] = 1.0
    assert majority_vote(logits).tolist() == [[2, 3]]
    assert majority_vote(logits[:2]).tolist() == [[2, 0]]  # tie at position 1: prompt 0 is surer of 0


def test_ensemble_accuracy_matches_a_by_hand_count():
    model = random_gpt(CFG, std=0.3).eval()
    pts = prompts_for(model, K=3)
    bank = torch.stack([pt.prompt.detach() for pt in pts])
    examples = make_split("parity", "test", 40)
    got = ensemble_accuracy(model, bank, examples, tok, batch_size=16)  # several batches
    from minipt.data import collate, exact_match_accuracy

    for k, pt in enumerate(pts):
        assert got["single"][k] == pytest.approx(exact_match_accuracy(pt, examples, tok))
    idx, targets, _ = collate(examples, tok, instruction=False)
    voted = majority_vote(torch.stack([pt(idx)[0] for pt in pts]))
    by_hand = ((voted == targets) | (targets == -100)).all(dim=1).float().mean().item()
    assert got["ensemble"] == pytest.approx(by_hand)
    same = ensemble_accuracy(model, bank[[0, 0, 0]], examples, tok)  # three copies vote like one prompt
    assert same["ensemble"] == pytest.approx(got["single"][0])
