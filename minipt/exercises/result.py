"""What a check returns, and the machinery every checker shares: cases, safe calls, the first difference.

A checker tries a student's answer on a list of `Case`s (irregular shapes on purpose: B = 1 and B > 1,
n_p = 1, odd D, n = 1), compares each output with a reference, and reports the first case that fails:

    concat: not yet. Case B=2, n_p=1, n=3, D=7: first difference at (b=0, t=1, d=0): expected 0.4213,
    got -0.1022 (12 of 56 entries differ). This is what you get when ...

It never raises on a wrong answer: an exception inside the answer becomes the message of a failed result.
When the output matches a known mistake (`Mistake`), the message names it; when every case with B = 1
passes and a case with B > 1 fails, it says that too.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


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
        return {"exercise": self.exercise, "passed": self.passed, "message": self.message,
                "tried": list(self.tried)}


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

    def label(self) -> str:
        text = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"{text} ({self.note})" if self.note else text


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


def first_difference(expected: torch.Tensor, got, *, dims: Sequence[str], shape_doc: str,
                     atol: float, rtol: float) -> str | None:
    """None when `got` matches `expected`; else the first thing that differs: type, shape, dtype or a value."""
    if not isinstance(got, torch.Tensor):
        return f"returned {type(got).__name__}, expected a tensor of shape {shape_doc} = {tuple(expected.shape)}"
    if got.shape != expected.shape:
        return f"shape: expected {shape_doc} = {tuple(expected.shape)}, got {tuple(got.shape)}"
    if got.dtype != expected.dtype:
        return f"dtype: expected {dtype_name(expected.dtype)}, got {dtype_name(got.dtype)}"
    got = got.detach().cpu()
    close = torch.isclose(got, expected, atol=atol, rtol=rtol)
    if bool(close.all()):
        return None
    wrong = (~close).nonzero()
    first = tuple(int(i) for i in wrong[0])
    return (f"first difference at {index_text(first, dims)}: expected {fmt(expected[first].item())}, "
            f"got {fmt(got[first].item())} ({len(wrong)} of {expected.numel()} entries differ)")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def matches(out, got, atol: float, rtol: float) -> bool:
    """True when a mistake's output `out` is the student's output `got` (NaN equal to NaN)."""
    return (isinstance(out, torch.Tensor) and isinstance(got, torch.Tensor) and out.shape == got.shape
            and out.dtype == got.dtype
            and bool(torch.isclose(got.detach().cpu(), out, atol=atol, rtol=rtol, equal_nan=True).all()))


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


def size_hint(results: Sequence[tuple[Case, bool]]) -> str:
    """'Passes every case with B = 1 ...' when the failures are exactly the cases where a size exceeds 1."""
    for key in ("B", "n_p", "n", "N", "K"):
        with_one = [ok for case, ok in results if case.sizes.get(key) == 1]
        with_more = [ok for case, ok in results if case.sizes.get(key, 1) > 1]
        if with_one and all(with_one) and with_more and not any(with_more):
            what = {"B": "the batch dimension (every example, not just the first)",
                    "n_p": "every prompt row, not just the first",
                    "n": "every input token, not just the first",
                    "N": "every row, not just the first",
                    "K": "every prompt of the ensemble"}[key]
            return f" Your answer passes every case with {key} = 1 and fails when {key} > 1: check {what}."
    return ""


def inputs_changed(before: tuple, after: tuple, names: Sequence[str]) -> str | None:
    """The name of the first input tensor the answer wrote into, if any."""
    for name, a, b in zip(names, before, after):
        if isinstance(a, torch.Tensor) and not torch.equal(a, b):
            return name
    return None


def check_function(exercise: str, answer: Callable, cases: Sequence[Case], reference: Callable, *,
                   arg_names: Sequence[str], dims: Sequence[str], shape_doc: str,
                   mistakes: Sequence[Mistake] = (), atol: float = 1e-6, rtol: float = 1e-6) -> CheckResult:
    """Try `answer` on every case against `reference`; report the first failure, named when we can."""
    if not callable(answer):
        return failed(exercise, f"the answer must be a function, got {type(answer).__name__}")
    results, first_failure = [], None
    for case in cases:
        expected = reference(*fresh(case.args))
        given = fresh(case.args)
        got, error = call_answer(answer, given)
        problem = error or first_difference(expected, got, dims=dims, shape_doc=shape_doc, atol=atol, rtol=rtol)
        if problem is None:
            changed = inputs_changed(case.args, given, arg_names)
            if changed:
                problem = f"the answer wrote into its input `{changed}`; leave the inputs unchanged"
        results.append((case, problem is None))
        if problem and first_failure is None:
            first_failure = (case, problem, got, error)
    tried = [case.label() for case in cases]
    if first_failure is None:
        return passed(exercise, f"{len(cases)} cases match the reference.", tried)
    case, problem, got, error = first_failure
    message = f"Case {case.label()}: {problem.rstrip('.')}."
    if error is None:
        message += diagnose(mistakes, case.args, got, atol, rtol)
    message += size_hint(results)
    message += f" Passed {sum(ok for _, ok in results)} of {len(cases)} cases."
    return failed(exercise, message, tried)
