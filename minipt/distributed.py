"""Data-parallel prompt tuning on torch.distributed (the tuning function, minipt.apps.recipes.tune_prompt, takes it).

    torchrun --nproc_per_node=2 -m minipt tune --task reverse --out runs/reverse.safetensors

gloo on CPU, NCCL on GPU (one GPU a process, cuda:LOCAL_RANK). Every rank holds the whole frozen model and the
same prompt (same seed, same init). At step s, with W ranks and a global batch of B rows:

    1. every rank builds the same global batch get_batch(s) (a pure function of s) and keeps its rows
       [r B/W, (r+1) B/W)                                                 (B must be divisible by W)
    2. loss_r = mean cross-entropy over its N_r supervised tokens; the global loss is
       L = sum_r N_r loss_r / N   (N = supervised tokens of the whole batch, known to every rank)
       so rank r backpropagates (N_r / N) loss_r
    3. a hook on the prompt all-reduces (sums) its gradient as soon as backward has produced it:
       dL/dP = sum_r (N_r / N) dloss_r/dP on every rank, exactly the one-process gradient of the global batch
    4. every rank clips and steps the same optimizer on the same gradient, so the prompts stay identical
       without ever being broadcast.

Why a hook and not `DistributedDataParallel(pt)`: DDP would also sync only the parameters that require grad
(here the prompt alone), but it brings bucketing and compute/communication overlap that buy nothing for one
(n_prompt, D) tensor, and it broadcasts every parameter of the module from rank 0 when it is built (the
frozen GPT-2 included) although every rank loaded the same file. One all_reduce on one tensor, in plain
sight, is the whole of data parallelism here. Weighting by N_r / N (step 2) rather than averaging the ranks'
means keeps the result equal to one process when the ranks' shards hold different numbers of answer tokens.

Only rank 0 writes files and prints. Validation is sharded too: each rank scores val[r::W], the counts are
summed, so keep-best decides the same on every rank. Training-state checkpoints (--checkpoint/--resume)
work the same way: rank 0 writes the file, every rank reads it on resume (the state is the same on all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .data import exact_match_accuracy
from .loss import mask_padding

__all__ = ["DistInfo", "init_from_env", "leave_group", "shard_rows", "DataParallelPrompt", "sharded_accuracy"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); one process: no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, device=device)


def leave_group(info: DistInfo) -> None:
    """The end of init_from_env's group: wait for every rank (rank 0 may still be writing files), then leave it."""
    if info.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def shard_rows(B: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch of B that rank `rank` of `world_size` takes."""
    if B % world_size != 0:
        raise ValueError(f"batch size {B} must be divisible by the number of processes {world_size}")
    per = B // world_size
    return slice(rank * per, (rank + 1) * per)


class DataParallelPrompt(nn.Module):
    """pt on this rank's shard of a global batch; the prompt's gradient is summed over ranks (steps 1-3 above).

    pt is any tuned module with a `loss` (PromptTuning, or PrefixTuning): every tensor of it that trains (the
    prompt; a prefix; an encoder's weights) gets the all-reduce hook.

    loss(idx, targets, mask) takes the *global* batch and returns a loss with the value of the global loss (the
    same on every rank) and the gradient of this rank's share (N_r / N) loss_r.
    Call close() to remove the all-reduce hooks.
    """

    def __init__(self, pt: nn.Module, rank: int, world_size: int):
        super().__init__()
        self.pt, self.rank, self.world_size = pt, rank, world_size
        # after backward has accumulated dL_r/dP into p.grad: sum it over ranks, in place
        self._hooks = [
            p.register_post_accumulate_grad_hook(lambda p: dist.all_reduce(p.grad))
            for p in pt.parameters()
            if p.requires_grad
        ]

    def loss(self, idx, targets, attention_mask=None):
        supervised = mask_padding(targets, attention_mask) != -100  # (B, T)
        rows = shard_rows(idx.shape[0], self.rank, self.world_size)
        n_total, n_local = supervised.sum(), supervised[rows].sum()
        mask = None if attention_mask is None else attention_mask[rows]
        loss = self.pt.loss(idx[rows], targets[rows], mask)  # mean over this shard's n_local tokens
        part = loss * (n_local / n_total)  # this rank's share of the global mean
        total = part.detach().clone()
        dist.all_reduce(total)  # the global loss, for logging and the NaN check on every rank
        return part + (total - part.detach())  # value: global loss; gradient: this rank's share

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def sharded_accuracy(pt, examples, tokenizer, info: DistInfo) -> float:
    """Exact match over `examples`, each rank scoring examples[rank::world_size]; the same number everywhere."""
    mine = examples[info.rank :: info.world_size]
    correct = exact_match_accuracy(pt, mine, tokenizer, device=info.device) * len(mine) if mine else 0.0
    count = torch.tensor([round(correct)], dtype=torch.float64, device=info.device)
    if info.world_size > 1:
        dist.all_reduce(count)
    return count.item() / len(examples)
