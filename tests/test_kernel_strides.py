"""The Triton kernel on a prompt or bank whose rows are strided (columns contiguous), against the reference.

A slice of a wider tensor, `torch.randn(n_p, D + 5)[:, :D]`, has row stride D + 5 and column stride 1: a kernel
that reads P with stride D instead of its row stride would read the wrong numbers. Forward and the prompt's
gradient must equal the plain PyTorch reference bit for bit. Tiny grids: under the interpreter each program
instance costs about a millisecond.
"""

import pytest
import torch

from minipt.kernels import prompt_concat, prompt_concat_reference

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, n, n_p, D, V, K = 2, 3, 2, 8, 11, 3


def strided_rows(*shape, pad=5):
    """A tensor of `shape` whose last dimension is contiguous but whose rows are `pad` elements apart."""
    wide = torch.randn(*shape[:-1], shape[-1] + pad, device=DEVICE)
    view = wide[..., : shape[-1]]
    assert view.stride(-1) == 1 and view.stride(-2) == shape[-1] + pad
    return view


@pytest.mark.parametrize("bank", [False, True], ids=["prompt", "bank"])
def test_strided_rows_match_the_reference(bank, seed):
    prompt = (strided_rows(K, n_p, D) if bank else strided_rows(n_p, D)).requires_grad_(True)
    wte = strided_rows(V, D)
    wpe = strided_rows(n_p + n, D)
    idx = torch.randint(0, V, (B, n), device=DEVICE)
    prompt_index = torch.tensor([2, 0], device=DEVICE) if bank else None
    upstream = torch.randn(B, n_p + n, D, device=DEVICE)

    got = prompt_concat(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index, backend="triton")
    (grad_got,) = torch.autograd.grad(got, prompt, upstream)
    want = prompt_concat_reference(prompt, wte, idx, wpe=wpe, prompt_index=prompt_index)
    (grad_want,) = torch.autograd.grad(want, prompt, upstream)

    assert torch.equal(got, want)
    assert torch.equal(grad_got, grad_want)
