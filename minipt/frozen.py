"""Freezing a model: what "frozen" means in minipt, and the helpers that prove it.

A frozen parameter has requires_grad=False, so autograd never computes or stores a gradient for it, and the
optimizer is never handed it. Tests check the three promises of prompt tuning after training: every base
tensor is bit-identical to before, its .grad is None, and the optimizer holds only the prompt.
"""
from __future__ import annotations

import torch
import torch.nn as nn


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
