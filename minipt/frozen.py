"""Freezing a model, and what a frozen model need not store for backward.

A frozen parameter has requires_grad=False, so autograd never computes or stores a gradient for it, and the
optimizer is never handed it. Tests check the three promises of prompt tuning after training: every base
tensor is bit-identical to before, its .grad is None, and the optimizer holds only the prompt.

Freezing also changes what the forward pass keeps for backward. For y = x W^T + b the gradients are

    dx = dy W          dW = dy^T x          db = sum_rows dy                                  (1)

so with W frozen only W is needed, never x. `saved_tensor_report` measures what autograd really keeps.
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
log-softmax for backward, 65x the size of the hidden states it is computed from; `FrozenHeadCrossEntropy`
keeps only dL/dh (N, D). The rest (LayerNorm, attention and GELU inputs) is needed for dL/dx itself, whether
or not the weights are frozen; it could only be recomputed (activation checkpointing), not dropped.

References: Lester et al. 2021 (prompt tuning, a frozen model); Liger-Kernel's fused linear cross-entropy
(chunked logits, gradient computed in the forward pass); PyTorch docs, "Hooks for saved tensors".
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["freeze", "trainable_parameters", "snapshot", "SavedTensorReport", "saved_tensor_report",
           "FrozenLinear", "frozen_linear", "FrozenHeadCrossEntropy", "frozen_head_cross_entropy",
           "frozen_lm_loss"]


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


# ---- saved-tensor accounting ------------------------------------------------------------------------------


@dataclass
class SavedTensorReport:
    """Bytes autograd keeps for backward. Each storage is counted once, in full (a view keeps its whole
    storage alive); storages that belong to parameters are counted apart, since they exist anyway."""

    activation_bytes: int = 0  # kept only because backward needs them
    parameter_bytes: int = 0  # saved tensors that are (views of) parameters: no extra memory
    by_op: dict[str, int] = field(default_factory=dict)  # activation bytes per saving op, first saver wins
    tensors_by_op: dict[str, int] = field(default_factory=dict)  # how many activation storages per op

    def __str__(self) -> str:
        rows = sorted(self.by_op.items(), key=lambda kv: -kv[1])
        width = max([len(op) for op, _ in rows] + [30])
        lines = [f"{'op (grad_fn)':<{width}}  {'storages':>8}  {'bytes':>15}  {'MiB':>9}"]
        for op, nbytes in rows:
            lines.append(f"{op:<{width}}  {self.tensors_by_op[op]:>8}  {nbytes:>15,}  {nbytes / 2**20:>9.2f}")
        lines.append(f"{'activations, total':<{width}}  {'':>8}  {self.activation_bytes:>15,}  "
                     f"{self.activation_bytes / 2**20:>9.2f}")
        lines.append(f"{'parameters (not counted above)':<{width}}  {'':>8}  {self.parameter_bytes:>15,}  "
                     f"{self.parameter_bytes / 2**20:>9.2f}")
        return "\n".join(lines)


class _Packed:
    """What the pack hook hands autograd instead of a saved tensor: the tensor, plus who saved it."""

    __slots__ = ("tensor", "is_param", "op", "__weakref__")

    def __init__(self, t: torch.Tensor):
        # a saved tensor is a parameter if it is one, or a view of one (F.linear saves W.t())
        self.is_param = isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)
        # detach: for a saved *output*, holding the tensor itself would tie it to its own grad_fn in a
        # reference cycle that Python's garbage collector cannot see; a detached alias shares the storage.
        self.tensor = t.detach()
        self.op = None  # set when the graph walk finds which node saved it


def _parameter_storages(*objs) -> set[int]:
    """data_ptrs of the parameters of every nn.Module among objs (and a function's closure and __self__)."""
    ptrs, seen = set(), set()
    stack = list(objs)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            ptrs.update(p.untyped_storage().data_ptr() for p in obj.parameters())
        elif isinstance(obj, nn.Parameter):
            ptrs.add(obj.untyped_storage().data_ptr())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif callable(obj):
            for cell in getattr(obj, "__closure__", None) or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            stack.extend([getattr(obj, "__self__", None), getattr(obj, "func", None)])  # bound methods, partials
    return ptrs


def _graph_nodes(outputs) -> list:
    """Every autograd node reachable from the tensors in outputs."""
    roots = [t.grad_fn for t in _tensors_in(outputs) if t.grad_fn is not None]
    seen, nodes = set(), []
    while roots:
        node = roots.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        roots.extend(nxt for nxt, _ in node.next_functions)
    return nodes


def _tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors_in(o)]
    return []


def saved_tensor_report(fn, *args, **kwargs) -> SavedTensorReport:
    """Run fn(*args, **kwargs) and report the bytes its autograd graph keeps for backward, by operation.

    How: `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd saves, at the moment it is
    saved, but not which node saves it; the graph (the outputs' grad_fn and their next_functions) knows the
    nodes. So the pack hook wraps each saved tensor in a record, and after fn returns we walk the graph and
    read every node's saved tensors (`_saved_*` attributes, or `saved_tensors` for a custom Function), which
    calls the unpack hook with the record: that names the op. A record the walk does not reach but that is
    still alive is reported as "(unattributed)"; one that is gone belonged to a part of the graph fn dropped,
    so it is not kept for backward and not counted.

    Parameters: a saved tensor is a parameter if it is an nn.Parameter or a view of one, or if its storage
    is that of a parameter of an nn.Module found in fn (a module, a bound method, a closure) or in args.
    The outputs and the graph are dropped before returning; run fn again to train.
    """
    records: list = []  # weak references: a record lives exactly as long as autograd keeps its tensor

    def pack(t):
        record = _Packed(t)
        records.append(weakref.ref(record))
        return record

    def unpack(record):
        if current_op is not None and record.op is None:
            record.op = current_op
        return record.tensor

    current_op = None
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        outputs = fn(*args, **kwargs)
    for node in _graph_nodes(outputs):
        current_op = re.sub(r"Backward\d*$", "", node.name())
        if hasattr(node, "saved_tensors"):  # a custom autograd.Function: the node is its ctx
            node.saved_tensors
        for name in dir(node):
            if name.startswith("_saved_"):
                getattr(node, name)  # tensors go through unpack; sizes, scalars do not
    current_op = None

    params = _parameter_storages(fn, args, kwargs)
    alive = [r for r in (ref() for ref in records) if r is not None]
    params.update(r.tensor.untyped_storage().data_ptr() for r in alive if r.is_param)
    report, counted = SavedTensorReport(), set()
    # records are in the order autograd saved them (attributed ones first), so a storage that two ops
    # save is counted once, for the first of them
    for r in sorted(alive, key=lambda r: r.op is None):
        storage = r.tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in counted or storage.nbytes() == 0:
            continue
        counted.add(ptr)
        if ptr in params:
            report.parameter_bytes += storage.nbytes()
            continue
        op = r.op or "(unattributed)"
        report.activation_bytes += storage.nbytes()
        report.by_op[op] = report.by_op.get(op, 0) + storage.nbytes()
        report.tensors_by_op[op] = report.tensors_by_op.get(op, 0) + 1
    return report


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
            raise ValueError("FrozenLinear is for frozen weights: W and b must not require grad "
                             "(use F.linear to train them)")
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


# ---- a frozen output head fused with the cross-entropy ----------------------------------------------------

# Rows of logits computed at once: a chunk of logits is at most this many elements (32 MiB in fp32).
CHUNK_ELEMENTS = 2**23


def _chunked_loss(h, W, targets, chunk_size, ignore_index, need_dh):
    """Sum of the cross-entropy of the rows of h @ W^T, the number of rows counted, and dh (or None).

    Per chunk of rows, with logits z = h W^T, p = softmax(z), y the target:
        loss_i = logsumexp(z_i) - z_i[y_i]
        dL/dz_i = (p_i - onehot(y_i)) / N          N = number of rows with y_i != ignore_index   (2)
        dL/dh_i = dL/dz_i W                                                                       (3)
    The softmax, logsumexp and loss sum are in fp32 (fp64 stays fp64); the two matmuls run in W's dtype,
    which on GPUs accumulates in fp32 already. A chunk's logits are freed before the next chunk.
    """
    acc = torch.promote_types(h.dtype, torch.float32)
    valid = targets != ignore_index  # (N,)
    n_valid = valid.sum()
    loss_sum = torch.zeros((), dtype=acc, device=h.device)
    dh = torch.empty_like(h) if need_dh else None  # (N, D)
    for start in range(0, h.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        z = (h[rows] @ W.t()).to(acc)  # (C, V)
        ok = valid[rows]  # (C,)
        y = torch.where(ok, targets[rows], 0)[:, None]  # (C, 1), any valid index on ignored rows
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (C, 1)
        loss_sum += ((lse - z.gather(1, y)).squeeze(1) * ok).sum()
        if need_dh:
            g = z.sub_(lse).exp_()  # (C, V) softmax, in place: z is not needed any more
            g.scatter_add_(1, y, torch.full_like(y, -1, dtype=acc))  # p - onehot(y)       (2)
            g.mul_((ok.to(acc) / n_valid)[:, None])  # / N, and 0 on ignored rows
            dh[rows] = g.to(W.dtype) @ W  # (C, V) @ (V, D) -> (C, D)                    (3)
    return loss_sum, n_valid, dh


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """loss = F.cross_entropy(h W^T, targets, ignore_index) with W frozen, without keeping the logits.

    F.cross_entropy keeps the (N, V) log-softmax for backward. Here the gradient dh (N, D) is computed in
    the forward pass, chunk by chunk (eqs. 2-3 of `_chunked_loss`), and is all that is saved; backward only
    scales it by the upstream gradient. The mean is over rows with targets != ignore_index (NaN if none,
    as for F.cross_entropy). W must not require grad: no (V, D) gradient is ever made.
    """

    @staticmethod
    def forward(ctx, h, W, targets, chunk_size=None, ignore_index=-100):
        if W.requires_grad:
            raise ValueError("FrozenHeadCrossEntropy is for a frozen head: W must not require grad")
        chunk = chunk_size or max(1, CHUNK_ELEMENTS // W.shape[0])
        loss_sum, n_valid, dh = _chunked_loss(h, W, targets, chunk, ignore_index, need_dh=True)
        ctx.save_for_backward(dh)  # (N, D): the only tensor kept
        return loss_sum / n_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        (dh,) = ctx.saved_tensors
        return (dh * dloss).to(dh.dtype), None, None, None, None  # dL/dh = dloss * dh; nothing for W


def frozen_head_cross_entropy(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor,
                              chunk_size: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(F.linear(h, W), targets) for h (N, D), a frozen W (V, D), targets (N,).

    The loss is in fp32 for 16-bit inputs (fp64 for fp64). Without a gradient to compute (no_grad, or h
    not requiring grad) it skips dh and saves nothing.
    """
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"expected h (N, D), W (V, D), targets (N,); got {tuple(h.shape)}, {tuple(W.shape)}, "
                         f"{tuple(targets.shape)}")
    if torch.is_grad_enabled() and h.requires_grad:
        return FrozenHeadCrossEntropy.apply(h, W, targets, chunk_size, ignore_index)
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // W.shape[0])
    loss_sum, n_valid, _ = _chunked_loss(h, W, targets, chunk, ignore_index, need_dh=False)
    return loss_sum / n_valid


def frozen_lm_loss(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int | None = None) -> torch.Tensor:
    """lm_loss(h @ W^T, targets) for a frozen tied head, computing logits only where targets != -100.

    h (B, n, D) hidden states after ln_f, W (V, D), targets (B, n) with -100 where no loss is taken.
    """
    if targets.shape != h.shape[:2]:
        raise ValueError(f"targets must have the shape of idx {tuple(h.shape[:2])}, got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point:
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    keep = targets != -100  # (B, n)
    if not bool(keep.any()):
        raise ValueError("targets has no supervised position (every entry is -100)")
    return frozen_head_cross_entropy(h[keep], W, targets[keep], chunk_size)  # (M, D) rows, M = keep.sum()
