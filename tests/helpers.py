"""Small shared helpers for the tests (imported as `helpers`: pytest puts tests/ on sys.path)."""

import contextlib
import signal
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minipt import GPT, GPTConfig


def random_gpt(config: dict, seed: int = 0, std: float | None = None) -> GPT:
    """A small GPT with seeded weights; with `std`, every weight matrix is redrawn from N(0, std).

    GPT-2's init (std 0.02) makes all logits nearly equal, so greedy decoding is trivially constant and a
    prompt has almost no effect; a larger std makes the outputs depend on the input.
    """
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**config))
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, std)
    return model


# ---- counting host synchronisations ------------------------------------------------------------------------
# A value that leaves the device (.item(), bool(t), .tolist()) or an op whose output size depends on the data
# (nonzero, boolean-mask indexing, masked_select) stalls a GPU stream until every queued kernel has run; on the
# CPU the same calls are counted, since they are the ones that would stall a GPU. A TorchDispatchMode sees every
# aten op; .tolist() reads the data without one, so it is counted by wrapping torch.Tensor.tolist.

SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select")


@dataclass
class HostSyncs:
    by_op: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


class _SyncCounter(TorchDispatchMode):
    def __init__(self, syncs: HostSyncs):
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.syncs.by_op[name] += 1
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            # t[mask]: the op runs nonzero on the mask inside its kernel, which the mode does not see
            self.syncs.by_op["boolean index"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """Count the host syncs of the code inside the `with` block: syncs.total, syncs.by_op."""
    syncs = HostSyncs()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        syncs.by_op["tolist"] += 1
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with _SyncCounter(syncs):
            yield syncs
    finally:
        torch.Tensor.tolist = tolist


def as_from_a_terminal():
    """In the child, before Python starts: SIGINT's default action, as a shell gives a foreground command.

    A test run in the background (`make test &`, some CI runners) has SIGINT ignored, and an ignored signal
    stays ignored across exec; Python then installs no KeyboardInterrupt handler and the child would ignore
    the Ctrl-C a test sends (it did, once, for 60 s)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
