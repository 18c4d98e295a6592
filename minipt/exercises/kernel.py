"""Exercises on the Triton kernels (notebook `02_kernel`), checked on the CPU by Triton's interpreter.

The interpreter runs a kernel's Python function once per program instance, with numpy arrays for blocks and
raw addresses for pointers (about 1 ms per program, so the grids here stay tiny). It is switched on by the
environment variable TRITON_INTERPRET=1, which `@triton.jit` reads when it decorates a function, that is,
when the cell defining the kernel runs: set it before the first `import triton` (the notebook's first cell
does), or calling the kernel yourself on CPU tensors fails for want of a GPU. The checker does not depend on
it: it takes the Python function out of whatever `@triton.jit` returned and runs it under the interpreter
itself, so a check behaves the same on a laptop and on a GPU machine.

What the checker adds to a plain comparison:

* every tensor the kernel sees lives inside a larger buffer, with guard elements on either side;
* every load and store is audited: a lane whose address falls outside the tensors handed to the kernel is
  recorded (an unmasked tl.load or tl.store past a row's end) and masked off, so it never touches memory;
* atomic operations are counted (the batch reduction must not use them);
* outputs start as NaN, so a row the kernel never writes shows up.

Triton is optional (it ships for Linux only): without it every kernel check returns a failed result that
says so, and never raises.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .equations import CONCAT_MISTAKES, concat_reference
from .result import (
    Case,
    CheckResult,
    Mistake,
    _equal,
    diagnose_all,
    draw_cases,
    failed,
    first_difference,
    passed,
    pick,
    randint,
    size_hint,
)

__all__ = [
    "BATCH_SUM_MISTAKES",
    "CHECKERS",
    "DRAWN_KERNEL_CASES",
    "GUARD",
    "Guarded",
    "KERNEL_CASES",
    "KernelSpy",
    "Launch",
    "MemoryAudit",
    "NO_TRITON",
    "Region",
    "access_picture",
    "audit_note",
    "batch_sum_case",
    "batch_sum_cases",
    "batch_sum_reference",
    "check_batch_sum_kernel",
    "check_concat_kernel",
    "check_concat_launcher",
    "concat_kernel_cases",
    "device_calls_interpreted",
    "draw_kernel_case",
    "import_triton",
    "kernel_case",
    "launch_problem",
    "launcher_cases",
    "memory_problem",
    "next_power_of_2",
    "python_function",
    "run_interpreted",
    "triton_stub",
    "unwritten",
    "written_mask",
]

GUARD = 64  # elements of padding on either side of every tensor a kernel sees (>= any BLOCK_D used here)
NO_TRITON = (
    "Triton is not installed (it ships wheels for Linux only), so this kernel cannot be checked here. "
    "Run this notebook on Linux (a laptop, or a free notebook service) after `pip install triton`."
)


def import_triton():
    """(triton, interpreter module), or ImportError: imported only when a kernel is checked."""
    import triton
    from triton.runtime import interpreter

    return triton, interpreter


def triton_stub():
    """Stand-ins for `triton` and `triton.language` where Triton is not installed: enough for a notebook's
    kernel cells to be defined (`@triton.jit`, `tl.constexpr`). They never run: each check says why."""
    from types import SimpleNamespace

    language = SimpleNamespace(constexpr=int)
    return SimpleNamespace(jit=lambda fn: fn, next_power_of_2=next_power_of_2, language=language), language


# ---- guarded tensors ------------------------------------------------------------------------------------


@dataclass
class Guarded:
    """A tensor placed in the middle of a buffer filled with `fill`: writes past either end land in the guard."""

    name: str
    buffer: torch.Tensor  # (numel + 2 * GUARD,)
    view: torch.Tensor  # the tensor itself, a view into buffer
    fill: float

    @classmethod
    def around(cls, name: str, t: torch.Tensor, fill) -> Guarded:
        buffer = torch.full((t.numel() + 2 * GUARD,), fill, dtype=t.dtype)
        view = buffer[GUARD : GUARD + t.numel()].view(t.shape)
        view.copy_(t)
        return cls(name, buffer, view, fill)

    @classmethod
    def empty(cls, name: str, shape, dtype) -> Guarded:
        return cls.around(name, torch.full(shape, float("nan"), dtype=dtype), float("nan"))

    def guard_written(self) -> bool:
        guard = torch.cat([self.buffer[:GUARD], self.buffer[GUARD + self.view.numel() :]])
        if isinstance(self.fill, float) and self.fill != self.fill:  # NaN
            return not bool(guard.isnan().all())
        return not bool((guard == self.fill).all())


# ---- the memory audit -----------------------------------------------------------------------------------


@dataclass
class Region:
    name: str
    start: int  # first byte
    end: int  # one past the last byte
    shape: tuple
    itemsize: int

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> Region:
        start = t.data_ptr()
        return cls(name, start, start + t.numel() * t.element_size(), tuple(t.shape), t.element_size())

    def describe(self, address: int) -> str:
        if address < self.start:
            return f"{(self.start - address) // self.itemsize} element(s) before the start of {self.name}"
        return f"{(address - self.end) // self.itemsize + 1} element(s) past the end of {self.name} {self.shape}"


@dataclass
class MemoryAudit:
    """Every load and store of an interpreted kernel, checked against the tensors it was given."""

    regions: list
    bad_load: str | None = None
    bad_store: str | None = None
    atomics: int = 0
    available: bool = True
    stored: list = field(default_factory=list)  # the byte addresses of every lane a tl.store wrote
    log: list = field(default_factory=list)  # (kind, program id (x, y, z), byte addresses) of every access
    _saved: object = field(default=None, repr=False)

    def allow(self, kind: str, ptrs, mask, itemsize: int):
        """The mask with every lane outside the regions switched off; the first such lane is recorded."""
        ptrs = np.asarray(ptrs, dtype=np.uint64)
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)
        inside = np.zeros(ptrs.shape, dtype=bool)
        for r in self.regions:
            inside |= (ptrs >= np.uint64(r.start)) & (ptrs + np.uint64(itemsize) <= np.uint64(r.end))
        bad = mask & ~inside
        program = getattr(getattr(_interpreter_module(), "interpreter_builder", None), "grid_idx", None)
        self.log.append((kind, tuple(program or (0, 0, 0)), ptrs[mask & inside].copy()))
        if bad.any():
            lane = np.argwhere(bad)[0]
            address = int(ptrs[tuple(lane)])
            nearest = min(self.regions, key=lambda r: min(abs(address - r.start), abs(address - r.end)))
            text = f"a tl.{kind} at lane {int(lane[-1]) if lane.size else 0} reached {nearest.describe(address)}"
            if kind == "load" and self.bad_load is None:
                self.bad_load = text
            if kind == "store" and self.bad_store is None:
                self.bad_store = text
        return np.ascontiguousarray(mask & inside)

    def __enter__(self):
        try:
            _, interpreter = import_triton()
            self._saved = interpreter._interpreter  # the interpreter's memory module (a Triton internal)
            interpreter._interpreter = _AuditedMemory(self._saved, self)
        except (ImportError, AttributeError):
            self.available = False  # another Triton version: the guards still catch stray stores
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            _, interpreter = import_triton()
            interpreter._interpreter = self._saved
        return False


class _AuditedMemory:
    """Stands in for the interpreter's memory module; lanes outside the kernel's tensors never touch memory."""

    def __init__(self, real, audit: MemoryAudit):
        self._real, self._audit = real, audit

    def __getattr__(self, name):
        return getattr(self._real, name)

    def load(self, ptrs, mask, other, dtype):
        return self._real.load(ptrs, self._audit.allow("load", ptrs, mask, np.dtype(dtype).itemsize), other, dtype)

    def store(self, ptrs, value, mask):
        mask = self._audit.allow("store", ptrs, mask, value.dtype.itemsize)
        self._audit.stored.append(np.asarray(ptrs, dtype=np.uint64)[mask].copy())
        return self._real.store(ptrs, value, mask)

    def atomic_rmw(self, *args):
        self._audit.atomics += 1
        return self._real.atomic_rmw(*args)

    def atomic_cas(self, *args):
        self._audit.atomics += 1
        return self._real.atomic_cas(*args)


def _interpreter_module():
    try:
        return import_triton()[1]
    except ImportError:
        return None


def access_picture(audit: MemoryAudit | None, tensors: dict, programs: int) -> str:
    """Which program touched which rows: one line per row of each tensor (name -> 2-D tensor), one column per
    program (the first grid axis), R read, W written, B both, . untouched. The puzzle anchors draw the same."""
    if audit is None or not audit.log:
        return ""
    lines = []
    for name, t in tensors.items():
        rows, row_bytes = t.shape[0], t[0].numel() * t.element_size() if t.dim() > 1 else t.element_size()
        grid = [["."] * programs for _ in range(rows)]
        start = t.data_ptr()
        for kind, program, ptrs in audit.log:
            if program[0] >= programs or not len(ptrs):
                continue
            offsets = (ptrs.astype(np.int64) - start) // row_bytes
            for row in np.unique(offsets[(offsets >= 0) & (offsets < rows)]):
                mark, old = ("R" if kind == "load" else "W"), grid[row][program[0]]
                grid[row][program[0]] = mark if old in (".", mark) else "B"
        lines.append(f"  {name} rows x programs 0..{programs - 1} (R read, W written, B both):")
        lines += [f"    {r:>3} {' '.join(row)}" for r, row in enumerate(grid)]
    return "\n".join(lines)


def python_function(kernel) -> Callable | None:
    """The Python function inside a @triton.jit kernel (compiled or interpreted), or a plain function."""
    fn = getattr(kernel, "fn", kernel)
    return fn if inspect.isfunction(fn) else None


@contextlib.contextmanager
def device_calls_interpreted():
    """Let a kernel call @triton.jit functions (its own helpers, and tl.zeros, tl.sum, ... which Triton's
    standard library writes with @triton.jit) whatever TRITON_INTERPRET was when Triton was imported.

    With the variable set first, `@triton.jit` returns an InterpretedFunction, whose call runs the function in
    Python; without it, a JITFunction, whose call raises "Cannot call @triton.jit'd outside of the scope of a
    kernel". For the length of one interpreted launch, a JITFunction's call does what the interpreter's does.
    """
    from triton.runtime import interpreter, jit

    saved = jit.JITFunction.__call__
    jit.JITFunction.__call__ = lambda self, *args, **kwargs: interpreter.InterpretedFunction(self.fn)(*args, **kwargs)
    try:
        yield
    finally:
        jit.JITFunction.__call__ = saved


def run_interpreted(kernel, grid: tuple, args: tuple, tensors: dict[str, torch.Tensor]):
    """Run `kernel` on the CPU under the interpreter, its memory audited against `tensors` (name -> tensor).

    Returns (audit, None) or (audit, the error message).
    """
    _, interpreter = import_triton()
    fn = python_function(kernel)
    if fn is None:
        return None, f"expected a @triton.jit kernel, got {type(kernel).__name__}"
    audit = MemoryAudit([Region.of(name, t) for name, t in tensors.items()])
    try:
        with audit, device_calls_interpreted(), np.errstate(all="ignore"):  # an overflow is judged by the values
            interpreter.InterpretedFunction(fn)[grid](*args)
    except Exception as err:  # noqa: BLE001 - a kernel's exception is the student's message
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "NotImplementedError" in text:
            return audit, "the kernel raised NotImplementedError: fill in the lines marked YOUR CODE HERE"
        return audit, f"the kernel raised {type(err).__name__}: {text[:300]}"
    return audit, None


def memory_problem(audit: MemoryAudit, outputs: list[Guarded], hints: dict | None = None) -> str | None:
    """The first stray store or load (or a written guard), with advice; `hints` maps a tensor name to advice
    for a stray load near it (a bad offset rather than a missing mask)."""
    if audit.bad_store:
        if " at lane 0 " in audit.bad_store:  # even the row's first element is outside: the offset is wrong
            return (
                f"{audit.bad_store}: the whole row lies outside the tensor, so no mask can help: check the row "
                f"offset (which program id is b and which t, and the stride between rows and examples)"
            )
        return f"{audit.bad_store}: mask every tl.store (mask=offs < D) so the lanes past a row's end write nothing"
    if audit.bad_load:
        advice = next(
            (text for name, text in (hints or {}).items() if f" of {name} (" in audit.bad_load),
            "mask every tl.load (mask=offs < D) and check the row offsets",
        )
        return f"{audit.bad_load}: an out-of-bounds read (a GPU returns garbage or faults); {advice}"
    for g in outputs:
        if g.guard_written():
            return f"the kernel wrote outside {g.name}: mask every tl.store (mask=offs < D)"
    return None


def written_mask(audit: MemoryAudit | None, out: torch.Tensor) -> torch.Tensor | None:
    """Which elements of `out` some tl.store wrote (None when the stores were not audited)."""
    if audit is None or not audit.available:
        return None
    mask = torch.zeros(out.numel(), dtype=torch.bool)
    start, size = out.data_ptr(), out.element_size()
    for ptrs in audit.stored:
        offsets = (ptrs.astype(np.int64) - start) // size
        mask[torch.from_numpy(offsets[(offsets >= 0) & (offsets < out.numel())])] = True
    return mask.view(out.shape)


def unwritten(x: torch.Tensor, dims, name: str = "x", written: torch.Tensor | None = None) -> str | None:
    """The first NaN of the output `name`: never written, or written with a NaN (the audit tells which)."""
    nan = x.isnan()
    if not bool(nan.any()):
        return None
    first = tuple(int(i) for i in nan.nonzero()[0])
    where = f"{name}[{', '.join(f'{d}={i}' for d, i in zip(dims, first))}]"
    if written is not None and bool(written[first]):
        return (
            f"{where} was written, but with NaN: the value stored came from memory the kernel had not set. "
            f"The checker fills {name} with NaN before the launch: an accumulator loaded from {name} (or from "
            f"tl.load without a mask's `other=`) starts from NaN; start it from tl.zeros"
        )
    return (
        f"{where} was never written (it still holds the NaN the checker filled {name} with): "
        f"every program must store its whole row"
    )


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# ---- concat_kernel ---------------------------------------------------------------------------------------

KERNEL_CASES = [(2, 2, 3, 5), (1, 1, 1, 6), (3, 1, 2, 4)]  # (B, n_p, n, D): 10 + 2 + 9 programs
DRAWN_KERNEL_CASES = 6  # seeded draws on top, at most 12 programs each: the interpreter takes ~1 ms a program


def kernel_case(gen, B, n_p, n, D, V=7, extra_ctx=2) -> Case:
    args = (
        torch.randn(n_p, D, generator=gen),
        torch.randn(V, D, generator=gen),
        torch.randint(0, V, (B, n), generator=gen),
        torch.randn(n_p + n + extra_ctx, D, generator=gen),
    )
    return Case(dict(B=B, n_p=n_p, n=n, D=D), args, "fills wpe: n_p + n = n_ctx" if extra_ctx == 0 else "")


def draw_kernel_case(gen) -> Case:
    B, n_p = randint(gen, 1, 3), randint(gen, 1, 3)
    n = randint(gen, 1, max(1, 12 // B - n_p))  # B * (n_p + n) <= 12 programs, mostly
    return kernel_case(gen, B, n_p, n, randint(gen, 1, 37), V=randint(gen, 2, 9), extra_ctx=pick(gen, [0, 0, 2]))


def concat_kernel_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(5)
    return [kernel_case(gen, *sizes) for sizes in KERNEL_CASES] + draw_cases(5, DRAWN_KERNEL_CASES, draw_kernel_case)


def check_concat_kernel(kernel) -> CheckResult:
    """kernel(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D), launched on grid (B, n_p + n): equation (1)."""
    try:
        import_triton()
    except ImportError:
        return failed("concat_kernel", NO_TRITON)
    cases, results, first, gots = concat_kernel_cases(), [], None, []
    references = [concat_reference(*case.args) for case in cases]  # before the kernel runs
    for case, expected in zip(cases, references):
        prompt, wte, idx, wpe = case.args
        B, n = idx.shape
        n_p, D = prompt.shape
        X = Guarded.empty("x", (B, n_p + n, D), torch.float32)
        inputs = [
            Guarded.around("P", prompt, float("nan")),
            Guarded.around("wte", wte, float("nan")),
            Guarded.around("wpe", wpe, float("nan")),
            Guarded.around("idx", idx, 0),
        ]
        P, WTE, WPE, IDX = (g.view for g in inputs)
        audit, error = run_interpreted(
            kernel,
            (B, n_p + n),
            (X.view, P, WTE, WPE, IDX, n_p, n, D, next_power_of_2(D)),
            {g.name: g.view for g in [X, *inputs]},
        )
        got = X.view.clone()
        problem = error or memory_problem(
            audit, [X], {"idx": "the token of row t >= n_p is idx[b, t - n_p], at IDX + b * n + (t - n_p)"}
        )
        gots.append(got if problem is None else None)  # an output worth comparing with the named mistakes
        if problem is None:
            problem = unwritten(got, ("b", "t", "d"), "x", written_mask(audit, X.view)) or first_difference(
                expected, got, dims=("b", "t", "d"), shape_doc="(B, n_p + n, D)", atol=1e-6, rtol=1e-6, name="x"
            )
        results.append((case, problem is None))
        if problem and first is None:
            first = (case, problem)
    if first and "first difference" in first[1]:
        first = (
            first[0],
            first[1].rstrip(".") + "." + diagnose_all(CONCAT_MISTAKES, cases, gots, 1e-6, 1e-6, first=first[0]),
        )
    return _report("concat_kernel", cases, results, first, audit_note(audit))


def audit_note(audit: MemoryAudit | None) -> str:
    if audit is not None and not audit.available:
        return " (This Triton version hides its memory calls: loads were not audited, the guards checked stores.)"
    return " Every load and store stayed inside its tensor."


def _report(exercise: str, cases, results, first, note: str = "") -> CheckResult:
    tried = [case.label() for case in cases]
    if first is None:
        return passed(exercise, f"{len(cases)} launches match the reference under the interpreter.{note}", tried)
    case, problem = first
    hint = size_hint(results) if "first difference" in problem else ""  # not for memory faults
    message = f"Case {case.label()}: {problem.rstrip('.')}.{hint}"
    return failed(exercise, message + f" Passed {sum(ok for _, ok in results)} of {len(cases)} cases.", tried)


# ---- batch_sum_kernel ------------------------------------------------------------------------------------


def batch_sum_reference(dx, n_p):
    return dx[:, :n_p].double().sum(dim=0).to(dx.dtype)  # (n_p, D), summed in float64


def batch_sum_case(gen, B, n_p, n, D) -> Case:
    return Case(dict(B=B, n_p=n_p, n=n, D=D), (torch.randn(B, n_p + n, D, generator=gen), n_p))


def batch_sum_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(6)
    fixed = [batch_sum_case(gen, *sizes) for sizes in [(3, 2, 3, 5), (1, 1, 1, 4), (4, 3, 1, 3)]]
    return fixed + draw_cases(
        6,
        DRAWN_KERNEL_CASES,
        lambda g: batch_sum_case(g, randint(g, 1, 6), randint(g, 1, 4), randint(g, 1, 5), randint(g, 1, 37)),
    )


def _rows_with_stride(dx, n_p, row_stride):
    """dP[t] = sum_b of flat row (b * row_stride + t): the batch stride a student may write instead of T."""
    flat = dx.reshape(-1, dx.shape[-1])
    return torch.stack([sum(flat[b * row_stride + t] for b in range(dx.shape[0])) for t in range(n_p)])


BATCH_SUM_MISTAKES = [
    Mistake(
        "the sum is divided by B (a mean over the batch): dL/dP is a sum, each example adds its own share",
        lambda dx, n_p: dx[:, :n_p].mean(dim=0),
    ),
    Mistake(
        "only example b = 0 is read: the loop over the batch is missing (right for B = 1 only)",
        lambda dx, n_p: dx[0, :n_p].clone(),
    ),
    Mistake(
        "example b is looked for at row b * n_p instead of b * T (T = n_p + n): the batch stride of dx is "
        "T * D, since every example has all T rows",
        lambda dx, n_p: _rows_with_stride(dx, n_p, n_p),
    ),
    Mistake("the loop stops one example early (range(B - 1))", lambda dx, n_p: dx[:-1, :n_p].sum(dim=0)),
    Mistake("the loop skips example b = 0 (range(1, B))", lambda dx, n_p: dx[1:, :n_p].sum(dim=0)),
]


def check_batch_sum_kernel(kernel) -> CheckResult:
    """kernel(DX, DP, B, T, D, BLOCK_D) on grid (n_p,): dP[t] = sum_b dX[b, t], no atomics, run-to-run identical."""
    try:
        import_triton()
    except ImportError:
        return failed("batch_sum_kernel", NO_TRITON)
    cases, results, first, audit, gots = batch_sum_cases(), [], None, None, []
    references = [batch_sum_reference(*case.args) for case in cases]  # before the kernel runs
    for case, expected in zip(cases, references):
        dx, n_p = case.args
        B, T, D = dx.shape
        runs = []
        for _ in range(2):  # twice: a deterministic reduction gives the same bits every time
            DP = Guarded.empty("dP", (n_p, D), torch.float32)
            DX = Guarded.around("dx", dx, float("nan"))
            audit, error = run_interpreted(
                kernel, (n_p,), (DX.view, DP.view, B, T, D, next_power_of_2(D)), {"dx": DX.view, "dP": DP.view}
            )
            runs.append((audit, error, DP))
            if error:
                break
        audit, error, DP = runs[0]
        got = DP.view.clone()
        problem = error
        if problem is None and audit.atomics:
            problem = (
                f"the kernel uses atomic operations ({audit.atomics} calls, e.g. tl.atomic_add): on a GPU "
                f"the programs then add in whatever order they finish, and dP changes in its last bits "
                f"from run to run. Let one program own each row t and loop over b"
            )
        problem = problem or memory_problem(audit, [DP])
        gots.append(got if problem is None else None)
        if problem is None:
            problem = unwritten(got, ("t", "d"), "dP", written_mask(audit, DP.view)) or first_difference(
                expected, got, dims=("t", "d"), shape_doc="(n_p, D)", atol=1e-5, rtol=1e-5, name="dP"
            )
            if (
                problem
                and "first difference" in problem
                and bool(((got - expected).abs() <= 1e-2 * expected.abs().max()).all())
            ):
                problem += (
                    ". The values are all within 1% of the sum: is the accumulator in a lower precision "
                    "(float16, bfloat16)? Accumulate in float32: tl.zeros((BLOCK_D,), dtype=tl.float32)"
                )
        if problem is None and not _equal(got.view(torch.int32), runs[1][2].view.view(torch.int32)):
            problem = "two runs on the same input gave different bits: the reduction is not deterministic"
        results.append((case, problem is None))
        if problem and first is None:
            first = (case, problem)
    if first and "first difference" in first[1] and "within 1%" not in first[1]:
        first = (
            first[0],
            first[1].rstrip(".") + "." + diagnose_all(BATCH_SUM_MISTAKES, cases, gots, 1e-5, 1e-5, first=first[0]),
        )
    note = audit_note(audit) + " Two runs gave identical bits, and no atomics were used."
    return _report("batch_sum_kernel", cases, results, first, note)


# ---- concat_launcher -------------------------------------------------------------------------------------


@dataclass
class Launch:
    grid: tuple
    args: dict  # the kernel's parameter name -> value
    ran: bool = False


class KernelSpy:
    """Stands in for the kernel handed to the launcher: `spy[grid](*args)` records the launch, and runs the
    reference kernel only when the launch is safe (ids inside the table, positions inside wpe)."""

    def __init__(self, reference_kernel):
        self.reference = reference_kernel
        self.signature = inspect.signature(python_function(reference_kernel))
        self.launches: list[Launch] = []
        self.audit: MemoryAudit | None = None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        bound = self.signature.bind(*args, **kwargs).arguments  # TypeError for wrong arguments, as Triton would
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))
        launch = Launch(grid, dict(bound))
        self.launches.append(launch)
        if launch_problem(launch) is None:
            tensors = {
                name: bound[key]
                for name, key in [("x", "X"), ("P", "P"), ("wte", "WTE"), ("wpe", "WPE"), ("idx", "IDX")]
            }
            self.audit, error = run_interpreted(self.reference, grid, tuple(bound.values()), tensors)
            if error:
                raise RuntimeError(error)
            launch.ran = True


def launch_problem(launch: Launch) -> str | None:
    """What is wrong with a launch, judged from its arguments (the grid is judged against the output)."""
    a = launch.args
    missing = [k for k in ("X", "P", "WTE", "WPE", "IDX", "n_p", "n", "D", "BLOCK_D") if k not in a]
    if missing:
        return f"the kernel was launched without {', '.join(missing)}"
    IDX, WTE, WPE = a["IDX"], a["WTE"], a["WPE"]
    if not all(isinstance(t, torch.Tensor) for t in (a["X"], a["P"], WTE, WPE, IDX)):
        return "X, P, WTE, WPE and IDX must be tensors"
    V = WTE.shape[0]
    if IDX.numel() and (int(IDX.min()) < 0 or int(IDX.max()) >= V):
        bad = int(IDX.max()) if int(IDX.max()) >= V else int(IDX.min())
        return (
            f"the kernel was launched with token id {bad}, outside [0, V) = [0, {V}): a GPU kernel would read "
            f"a row that is not in wte (garbage or a fault, no error). Check idx.min() >= 0 and idx.max() < V "
            f"and raise ValueError before the launch"
        )
    T = a["P"].shape[0] + IDX.shape[1]
    if T > WPE.shape[0]:
        return (
            f"the kernel was launched for n_p + n = {T} positions but wpe has only n_ctx = {WPE.shape[0]} rows: "
            f"check n_p + n <= n_ctx and raise ValueError before the launch"
        )
    if a["X"].dtype != WTE.dtype:
        return (
            f"x was allocated as {str(a['X'].dtype).replace('torch.', '')} for a wte of "
            f"{str(WTE.dtype).replace('torch.', '')}: allocate x in wte's dtype (dtype=wte.dtype)"
        )
    if a["P"].shape[1] != WTE.shape[1] or WPE.shape[1] != WTE.shape[1]:
        return (
            f"the kernel was launched with rows of different widths (P {tuple(a['P'].shape)}, wte "
            f"{tuple(WTE.shape)}, wpe {tuple(WPE.shape)}): check that they share D and raise ValueError"
        )
    BLOCK_D, D = a["BLOCK_D"], a["D"]
    if not isinstance(BLOCK_D, int) or BLOCK_D < 1 or BLOCK_D & (BLOCK_D - 1):
        return (
            f"BLOCK_D={BLOCK_D} is not a power of two: tl.arange(0, BLOCK_D) needs one; use "
            f"triton.next_power_of_2(D) and let the mask cut the extra lanes"
        )
    if BLOCK_D < D:
        return f"BLOCK_D={BLOCK_D} < D={D}: each program would cover only part of its row"
    return None


def launcher_cases():
    """Valid inputs (the output is compared) and invalid ones (each must raise ValueError, never launch).

    The valid ones include a sequence that exactly fills wpe (n_p + n = n_ctx is allowed) and tables in float64
    and float16 (x takes wte's dtype); the invalid ones are every case the spec names: a token id of V and of
    -1, a sequence longer than wpe, and each of P and wpe with a width other than wte's."""
    gen = torch.Generator().manual_seed(7)

    def inputs(B, n_p, n, D, V=7, n_ctx=None, dtype=torch.float32):
        return (
            torch.randn(n_p, D, generator=gen, dtype=dtype),
            torch.randn(V, D, generator=gen, dtype=dtype),
            torch.randint(0, V, (B, n), generator=gen),
            torch.randn(n_ctx or n_p + n + 2, D, generator=gen, dtype=dtype),
        )

    def draw(g):
        B, n_p, n, D = randint(g, 1, 3), randint(g, 1, 3), randint(g, 1, 3), randint(g, 1, 19)
        dtype = pick(g, [torch.float32, torch.float64, torch.float16])
        fills = bool(randint(g, 0, 1))
        args = (
            torch.randn(n_p, D, generator=g, dtype=dtype),
            torch.randn(5, D, generator=g, dtype=dtype),
            torch.randint(0, 5, (B, n), generator=g),
            torch.randn(n_p + n + (0 if fills else 3), D, generator=g, dtype=dtype),
        )
        notes = [{torch.float32: "", torch.float64: "fp64", torch.float16: "fp16"}[dtype]]
        return Case(dict(B=B, n_p=n_p, n=n, D=D), args, ", ".join(x for x in notes + ["fills wpe"] * fills if x))

    valid = [
        Case(dict(B=2, n_p=2, n=3, D=5), inputs(2, 2, 3, 5)),
        Case(dict(B=1, n_p=1, n=1, D=8), inputs(1, 1, 1, 8)),
        Case(dict(B=2, n_p=2, n=2, D=6), inputs(2, 2, 2, 6, n_ctx=4), "fills wpe: n_p + n = n_ctx = 4"),
        Case(dict(B=1, n_p=2, n=2, D=3), inputs(1, 2, 2, 3, dtype=torch.float64), "fp64"),
        Case(dict(B=2, n_p=1, n=2, D=4), inputs(2, 1, 2, 4, dtype=torch.float16), "fp16"),
    ]
    valid += draw_cases(7, 4, draw)
    invalid = []
    P, wte, idx, wpe = inputs(2, 2, 3, 5)
    idx_big, idx_neg = idx.clone(), idx.clone()
    idx_big[1, 2] = wte.shape[0]  # one past the last row
    idx_neg[0, 1] = -1
    invalid.append(Case(dict(B=2, n_p=2, n=3, D=5), (P, wte, idx_big, wpe), f"a token id equal to V = {len(wte)}"))
    invalid.append(Case(dict(B=2, n_p=2, n=3, D=5), (P, wte, idx_neg, wpe), "a token id of -1"))
    invalid.append(Case(dict(B=2, n_p=2, n=3, D=5), (P, wte, idx, wpe[:4]), "n_p + n = 5 > n_ctx = 4"))
    invalid.append(
        Case(
            dict(B=2, n_p=2, n=3, D=5),
            (torch.randn(2, 6, generator=gen), wte, idx, wpe),
            "a prompt of width 6 for a table of width 5",
        )
    )
    invalid.append(
        Case(
            dict(B=2, n_p=2, n=3, D=5),
            (P, wte, idx, torch.randn(len(wpe), 6, generator=gen)),
            "a wpe of width 6 for a table of width 5",
        )
    )
    invalid.append(
        Case(
            dict(B=2, n_p=2, n=3, D=5),
            (P, wte, idx, torch.randn(len(wpe), 4, generator=gen)),
            "a wpe of width 4 for a table of width 5",
        )
    )
    return valid, invalid


def check_concat_launcher(launcher) -> CheckResult:
    """launcher(kernel, prompt, wte, idx, wpe) -> x: validate, allocate, pick BLOCK_D and the grid, launch once."""
    exercise = "concat_launcher"
    try:
        import_triton()
        from .kernel_solutions import concat_kernel
    except ImportError:
        return failed(exercise, NO_TRITON)
    if not callable(launcher):
        return failed(exercise, f"the answer must be a function, got {type(launcher).__name__}")
    valid, invalid = launcher_cases()
    tried = [c.label() for c in valid] + [c.note for c in invalid]
    for case in valid:
        problem = _valid_launch_problem(launcher, concat_kernel, case)
        if problem:
            return failed(exercise, f"Case {case.label()}: {problem}", tried)
    for case in invalid:
        spy = KernelSpy(concat_kernel)
        try:
            with torch.random.fork_rng(devices=[]):
                launcher(spy, *case.args)
            error = None
        except ValueError:
            error = "ValueError"
        except NotImplementedError:
            return failed(exercise, "raised NotImplementedError: fill in the lines marked YOUR CODE HERE", tried)
        except Exception as err:  # noqa: BLE001
            error = type(err).__name__
        if spy.launches:
            reason = launch_problem(spy.launches[0]) or "the kernel was launched"
            return failed(exercise, f"Inputs with {case.note}: {reason}.", tried)
        if error != "ValueError":
            what = f"raised {error}" if error else "returned without an error"
            return failed(
                exercise,
                f"Inputs with {case.note}: the launcher {what}; it must raise ValueError "
                f"(with a message that says what is wrong) before launching.",
                tried,
            )
    return passed(
        exercise,
        f"{len(valid)} launches match the reference; {len(invalid)} invalid inputs were "
        f"refused with ValueError before any launch.",
        tried,
    )


def _valid_launch_problem(launcher, reference_kernel, case: Case) -> str | None:
    prompt, wte, idx, wpe = case.args
    B, n = idx.shape
    n_p, D = prompt.shape
    spy = KernelSpy(reference_kernel)
    try:
        with torch.random.fork_rng(devices=[]):
            x = launcher(spy, *(a.clone() for a in case.args))
    except NotImplementedError:
        return "raised NotImplementedError: fill in the lines marked YOUR CODE HERE"
    except Exception as err:  # noqa: BLE001
        if spy.launches and launch_problem(spy.launches[0]):
            return launch_problem(spy.launches[0]) + "."
        return f"raised {type(err).__name__}: {str(err).strip()[:300]}"
    if len(spy.launches) != 1:
        return f"the kernel was launched {len(spy.launches)} times; launch it once, on a grid of (B, n_p + n)"
    launch = spy.launches[0]
    problem = launch_problem(launch)
    if problem:
        return problem + "."
    grid = launch.grid + (1,) * (3 - len(launch.grid))
    if grid != (B, n_p + n, 1):
        return (
            f"grid {launch.grid} launches {int(np.prod(launch.grid))} programs, but x has B x (n_p + n) = "
            f"{B} x {n_p + n} rows: one program per row (b, t), grid (B, n_p + n)."
        )
    scalars = {"n_p": n_p, "n": n, "D": D}
    for name, value in scalars.items():
        if launch.args[name] != value:
            return f"the kernel was launched with {name}={launch.args[name]}, expected {value}"
    problem = first_difference(
        concat_reference(*case.args), x, dims=("b", "t", "d"), shape_doc="(B, n_p + n, D)", atol=1e-6, rtol=1e-6
    )
    if problem and isinstance(x, torch.Tensor) and x.data_ptr() != launch.args["X"].data_ptr():
        problem += " (the tensor returned is not the X the kernel wrote)"
    return problem + "." if problem else None


CHECKERS = {
    "concat_kernel": check_concat_kernel,
    "concat_launcher": check_concat_launcher,
    "batch_sum_kernel": check_batch_sum_kernel,
}
