"""Tests that each kill planted bugs that mutation testing (`make mutate MODULE=minipt/distributed.py`) found in
minipt/distributed.py: tests/test_distributed.py checks the module through torchrun subprocesses, which mutation
testing cannot see, so these call it in-process, with torch.distributed's calls replaced by recorders (one rank
alone: a sum over ranks is the tensor itself). Tiny CPU tensors: the whole file runs in about a second."""

import functools
import re

import pytest
import torch

import minipt.distributed as D
from minipt.distributed import DataParallelPrompt, DistInfo, init_from_env, leave_group, shard_rows


@pytest.fixture
def calls(monkeypatch):
    """torch.distributed's calls, recorded; all_reduce of one rank leaves the tensor as it is."""
    seen = []
    monkeypatch.setattr(D.dist, "all_reduce", lambda t: seen.append(("all_reduce", t.clone())))
    monkeypatch.setattr(D.dist, "barrier", lambda: seen.append(("barrier",)))
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda: seen.append(("destroy",)))
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda backend: seen.append(("init", backend)))
    return seen


def test_dist_info_defaults_to_one_process_on_the_cpu():
    assert DistInfo() == DistInfo(rank=0, world_size=1, device="cpu") and DistInfo().is_main
    assert not DistInfo(rank=1, world_size=2).is_main


@pytest.mark.parametrize("world", [None, "1"])
def test_one_process_joins_no_group(monkeypatch, calls, world):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    assert init_from_env() == DistInfo() and calls == []


@pytest.mark.parametrize("cuda", [False, True])
def test_torchruns_variables_give_the_rank_the_world_and_the_device(monkeypatch, calls, cuda):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(D.torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    info = init_from_env()
    assert info == DistInfo(rank=3, world_size=4, device="cuda:1" if cuda else "cpu")
    assert calls == ([("set_device", 1), ("init", "nccl")] if cuda else [("init", "gloo")])


def test_local_rank_defaults_to_zero_and_a_joined_group_is_not_joined_again(monkeypatch, calls):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(D.torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    assert init_from_env() == DistInfo(rank=1, world_size=2, device="cuda:0")
    assert calls == [("set_device", 0)]


def test_leave_group_waits_for_every_rank_then_leaves_and_one_process_does_nothing(calls):
    leave_group(DistInfo())
    assert calls == []
    leave_group(DistInfo(rank=1, world_size=2))
    assert calls == [("barrier",), ("destroy",)]


def test_an_indivisible_batch_is_refused_by_name():
    with pytest.raises(
        ValueError, match=f"^{re.escape('batch size 6 must be divisible by the number of processes 4')}$"
    ):
        shard_rows(6, 0, 4)


class Tiny(torch.nn.Module):
    """A 'tuned module': one trainable tensor w and one frozen; loss = mean over supervised tokens of (w * x)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0))
        self.frozen = torch.nn.Parameter(torch.tensor(1.0), requires_grad=False)

    def loss(self, idx, targets, attention_mask=None):
        keep = targets != -100
        if attention_mask is not None:
            keep = keep & (attention_mask != 0)
        return (self.w * idx.float() * keep).sum() / keep.sum()


IDX = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_takes_its_rows_weighted_by_its_share_of_the_supervised_tokens(calls, rank):
    targets = IDX.clone()
    targets[0, 0] = -100  # rank 0's rows hold 3 supervised tokens, rank 1's 4: N = 7
    pt = Tiny()
    module = DataParallelPrompt(pt, rank, 2)
    loss = module.loss(IDX, targets)
    own = (2 + 3 + 4) / 3 if rank == 0 else (5 + 6 + 7 + 8) / 4  # d loss_r / d w
    share = (3 if rank == 0 else 4) / 7
    loss.backward()
    torch.testing.assert_close(pt.w.grad, torch.tensor(share * own))
    torch.testing.assert_close(loss.detach(), torch.tensor(2 * share * own))  # one rank: the sum is its own part
    reduced = [c for c in calls if c[0] == "all_reduce"]
    assert len(reduced) == 2  # the loss, then the gradient of the one trainable tensor (the frozen one: none)
    torch.testing.assert_close(reduced[1][1], torch.tensor(share * own))
    module.close()
    pt.w.grad = None
    module.loss(IDX, targets).backward()
    assert len([c for c in calls if c[0] == "all_reduce"]) == 3  # closed: the gradient is no longer reduced


def test_the_loss_is_the_sum_over_ranks_and_its_gradient_this_ranks_share(monkeypatch, calls):
    other = 1.5  # what the other rank's part adds to the loss in the all_reduce

    def all_reduce(t):  # the first call sums the loss over ranks; the gradient's is left alone here
        reduced.append(t)
        if len(reduced) == 1:
            t.add_(other)

    reduced = []
    monkeypatch.setattr(D.dist, "all_reduce", all_reduce)
    pt = Tiny()
    loss = DataParallelPrompt(pt, 0, 2).loss(IDX, IDX.clone())  # rank 0: rows 0-1, 4 of the 8 tokens
    own = (1 + 2 + 3 + 4) / 4  # d loss_0 / d w
    torch.testing.assert_close(loss.detach(), torch.tensor(2 * own / 2 + other))
    loss.backward()
    torch.testing.assert_close(pt.w.grad, torch.tensor(own / 2))  # the other rank's part takes no gradient here


def test_the_mask_chooses_the_supervised_tokens_of_each_shard(calls):
    mask = torch.ones_like(IDX)
    mask[3, 1] = 0  # rank 1 keeps 3 of its 4 tokens: N = 7
    pt = Tiny()
    loss = DataParallelPrompt(pt, 1, 2).loss(IDX, IDX.clone(), mask)
    torch.testing.assert_close(loss.detach(), torch.tensor(2 * (3 / 7) * (5 + 6 + 7) / 3))


def test_sharded_accuracy_scores_its_share_and_sums_the_counts(monkeypatch, calls):
    scored = []

    def accuracy(pt, examples, tokenizer, device):
        assert (pt, tokenizer) == ("the module", "the tokenizer")  # passed on as they came
        scored.append((list(examples), device))
        return 2 / 3  # two in three right

    monkeypatch.setattr(D, "exact_match_accuracy", accuracy)
    examples = list("abcdef")
    score = functools.partial(D.sharded_accuracy, "the module", tokenizer="the tokenizer")
    assert score(examples, info=DistInfo()) == 4 / 6
    assert scored == [(examples, "cpu")] and calls == []
    assert score(examples, info=DistInfo(rank=1, world_size=2)) == 2 / 6  # one rank's count
    assert scored[1] == (["b", "d", "f"], "cpu")
    (_, count), *_ = calls
    assert count.dtype == torch.float64 and count.tolist() == [2.0]
    calls.clear()
    assert score(examples[:1], info=DistInfo(rank=1, world_size=2)) == 0.0  # nothing to score
    assert len(scored) == 2 and calls[0][1].tolist() == [0.0]
