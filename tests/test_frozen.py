"""Tests for minipt.frozen: the saved-tensor accounting against hand-computed byte counts, FrozenLinear and
FrozenHeadCrossEntropy against F.linear / F.cross_entropy in float64 (gradcheck), and PromptTuning with the
frozen path on and off: same loss, same prompt gradient, fewer bytes kept for backward."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minipt import GPT, GPTConfig, PromptTuning
from minipt.frozen import frozen_linear, snapshot, trainable_parameters
from minipt.loss import FrozenHeadCrossEntropy, frozen_head_cross_entropy, frozen_lm_loss, lm_loss
from minipt.saved_tensors import saved_tensor_report
from minipt.train import TrainConfig, train

CFG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=260, block_size=64)


def make_model(seed=0, dtype=torch.float32) -> GPT:
    """A small GPT with weights large enough that the loss depends on the prompt."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**CFG))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.to(dtype)


def random_ids(*shape, seed=0, high=256):
    return torch.randint(high, shape, generator=torch.Generator().manual_seed(seed))


# --- saved_tensor_report -----------------------------------------------------------------------------------


def test_report_counts_a_known_function_by_hand(seed):
    x = torch.randn(4, 8, requires_grad=True)
    report = saved_tensor_report(lambda: x.exp().sum())  # exp saves its output: 4 * 8 fp32 = 128 bytes
    assert report.activation_bytes == 128 and report.by_op == {"Exp": 128} and report.parameter_bytes == 0

    xd = x.detach().double().requires_grad_(True)  # fp64: 8 bytes a number; tanh saves its output too
    assert saved_tensor_report(lambda: xd.tanh().sum()).activation_bytes == 4 * 8 * 8
    assert "Exp" in str(report) and "128" in str(report)


def test_report_counts_each_storage_once(seed):
    x = torch.randn(4, 8, requires_grad=True)
    assert saved_tensor_report(lambda: (x * x).sum()).activation_bytes == 128  # x saved twice
    report = saved_tensor_report(lambda: (x[:2] * x[2:]).sum())  # two views of one storage: all of it counts
    assert report.activation_bytes == 128 and report.tensors_by_op == {"Mul": 1}


def test_report_ignores_what_the_function_dropped(seed):
    x = torch.randn(4, 8, requires_grad=True)
    # cos saves sin(x), a new storage, but that graph is gone when fn returns: only exp's output is kept
    report = saved_tensor_report(lambda: [x.exp().sum(), x.sin().cos().sum()][0])
    assert report.by_op == {"Exp": 128}


def test_report_separates_parameters(seed):
    x = torch.randn(3, 5, 16, requires_grad=True)
    W = nn.Parameter(torch.randn(32, 16))
    report = saved_tensor_report(F.linear, x, W)  # saves x (an activation) and W.t() (a parameter)
    assert report.activation_bytes == x.numel() * 4 and report.parameter_bytes == W.numel() * 4
    W.requires_grad_(False)  # frozen: dx = dy W needs no x, and autograd does not keep it
    report = saved_tensor_report(F.linear, x, W)
    assert report.activation_bytes == 0 and report.parameter_bytes == W.numel() * 4


# --- FrozenLinear ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 7), (2, 1, 1, 7)])
def test_frozen_linear_gradcheck(seed, bias, shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 7, dtype=torch.float64)
    b = torch.randn(11, dtype=torch.float64) if bias else None
    torch.testing.assert_close(frozen_linear(x, W, b), F.linear(x, W, b), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda x: frozen_linear(x, W, b), (x,))
    dy = torch.randn(*shape[:-1], 11, dtype=torch.float64)
    (dx,) = torch.autograd.grad(frozen_linear(x, W, b), x, dy)
    (ref,) = torch.autograd.grad(F.linear(x, W, b), x, dy)
    torch.testing.assert_close(dx, ref, rtol=1e-12, atol=1e-12)


def test_frozen_linear_saves_no_activation(seed):
    x = torch.randn(4, 16, 32, requires_grad=True)
    W, b = nn.Parameter(torch.randn(64, 32), requires_grad=False), nn.Parameter(torch.zeros(64), requires_grad=False)
    report = saved_tensor_report(frozen_linear, x, W, b)
    assert report.activation_bytes == 0 and report.parameter_bytes == W.numel() * 4
    with pytest.raises(ValueError, match="frozen weights"):
        frozen_linear(x, W.detach().requires_grad_(True))


# --- FrozenHeadCrossEntropy --------------------------------------------------------------------------------


def head_inputs(N, D=6, V=13, dtype=torch.float64, n_ignored=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_(True)
    W = torch.randn(V, D, generator=g, dtype=dtype)
    y = torch.randint(V, (N,), generator=g)
    y[:n_ignored] = -100
    return h, W, y


@pytest.mark.parametrize(
    "N, chunk, n_ignored",
    [
        (1, None, 0),  # one row
        (7, 3, 0),  # 3 chunks, the last one short
        (10, 4, 3),  # ignored rows, and a chunk boundary inside them
        (5, 1, 2),  # one row per chunk
        (6, 100, 5),  # one chunk larger than N, a single supervised row
    ],
)
def test_frozen_head_gradcheck(N, chunk, n_ignored):
    h, W, y = head_inputs(N, n_ignored=n_ignored)
    loss = frozen_head_cross_entropy(h, W, y, chunk_size=chunk)
    ref = F.cross_entropy(F.linear(h, W), y, ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, h)[0], torch.autograd.grad(ref, h)[0], rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h: frozen_head_cross_entropy(h, W, y, chunk_size=chunk), (h,))


def test_frozen_head_loss_fp32_and_no_grad_path():
    h, W, y = head_inputs(50, D=16, V=300, dtype=torch.float32, n_ignored=9)
    ref = F.cross_entropy(F.linear(h, W), y)
    for chunk in (None, 7):
        torch.testing.assert_close(frozen_head_cross_entropy(h, W, y, chunk_size=chunk), ref, rtol=1e-6, atol=1e-6)
        with torch.no_grad():  # no dh to compute: same loss
            torch.testing.assert_close(frozen_head_cross_entropy(h, W, y, chunk), ref, rtol=1e-6, atol=1e-6)
    all_ignored = torch.full_like(y, -100)  # 0 / 0, as F.cross_entropy
    assert torch.isnan(frozen_head_cross_entropy(h, W, all_ignored)) and torch.isnan(
        F.cross_entropy(h @ W.t(), all_ignored)
    )
    with pytest.raises(ValueError, match="frozen head"):
        FrozenHeadCrossEntropy.apply(h, W.requires_grad_(True), y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_head_16_bit_accumulates_in_fp32(dtype):
    h, W, y = head_inputs(40, D=16, V=300, dtype=torch.float32, n_ignored=4)
    h16, W16 = h.detach().to(dtype).requires_grad_(True), W.to(dtype)
    loss = frozen_head_cross_entropy(h16, W16, y, chunk_size=9)
    assert loss.dtype == torch.float32  # the loss sum, the softmax and logsumexp are fp32
    ref = lm_loss(F.linear(h16, W16)[None], y[None])  # the plain path upcasts the logits to fp32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    (dh,) = torch.autograd.grad(loss, h16)
    (dref,) = torch.autograd.grad(ref, h16)
    assert dh.dtype == dtype
    torch.testing.assert_close(dh.float(), dref.float(), rtol=2e-2, atol=1e-4)


def test_frozen_head_keeps_only_dh():
    h, W, y = head_inputs(64, D=16, V=500, dtype=torch.float32)
    fused = saved_tensor_report(frozen_head_cross_entropy, h, W, y, 10)
    assert fused.activation_bytes == 64 * 16 * 4 and fused.by_op == {"FrozenHeadCrossEntropy": 64 * 16 * 4}
    plain = saved_tensor_report(lambda: F.cross_entropy(F.linear(h, W), y))
    assert plain.by_op["LogSoftmax"] == 64 * 500 * 4  # the (N, V) log-softmax


@pytest.mark.parametrize("need_grad", [True, False])
def test_frozen_head_holds_one_chunk_of_logits_at_a_time(need_grad):
    """The (C, V) logits of a chunk are freed before the next chunk's are made: one block at the peak, not two."""
    import weakref

    h, W, y = head_inputs(10, D=4, V=7, dtype=torch.float32)
    h.requires_grad_(need_grad)

    class LiveLogits(TorchDispatchMode):
        """At each new (C, V) block of logits (a matmul output V wide), counts the earlier ones still alive."""

        blocks, alive_at_new = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default) and out.shape[-1] == 7:
                self.alive_at_new.append(sum(ref() is not None for ref in self.blocks))
                self.blocks.append(weakref.ref(out))
            return out

    with LiveLogits() as mode:
        frozen_head_cross_entropy(h, W, y, chunk_size=3)  # 4 chunks of at most 3 rows
    assert mode.alive_at_new == [0, 0, 0, 0]


def test_frozen_lm_loss_equals_lm_loss():
    h, W, _ = head_inputs(15, D=8, V=40)
    h3 = h.detach().view(3, 5, 8).requires_grad_(True)
    targets = random_ids(3, 5, high=40)
    targets[0, :2] = -100
    targets[2, 4] = -100
    loss = frozen_lm_loss(h3, W, targets, chunk_size=4)
    ref = lm_loss(F.linear(h3, W), targets)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(loss, h3)[0], torch.autograd.grad(ref, h3)[0], rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="no supervised position"):
        frozen_lm_loss(h3, W, torch.full_like(targets, -100))
    with pytest.raises(ValueError, match="targets must have the shape of idx"):
        frozen_lm_loss(h3, W, targets[:, :4])
    with pytest.raises(TypeError, match="int64 token ids"):
        frozen_lm_loss(h3, W, targets.float())


# --- PromptTuning with the frozen path on and off ----------------------------------------------------------


def loss_and_grad(pt, idx, targets, mask=None):
    pt.prompt.grad = None
    loss = pt.loss(idx, targets, mask)
    loss.backward()
    return loss.detach(), pt.prompt.grad.clone()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_prompt_tuning_same_loss_and_gradient_with_the_frozen_path(dtype, tol):
    model = make_model(dtype=dtype)
    on = PromptTuning(model, n_prompt=4, init="uniform", backend="reference").train()
    off = PromptTuning(model, n_prompt=4, init="uniform", backend="reference", frozen_head=False).train()
    idx, targets = random_ids(3, 9), random_ids(3, 9, seed=1)
    targets[:, :3] = -100
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7])
    for m in (None, mask):
        loss_on, grad_on = loss_and_grad(on, idx, targets, m)
        loss_off, grad_off = loss_and_grad(off, idx, targets, m)
        assert torch.equal(loss_off, off(idx, targets, m)[1].detach())  # frozen_head=False: forward's loss
        torch.testing.assert_close(loss_on, loss_off, rtol=tol, atol=tol)
        torch.testing.assert_close(grad_on, grad_off, rtol=tol, atol=tol * grad_off.abs().max().item())
    logits, loss = on(idx, targets=targets)  # forward: always the logits, the plain path
    assert logits.shape == (3, 9, 260) and torch.equal(logits, off.eval()(idx)[0])


def test_prompt_tuning_step_gives_no_frozen_tensor_a_gradient_and_makes_no_vocab_table():
    """During a prompt-tuning step no (V, D) tensor is allocated: not for the embedding (prompt_concat gives
    the frozen wte no gradient), not for the tied head (FrozenHeadCrossEntropy reads W, never builds dW)."""
    model = make_model()
    before = snapshot(model)
    pt = PromptTuning(model, n_prompt=5, init="uniform", backend="reference").train()
    V, D = model.transformer.wte.weight.shape
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    class NewTensorShapes(TorchDispatchMode):
        """Records the shape of every op output that is a new storage (not a view of a parameter)."""

        shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in param_storages:
                    self.shapes.append(tuple(t.shape))
            return out

    with NewTensorShapes() as mode:
        loss = pt.loss(random_ids(2, 7), random_ids(2, 7, seed=1))
        loss.backward()
    assert (V, D) not in mode.shapes and (D, V) not in mode.shapes and len(mode.shapes) > 20
    assert all(p.grad is None for p in model.parameters())
    assert pt.prompt.grad is not None and pt.prompt.grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_minipt_keeps_fewer_bytes_than_naive_prompt_tuning():
    idx, targets = random_ids(2, 20), random_ids(2, 20, seed=1)  # every position supervised
    model = make_model()
    minipt = PromptTuning(model, n_prompt=4, init="uniform", backend="reference").train()
    ours = saved_tensor_report(lambda: minipt.loss(idx, targets))
    naive = PromptTuning(make_model(), n_prompt=4, init="uniform", backend="reference", frozen_head=False).train()
    for p in naive.model.parameters():
        p.requires_grad_(True)  # the common mistake: the optimizer holds only the prompt, autograd does not know
    theirs = saved_tensor_report(lambda: naive.loss(idx, targets))
    assert ours.activation_bytes < theirs.activation_bytes
    assert "LogSoftmax" in theirs.by_op and "LogSoftmax" not in ours.by_op
    assert "FrozenHeadCrossEntropy" in ours.by_op and "Addmm" not in ours.by_op  # frozen Linears keep no input
    assert torch.equal(naive.loss(idx, targets), naive(idx, targets)[1])  # a trainable head: the plain path


def test_train_loop_runs_on_the_frozen_path():
    model = make_model()
    pt = PromptTuning(model, n_prompt=3, init="uniform", backend="reference")
    batch = (random_ids(4, 8), random_ids(4, 8, seed=1))
    result = train(pt, lambda step: batch, TrainConfig(steps=5, batch_size=4, lr=0.1, warmup_steps=1, progress=False))
    assert len(result.losses) == 5 and result.losses[-1] < result.losses[0]
    assert [name for name, _ in trainable_parameters(pt)] == ["prompt"]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_recomputing_the_frozen_blocks_gives_the_same_gradient_and_keeps_only_block_inputs(dtype, tol):
    model = make_model(dtype=dtype)
    idx, targets = random_ids(3, 12), random_ids(3, 12, seed=1)
    plain = PromptTuning(model, n_prompt=4, init="uniform", backend="reference").train()
    again = PromptTuning.from_tensor(model, plain.prompt.detach(), backend="reference", recompute=True).train()
    grads = []
    for pt in (plain, again):
        loss = pt.loss(idx, targets)
        loss.backward()
        grads.append((loss.detach(), pt.prompt.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=tol, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=tol, atol=tol * grads[0][1].abs().max().item())
    kept = {
        name: saved_tensor_report(lambda pt=pt: pt.loss(idx, targets)).activation_bytes
        for name, pt in (("plain", plain), ("recompute", again))
    }
    row = 3 * (4 + 12) * CFG["n_embd"] * dtype.itemsize  # one (B, T, D) activation
    dh = 3 * 12 * CFG["n_embd"] * dtype.itemsize  # the fused head's dL/dh, (B * n, D)
    assert kept["recompute"] < 0.5 * kept["plain"]
    # each block's input, ln_f's input (outside the blocks) and dh; LayerNorm statistics and ids are small
    assert kept["recompute"] <= (CFG["n_layer"] + 1) * row + dh + 2048  # + ids and LayerNorm statistics
    assert all(p.grad is None for p in model.parameters())  # still frozen
