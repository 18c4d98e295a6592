"""What a check returns, and the machinery every checker shares: cases, safe calls, the first difference.

A checker tries a student's answer on a list of `Case`s, compares each output with a reference, and reports
the first case that fails, with the seed that drew it, so that the failure can be reproduced:

    concat: not yet. Case seed 1003, B=2, n_p=1, n=3, D=7: x: first difference at (b=0, t=1, d=0): expected
    0.4213, got -0.1022 (12 of 56 entries differ). This is what you get when ...

The cases are a few hand-made edge cases plus draws from seeded generators (`draw_cases`): irregular sizes,
B = 1 and B > 1, n_p = 1, a sequence that exactly fills the context, float64 and, where the spec allows it,
float16. It never raises on a wrong answer: an exception inside the answer becomes the message of a failed
result. When the outputs match a known mistake (`Mistake`) on every case, the message names it; when the
failures are exactly the cases where one size exceeds 1, it says that too.

The judge is kept out of the answer's reach: every reference output is computed before the answer is first
called, and the comparisons use torch functions taken when this module was imported (`_isclose`, `_equal`,
`_allclose`), so an answer (or a notebook cell) that patches `torch.allclose` cannot change a verdict.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "Case",
    "CheckResult",
    "Mistake",
    "NOT_STARTED",
    "SIZE_WORDS",
    "call_answer",
    "check_function",
    "describe_exception",
    "diagnose",
    "diagnose_all",
    "draw_cases",
    "dtype_name",
    "failed",
    "first_difference",
    "fmt",
    "fresh",
    "index_text",
    "inputs_changed",
    "matches",
    "passed",
    "pick",
    "randint",
    "size_hint",
]

# Taken once, when minipt.exercises is imported (before any student code runs): see the module docstring.
_isclose, _equal, _allclose = torch.isclose, torch.equal, torch.allclose


@dataclass
class CheckResult:
    """The outcome of `check(exercise_id, answer)`: `.passed`, and a message that says what differs."""

    exercise: str
    passed: bool
    message: str = ""
    tried: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.passed:
            text = f"{self.exercise}: passed."
            if self.message:
                text += f" {self.message[:1].upper()}{self.message[1:]}"
        else:
            text = f"{self.exercise}: not yet. {self.message[:1].upper()}{self.message[1:]}"
        if self.tried:
            text += "\n  tried: " + "; ".join(self.tried)
        return text

    def __repr__(self) -> str:  # a notebook shows the result as its message
        return str(self)

    def to_dict(self) -> dict:
        return {"exercise": self.exercise, "passed": self.passed, "message": self.message, "tried": list(self.tried)}


NOT_STARTED = (
    "the answer raises NotImplementedError: fill in the lines marked YOUR CODE HERE (and delete the "
    "raise), then run the check again."
)


def passed(exercise: str, message: str = "", tried: Sequence[str] = ()) -> CheckResult:
    return CheckResult(exercise, True, message, tuple(tried))


def failed(exercise: str, message: str, tried: Sequence[str] = ()) -> CheckResult:
    return CheckResult(exercise, False, message, tuple(tried))


@dataclass
class Case:
    """One set of inputs: `sizes` (printed, and used for the B = 1 hint), `args` for the answer."""

    sizes: dict
    args: tuple
    note: str = ""  # what is special about the case: "fp64", "large logits", ...
    seed: int | None = None  # the seed of the generator that drew the case (None: a hand-made case)

    def label(self) -> str:
        text = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        if self.seed is not None:
            text = f"seed {self.seed}, {text}"
        return f"{text} ({self.note})" if self.note else text


def draw_cases(base_seed: int, count: int, draw: Callable) -> list[Case]:
    """`count` cases, case i drawn by `draw(generator, seed)` from its own generator seeded base_seed * 1000 + i:
    a failing case can be drawn again from the seed in its label."""
    cases = []
    for i in range(count):
        seed = base_seed * 1000 + i
        case = draw(torch.Generator().manual_seed(seed))
        case.seed = seed
        cases.append(case)
    return cases


def pick(gen: torch.Generator, options: Sequence):
    """One of `options`, drawn with `gen`."""
    return options[int(torch.randint(0, len(options), (1,), generator=gen))]


def randint(gen: torch.Generator, low: int, high: int) -> int:
    """An int in [low, high], drawn with `gen`."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


@dataclass
class Mistake:
    """A plausible wrong answer, written once, so that a failing output can be recognised and named."""

    explanation: str  # completes "This is what you get when ..."
    fn: Callable = field(repr=False)


def fresh(args: tuple) -> tuple:
    """Deep copies of the inputs, so that an answer that writes into them cannot spoil the next call."""
    return tuple(a.detach().clone() if isinstance(a, torch.Tensor) else copy.deepcopy(a) for a in args)


def call_answer(answer: Callable, args: tuple):
    """(output, None) or (None, "raised TypeError: ..."): an answer's exception never leaves the checker.

    The global RNG is forked, so a check leaves the notebook's random state as it found it.
    """
    try:
        with torch.random.fork_rng(devices=[]):
            return answer(*args), None
    except NotImplementedError:
        return None, "raised NotImplementedError: fill in the lines marked YOUR CODE HERE"
    except Exception as err:  # noqa: BLE001 - any exception of a student's answer is reported, not raised
        return None, f"raised {describe_exception(err)}"


def describe_exception(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if "NotImplementedError" in first:  # Triton's interpreter wraps a kernel's exception in its own
        return "NotImplementedError: fill in the lines marked YOUR CODE HERE"
    return f"{type(err).__name__}: {first[:300]}" if first else type(err).__name__


def fmt(value: float) -> str:
    return f"{value:.6g}"


def index_text(index: Sequence[int], dims: Sequence[str]) -> str:
    names = list(dims) if len(dims) == len(index) else [f"i{k}" for k in range(len(index))]
    return "(" + ", ".join(f"{name}={i}" for name, i in zip(names, index)) + ")"


def first_difference(
    expected: torch.Tensor, got, *, dims: Sequence[str], shape_doc: str, atol: float, rtol: float, name: str = ""
) -> str | None:
    """None when `got` matches `expected`; else the first thing that differs: type, shape, dtype or a value.
    `name` (the tensor under test, e.g. "x") starts the message."""
    head = f"{name}: " if name else ""
    if not isinstance(got, torch.Tensor):
        return f"{head}returned {type(got).__name__}, expected a tensor of shape {shape_doc} = {tuple(expected.shape)}"
    if got.shape != expected.shape:
        return f"{head}shape: expected {shape_doc} = {tuple(expected.shape)}, got {tuple(got.shape)}"
    if got.dtype != expected.dtype:
        return f"{head}dtype: expected {dtype_name(expected.dtype)}, got {dtype_name(got.dtype)}"
    got = got.detach().cpu()
    close = _isclose(got, expected, atol=atol, rtol=rtol)
    if bool(close.all()):
        return None
    wrong = (~close).nonzero()
    first = tuple(int(i) for i in wrong[0])
    return (
        f"{head}first difference at {index_text(first, dims)}: expected {fmt(expected[first].item())}, "
        f"got {fmt(got[first].item())} ({len(wrong)} of {expected.numel()} entries differ)"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def matches(out, got, atol: float, rtol: float) -> bool:
    """True when a mistake's output `out` is the student's output `got` (NaN equal to NaN)."""
    return (
        isinstance(out, torch.Tensor)
        and isinstance(got, torch.Tensor)
        and out.shape == got.shape
        and out.dtype == got.dtype
        and bool(_isclose(got.detach().cpu(), out, atol=atol, rtol=rtol, equal_nan=True).all())
    )


def diagnose(mistakes: Sequence[Mistake], args: tuple, got, atol: float, rtol: float) -> str:
    """'This is what you get when ...' for the first known mistake whose output on `args` is `got`."""
    for mistake in mistakes:
        try:
            out = mistake.fn(*fresh(args))
        except Exception:  # noqa: BLE001 - a mistake that cannot run on this case says nothing
            continue
        if matches(out, got, atol, rtol):
            return f" This is what you get when {mistake.explanation}."
    return ""


def diagnose_all(
    mistakes: Sequence[Mistake],
    cases: Sequence[Case],
    gots: Sequence,
    atol: float,
    rtol: float,
    first: Case | None = None,
) -> str:
    """'This is what you get when ...' for the first known mistake whose output equals the answer's on the first
    failing case (`first`) and on every other case where both return something: a mistake that matches one
    case by coincidence is not named."""
    shown = [(case, got) for case, got in zip(cases, gots) if got is not None]
    for mistake in mistakes:
        agree = set()
        for case, got in shown:
            try:
                out = mistake.fn(*fresh(case.args))
            except Exception:  # noqa: BLE001 - a mistake that cannot run on this case says nothing about it
                continue
            if not matches(out, got, atol, rtol):
                break
            agree.add(id(case))
        else:
            if agree and (first is None or id(first) in agree):
                return f" This is what you get when {mistake.explanation}."
    return ""


SIZE_WORDS = {
    "B": "the batch dimension (every example, not just the first)",
    "n_p": "every prompt row, not just the first",
    "n": "every input token, not just the first",
    "N": "every row, not just the first",
}


def size_hint(results: Sequence[tuple[Case, bool]], words: dict | None = None) -> str:
    """'Passes every case with B = 1 ...' when the failures are exactly the cases where one size exceeds 1.

    Only one size may fit: when the failing cases are also those where another size exceeds 1, the hint would
    guess, so it says nothing. `words` names what each size counts in this exercise (K: classes or prompts)."""
    words = {**SIZE_WORDS, **(words or {})}
    fits = []
    for key in words:
        with_one = [ok for case, ok in results if case.sizes.get(key) == 1]
        with_more = [ok for case, ok in results if case.sizes.get(key, 1) > 1]
        if with_one and all(with_one) and with_more and not any(with_more):
            fits.append(key)
    if len(fits) != 1:
        return ""
    key = fits[0]
    return f" Your answer passes every case with {key} = 1 and fails when {key} > 1: check {words[key]}."


def inputs_changed(before: tuple, after: tuple, names: Sequence[str]) -> str | None:
    """The name of the first input tensor the answer wrote into, if any."""
    for name, a, b in zip(names, before, after):
        if isinstance(a, torch.Tensor) and not _equal(a, b):
            return name
    return None


def check_function(
    exercise: str,
    answer: Callable,
    cases: Sequence[Case],
    reference: Callable | None = None,
    *,
    arg_names: Sequence[str],
    dims: Sequence[str],
    shape_doc: str,
    name: str = "",
    mistakes: Sequence[Mistake] = (),
    atol: float = 1e-6,
    rtol: float = 1e-6,
    expected: Sequence[torch.Tensor] | None = None,
    tolerances: Callable | None = None,
    size_words: dict | None = None,
) -> CheckResult:
    """Try `answer` on every case against the reference; report the first failure, named when we can.

    The expected outputs (`expected`, or `reference` applied to each case) are all computed before the answer
    is first called. `tolerances(case)` may give (atol, rtol) per case (float16 cases need looser ones)."""
    if not callable(answer):
        return failed(exercise, f"the answer must be a function, got {type(answer).__name__}")
    if expected is None:
        expected = [reference(*fresh(case.args)) for case in cases]
    results, gots, first_failure = [], [], None
    for case, want in zip(cases, expected):
        a_tol, r_tol = tolerances(case) if tolerances else (atol, rtol)
        given = fresh(case.args)
        got, error = call_answer(answer, given)
        problem = error or first_difference(
            want, got, dims=dims, shape_doc=shape_doc, atol=a_tol, rtol=r_tol, name=name
        )
        if problem is None:
            changed = inputs_changed(case.args, given, arg_names)
            if changed:
                problem = f"the answer wrote into its input `{changed}`; leave the inputs unchanged"
        results.append((case, problem is None))
        gots.append(got.detach().cpu() if isinstance(got, torch.Tensor) else None)
        if problem and first_failure is None:
            first_failure = (case, problem, error, a_tol, r_tol)
    tried = [case.label() for case in cases]
    if first_failure is None:
        return passed(exercise, f"{len(cases)} cases match the reference.", tried)
    case, problem, error, a_tol, r_tol = first_failure
    message = f"Case {case.label()}: {problem.rstrip('.')}."
    if error is None:
        message += diagnose_all(mistakes, cases, gots, a_tol, r_tol, first=case)
    message += size_hint(results, size_words)
    message += f" Passed {sum(ok for _, ok in results)} of {len(cases)} cases."
    return failed(exercise, message, tried)
