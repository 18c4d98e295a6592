"""Freezing a model, and what a frozen model need not store for backward.

A frozen parameter has requires_grad=False, so autograd never computes or stores a gradient for it, and the
optimizer is never handed it. Tests check the three promises of prompt tuning after training: every base
tensor is bit-identical to before, its .grad is None, and the optimizer holds only the prompt.

Freezing also changes what the forward pass keeps for backward. For y = x W^T + b the gradients are

    dx = dy W          dW = dy^T x          db = sum_rows dy                                  (1)

so with W frozen only W is needed, never x. `minipt.saved_tensors.saved_tensor_report` measures what autograd
really keeps.
Per position, in units of D numbers (D = n_embd; measured on the gpt2 preset, fp32, CPU, torch 2.13):

    kept for backward                                  every weight trainable     every weight frozen
    LayerNorm inputs (ln_1, ln_2)                              2                          2
    attention q, k, v (one c_attn output)                      3                          3
    attention output (SDPA; also the input of c_proj)          1                          1
    GELU input (the c_fc output)                               4                          4
    Linear inputs: ln_1 out, ln_2 out, GELU out                1 + 1 + 4                  0   <- (1)
    per block                                                 16                         10
    head: F.cross_entropy's (N, V) log-softmax                 V (= 65 D for gpt2)        V
    head: FrozenHeadCrossEntropy's dL/dh (N, D)                -                          1

PyTorch's autograd already applies (1): a Linear with a frozen weight does not save its input (see
`FrozenLinear`), so the blocks need no special code. The head does: F.cross_entropy keeps the (N, V)
log-softmax for backward, 65x the size of the hidden states it is computed from; `minipt.loss`'s
`FrozenHeadCrossEntropy` keeps only dL/dh (N, D). The rest (LayerNorm, attention and GELU inputs) is needed
for dL/dx itself, whether or not the weights are frozen; it can only be recomputed
(`PromptTuning(..., recompute=True)`), not dropped.

References: Lester et al. 2021 (prompt tuning, a frozen model); PyTorch docs, "Hooks for saved tensors".
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["freeze", "trainable_parameters", "snapshot", "FrozenLinear", "frozen_linear"]


# ---- freezing ---------------------------------------------------------------------------------------------


def freeze(model: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter of model (in place) and return it."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter that requires grad, tied parameters counted once."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to compare bit for bit later."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- a Linear layer with a frozen weight ------------------------------------------------------------------


class FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W (and b) frozen: saves W only, returns dx = dy W only (eq. 1 above).

    What PyTorch's own autograd saves for F.linear, measured with `saved_tensor_report` (torch 2.13, fp32,
    x (4, 256, 768) requiring grad, W (3072, 768), b (3072,)):

        F.linear, W trainable     activations 3,145,728 bytes (x itself)    parameters 9,437,184 (W^T, a view)
        F.linear, W frozen        activations 0                             parameters 9,437,184
        FrozenLinear              activations 0                             parameters 9,437,184

    The lesson: autograd saves a matmul's input only when the other operand needs a gradient, so a frozen
    Linear already keeps no activation; freezing is what takes the saving, and this class only spells the
    rule out (and guarantees it). It is why minipt's blocks use plain nn.Linear.
    """

    @staticmethod
    def forward(ctx, x, W, b=None):
        if W.requires_grad or (b is not None and b.requires_grad):
            raise ValueError(
                "FrozenLinear is for frozen weights: W and b must not require grad (use F.linear to train them)"
            )
        ctx.save_for_backward(W)  # W only: dx = dy W does not need x
        return F.linear(x, W, b)  # (..., N)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (W,) = ctx.saved_tensors
        dx = dy @ W if ctx.needs_input_grad[0] else None  # (..., N) @ (N, K) -> (..., K)
        return dx, None, None  # nothing for the frozen W and b


def frozen_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, b) for a frozen W (and b), through FrozenLinear."""
    return FrozenLinear.apply(x, W, b)
