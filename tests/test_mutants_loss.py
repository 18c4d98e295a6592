"""Tests that each kill planted bugs that mutation testing (`make mutate MODULE=minipt/loss.py`) found in
minipt/loss.py: every test here fails on a bug the rest of its suite (test_model, test_prompt, test_frozen) let
through. Small CPU tensors only; the whole file runs in a few seconds."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minipt.loss import (
    CHUNK_ELEMENTS,
    _chunk_rows,
    check_targets,
    frozen_head_cross_entropy,
    frozen_lm_loss,
    supervised_count,
)


def head_inputs(N, D=3, V=7, seed=0):
    """h (N, D), a frozen head W (V, D) and targets (N,): D and V differ from N, so every shape tells its tensor."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(V, D, generator=g), torch.randint(V, (N,), generator=g)


class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op makes: `shapes` all of them, `matmuls` those of the matmuls."""

    def __init__(self):
        super().__init__()
        self.shapes, self.matmuls = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
            if func.overloadpacket.__name__ in ("mm", "matmul"):
                self.matmuls.append(tuple(out.shape))
        return out


# ---- the checks -------------------------------------------------------------------------------------------


def test_targets_that_are_not_a_tensor_are_refused_naming_what_they_are():
    with pytest.raises(TypeError, match=r"^targets must be a torch.Tensor of token ids, got list$"):
        check_targets([[1, 2]], (1, 2))


@pytest.mark.parametrize(
    "dtype",
    [torch.bool, torch.float32, torch.complex64]  # not token ids at all
    + [torch.int32, torch.int16, torch.uint8, torch.uint16, torch.uint32, torch.uint64],  # ids, but not int64
)
def test_targets_of_any_dtype_but_int64_are_refused_before_the_loss(dtype):
    # int32 used to pass the check and fail inside cross_entropy; uint16/32/64 inside torch.aminmax, neither
    # message naming targets
    message = rf"^targets must hold int64 token ids \(torch.long, -100 where no loss is taken\), got dtype {dtype}$"
    with pytest.raises(TypeError, match=message):
        check_targets(torch.zeros(1, 2, dtype=dtype), (1, 2))


def test_no_supervised_position_is_an_error_that_says_so():
    with pytest.raises(ValueError) as error:
        supervised_count(torch.zeros(2, 3, dtype=torch.bool))
    assert str(error.value) == "targets has no supervised position (every entry is -100)"


@pytest.mark.parametrize(
    "h_shape, W_shape, targets_shape",
    [
        ((4, 3, 1), (5, 3), (4,)),  # h is not (N, D)
        ((4, 3), (5, 3, 1), (4,)),  # W is not (V, D)
        ((4, 3), (5, 2), (4,)),  # h and W disagree on D
        ((4, 3), (5, 3), (3,)),  # one target per row of h is needed
    ],
)
def test_the_frozen_head_refuses_shapes_that_do_not_fit_and_names_them(h_shape, W_shape, targets_shape):
    h, W, targets = torch.zeros(h_shape), torch.zeros(W_shape), torch.zeros(targets_shape, dtype=torch.long)
    got = f"got {h_shape}, {W_shape}, {targets_shape}"
    with pytest.raises(ValueError, match=re.escape(f"expected h (N, D), W (V, D), targets (N,); {got}")):
        frozen_head_cross_entropy(h, W, targets)


def test_a_trainable_head_is_refused_with_a_message_that_says_why():
    h, W, targets = head_inputs(4)
    with pytest.raises(ValueError) as error:
        frozen_head_cross_entropy(h.requires_grad_(True), W.requires_grad_(True), targets)
    assert str(error.value) == "FrozenHeadCrossEntropy is for a frozen head: W must not require grad"


# ---- chunks, devices and the path without a gradient ------------------------------------------------------


def test_the_default_chunk_keeps_a_block_of_logits_under_CHUNK_ELEMENTS():
    """As many rows as fit V logits each in CHUNK_ELEMENTS, and at least one row for a vocabulary larger than that
    (meta tensors: shapes without memory)."""
    V = 50257
    rows = _chunk_rows(torch.empty(V, 768, device="meta"), None)
    assert rows * V <= CHUNK_ELEMENTS < (rows + 1) * V
    assert _chunk_rows(torch.empty(CHUNK_ELEMENTS + 1, 4, device="meta"), None) == 1
    assert _chunk_rows(torch.empty(V, 768, device="meta"), 5) == 5  # a given chunk_size wins


def test_frozen_lm_loss_makes_the_logits_chunk_size_rows_at_a_time():
    """8 supervised positions in chunks of 3: logits blocks of 3, 3 and 2 rows (V = 7 wide)."""
    h, W, targets = head_inputs(10)
    targets[[1, 6]] = -100
    with OutputShapes() as ops:
        frozen_lm_loss(h.view(2, 5, 3).requires_grad_(True), W, targets.view(2, 5), chunk_size=3)
    assert [shape for shape in ops.matmuls if shape[1] == 7] == [(3, 7), (3, 7), (2, 7)]


@pytest.mark.parametrize("no_grad", [True, False])
def test_without_a_gradient_to_compute_the_head_makes_only_the_logits(no_grad):
    """Under no_grad, or with h not requiring grad, no dh: one matmul per chunk (the logits) and no (N, D) buffer."""
    h, W, targets = head_inputs(10)
    h.requires_grad_(no_grad)  # under no_grad, even an h that requires grad gets no gradient
    with torch.set_grad_enabled(not no_grad), OutputShapes() as ops:
        loss = frozen_head_cross_entropy(h, W, targets, chunk_size=4)
    assert ops.matmuls == [(4, 7), (4, 7), (2, 7)]
    assert (10, 3) not in ops.shapes
    torch.testing.assert_close(loss, F.cross_entropy(h.detach() @ W.t(), targets))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_the_frozen_head_skips_the_targets_equal_to_ignore_index(requires_grad):
    h, W, targets = head_inputs(10)
    targets[[0, 3, 4]] = -1
    h.requires_grad_(requires_grad)
    loss = frozen_head_cross_entropy(h, W, targets, chunk_size=4, ignore_index=-1)
    ref = F.cross_entropy(F.linear(h, W), targets, ignore_index=-1)
    torch.testing.assert_close(loss, ref)
    if requires_grad:
        torch.testing.assert_close(torch.autograd.grad(loss, h)[0], torch.autograd.grad(ref, h)[0])


def test_the_loss_is_made_on_the_device_of_h_whatever_the_default_device():
    """Inside `with torch.device(...)` (a default device for new tensors), CPU inputs still give a CPU loss."""
    h, W, targets = head_inputs(6)
    with torch.device("meta"):
        loss = frozen_head_cross_entropy(h, W, targets, chunk_size=2)
    torch.testing.assert_close(loss, F.cross_entropy(h @ W.t(), targets))
