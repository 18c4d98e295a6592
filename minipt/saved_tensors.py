"""What autograd keeps for backward, measured: `saved_tensor_report` (see minipt.frozen for why it matters).

References: PyTorch docs, "Hooks for saved tensors".
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["SavedTensorReport", "saved_tensor_report"]


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
        lines.append(
            f"{'activations, total':<{width}}  {'':>8}  {self.activation_bytes:>15,}  "
            f"{self.activation_bytes / 2**20:>9.2f}"
        )
        lines.append(
            f"{'parameters (not counted above)':<{width}}  {'':>8}  {self.parameter_bytes:>15,}  "
            f"{self.parameter_bytes / 2**20:>9.2f}"
        )
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
    if not callable(fn):
        raise TypeError(f"fn must be a function to run (e.g. lambda: model(x)), got {type(fn).__name__}")
    if not torch.is_grad_enabled():  # autograd would save nothing, and the report would say 0 bytes
        raise RuntimeError(
            "saved_tensor_report measures what autograd keeps for backward: call it with "
            "gradients enabled, not under torch.no_grad() or torch.inference_mode()"
        )
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
            _ = node.saved_tensors  # reading the property is what sends its tensors through unpack
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
