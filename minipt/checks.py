"""Input checks at the public boundary: a clear error before any work, and one host read per batch.

`GPT.forward`, `GPT.loss`, `PromptTuning.forward` and `PromptTuning.loss` call `check_batch` once; everything
they call after it (the kernel, the body, the loss) trusts its inputs. The checks come in two kinds:

    metadata   types, dtypes, shapes and lengths: read from the tensor's header, free on any device
    values     the id range, the mask's 0/1 and right padding, the targets' range and how many are
               supervised: reduced on the device into one small tensor and read back in one transfer

Reading a value back is a host synchronisation: on a GPU the CPU waits for every queued kernel. One prompt-
tuning step (forward, backward, AdamW) therefore makes two: this read, and AdamW's step counter. The number of
supervised positions that the read returns lets the frozen head pick its rows without a second one.
"""

from __future__ import annotations

import torch

from .loss import IGNORE_INDEX, check_targets, supervised_count

__all__ = ["check_batch", "check_ids"]

ID_DTYPES = (torch.int64, torch.int32)  # what an embedding lookup takes


def check_ids(idx, name: str = "idx") -> None:
    """idx is a non-empty (B, T) tensor of integer token ids (metadata only)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype not in ID_DTYPES:  # uint8, int16 ... index no embedding table; float and bool are not ids
        raise TypeError(f"{name} must hold integer token ids (int64 or int32), got dtype {idx.dtype}")
    if idx.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (shapes only, no values); give a tensor with values")
    if idx.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(idx.shape)}")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(idx.shape)}); need at least one token per example")


def check_batch(
    idx,
    targets=None,
    attention_mask=None,
    *,
    vocab_size: int,
    block_size: int,
    n_prefix: int = 0,
    prefix_name: str = "n_prompt",
    name: str = "idx",
) -> int | None:
    """Check a batch before any work; return the number of supervised positions (None without targets).

    n_prefix positions (a soft prompt, named prefix_name in messages) come before the T tokens of each row, so
    n_prefix + T must fit in block_size. Targets are -100 or a token id; the mask holds 0 and 1, right-padded.
    """
    check_ids(idx, name)
    B, T = idx.shape
    if n_prefix + T > block_size:
        what = f"{prefix_name} ({n_prefix}) + sequence length ({T})" if n_prefix else f"sequence length {T}"
        raise ValueError(f"{what} = {n_prefix + T} exceeds block_size {block_size}")
    stats = list(torch.aminmax(idx))  # id range
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != idx.shape:
            got = (
                tuple(attention_mask.shape)
                if isinstance(attention_mask, torch.Tensor)
                else type(attention_mask).__name__
            )
            raise ValueError(f"attention_mask must have the shape of idx {tuple(idx.shape)}, got {got}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(
                f"attention_mask must hold integers or bools (1 = token, 0 = pad), got dtype {attention_mask.dtype}"
            )
        if attention_mask.device != idx.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, idx on {idx.device}; put both on one")
        m = attention_mask.to(torch.long)
        stats.append(((m != 0) & (m != 1)).sum())  # entries that are not 0 or 1
        stats.append((m[:, 1:] > m[:, :-1]).sum())  # a 1 after a 0: left or middle padding
        stats.append((m[:, 0] == 0).sum())  # right-padded, so a row without a token starts with a 0
    if targets is not None:
        check_targets(targets, idx.shape)
        keep = targets != IGNORE_INDEX
        if attention_mask is not None:
            keep = keep & (attention_mask != 0)
        kept = torch.where(keep, targets, 0)  # (B, T): the supervised targets, 0 elsewhere
        stats += [keep.sum(), kept.min(), kept.max()]
    # The one host read: every value check at once.
    values = torch.stack([s.to(torch.long) for s in stats]).tolist()
    lo, hi = values[0], values[1]
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} holds token id {lo if lo < 0 else hi}, outside [0, vocab_size={vocab_size})")
    rest = values[2:]
    if attention_mask is not None:
        not_binary, not_right_padded, empty_rows, *rest = rest
        if not_binary:
            raise ValueError("attention_mask must hold only 0 and 1")
        if not_right_padded:
            raise ValueError("attention_mask must be right-padded (ones, then zeros in every row)")
        if empty_rows:
            raise ValueError(
                f"attention_mask has {empty_rows} row(s) of zeros only: every row needs at least one token"
            )
    if targets is None:
        return None
    n_supervised, t_lo, t_hi = rest
    supervised_count(n_supervised)  # none supervised: the error
    if t_lo < 0 or t_hi >= vocab_size:
        raise ValueError(
            f"targets holds token id {t_lo if t_lo < 0 else t_hi}, outside [0, vocab_size="
            f"{vocab_size}) (use -100 where no loss is taken)"
        )
    return n_supervised
