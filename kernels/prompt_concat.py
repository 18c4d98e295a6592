"""Build the prompt-tuning input x = [e_p, e_1 .. e_n] (Lester et al. 2021, section 2).

    x[b, t] = (P[t] if t < n_p else wte[idx[b, t - n_p]]) + wpe[t]

(Placeholder: plain PyTorch reference only; the Triton kernels come next.)
"""
from __future__ import annotations

import torch


def prompt_concat_reference(prompt, wte, idx, wpe=None, prompt_index=None):
    """Plain PyTorch version of the op: embedding, expand, cat, + wpe."""
    B, n = idx.shape
    if prompt.dim() == 3:  # a bank (K, n_p, D): one prompt per example
        p = prompt[prompt_index]  # (B, n_p, D)
    else:
        p = prompt.unsqueeze(0).expand(B, -1, -1)  # (B, n_p, D)
    tok = wte[idx]  # (B, n, D)
    x = torch.cat([p.to(wte.dtype), tok], dim=1)  # (B, n_p + n, D)
    if wpe is not None:
        x = x + wpe[: x.shape[1]]
    return x


def prompt_concat(prompt, wte, idx, wpe=None, prompt_index=None, backend="auto"):
    return prompt_concat_reference(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index)
