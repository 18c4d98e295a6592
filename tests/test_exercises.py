"""minipt.exercises: each solution passes, each plausible wrong answer fails with a message naming the problem,
the student notebooks are generated from the solutions (and stale ones are caught), and the notebooks run.

The solutions are not repeated here: they are read out of the solution notebooks (the cells with a
BEGIN SOLUTION block) and executed in this process, so the code a student is shown is the code tested.
The kernel tests need Triton (Linux); the checker runs kernels under Triton's CPU interpreter itself.
"""

import functools
import linecache
import math
import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from minipt import PromptTuning, exercises
from minipt.exercises import EXERCISES, CheckResult
from minipt.exercises.__main__ import main
from minipt.exercises.build import BEGIN, END, build, default_folder, strip_solutions

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - macOS, Windows
    triton = tl = None

nbformat = pytest.importorskip("nbformat")

FOLDER = default_folder()
NOTEBOOKS = ["01_math", "02_kernel", "03_training", "04_capstone", "05_kernel_track", "06_predict_measure"]
needs_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed (Linux only)")
ROOT_FOLDERS = ("home", "Users", "root", "tmp", "work", "private", "var/folders", "opt", "usr")  # as test_notebooks
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.~])(" + "|".join(f"/{name}/" for name in ROOT_FOLDERS) + r"|site-packages|[A-Za-z]:\\)"
)


def solution_namespace(stem: str) -> dict:
    """The functions defined by the solution cells of notebooks/exercises/solutions/STEM.ipynb.

    tests/conftest.py sets TRITON_INTERPRET=1 on a machine without a GPU, where PromptTuning's backend="auto"
    would run the prompt-concat kernel in the interpreter (slow): here the solutions get backend="reference".
    """
    namespace = {
        "torch": torch,
        "F": F,
        "math": math,
        "triton": triton,
        "tl": tl,
        "PromptTuning": functools.partial(PromptTuning, backend="reference"),
    }
    nb = nbformat.read(FOLDER / "solutions" / f"{stem}.ipynb", as_version=4)
    for number, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and BEGIN in cell.source:
            if "@triton.jit" in cell.source and triton is None:
                continue
            filename = f"<{stem} cell {number}>"  # registered, so inspect (and Triton) can read the source
            linecache.cache[filename] = (len(cell.source), None, cell.source.splitlines(True), filename)
            exec(compile(cell.source, filename, "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def solutions() -> dict:
    ns = {}
    for stem in NOTEBOOKS:
        ns.update(solution_namespace(stem))
    return ns


SOLUTION_NAMES = {
    "concat": "concat",
    "concat_backward": "concat_backward",
    "frozen_head_backward": "frozen_head_backward",
    "causal_attention": "causal_attention",
    "concat_kernel": "concat_kernel",
    "concat_launcher": "launch_concat",
    "batch_sum_kernel": "batch_sum_kernel",
    "fix_snippet": "tune",
    "training_loop": "train",
    "vocab_init": "vocab_init",
    "label_init": "label_init",
    "ensemble_vote": "ensemble_vote",
    "capstone": "capstone",
    "head_ce_kernel": "head_ce_kernel",
    "decode_attention_kernel": "decode_attention_kernel",
    "predict_measure": "predict",
}  # the capstone's answer is a dict of pieces: see capstone_pieces
KERNEL_EXERCISES = {"concat_kernel", "concat_launcher", "batch_sum_kernel", "head_ce_kernel", "decode_attention_kernel"}


def rejects(exercise_id, answer, *phrases) -> CheckResult:
    result = exercises.check(exercise_id, answer)
    assert isinstance(result, CheckResult) and not result.passed, f"{exercise_id} accepted a wrong answer"
    text = str(result)
    assert text.startswith(f"{exercise_id}: not yet.")
    for phrase in phrases:
        assert phrase in text or phrase in result.message, f"{exercise_id}: {phrase!r} not in the message:\n{text}"
    return result


# ---- the list and the API -------------------------------------------------------------------------------


def test_exercise_list():
    assert len(EXERCISES) >= 8
    assert {"concat", "concat_backward", "frozen_head_backward"} <= set(EXERCISES)
    assert set(SOLUTION_NAMES) == set(EXERCISES)
    for ex in EXERCISES.values():
        assert ex.title and ex.goal and ex.signature and 5 <= ex.minutes <= 60
        assert ex.notebook in NOTEBOOKS
    for stem in NOTEBOOKS:  # each notebook checks exactly its own exercises
        source = "".join(c.source for c in nbformat.read(FOLDER / f"{stem}.ipynb", as_version=4).cells)
        checked = set(re.findall(r'exercises\.check\("(\w+)"', source))
        assert checked == {ex.id for ex in EXERCISES.values() if ex.notebook == stem}, stem


@pytest.mark.parametrize("exercise_id", list(SOLUTION_NAMES))
def test_solution_passes(solutions, exercise_id):
    if exercise_id in KERNEL_EXERCISES and triton is None:
        pytest.skip("Triton is not installed")
    if exercise_id == "capstone":
        pytest.skip("the capstone's solution trains for ~20 s: test_notebooks_run_and_grade runs and grades it")
    result = exercises.check(exercise_id, solutions[SOLUTION_NAMES[exercise_id]])
    assert result.passed, str(result)
    assert str(result).startswith(f"{exercise_id}: passed.") and "tried:" in str(result)
    assert exercises.results()[exercise_id] is result


def test_message_names_index_values_and_inputs():
    def positions_restart(prompt, wte, idx, wpe):
        B, n = idx.shape
        n_p = prompt.shape[0]
        return torch.cat([(prompt + wpe[:n_p]).expand(B, -1, -1), wte[idx] + wpe[:n]], dim=1)

    result = rejects("concat", positions_restart, "wpe[0:n] instead of wpe[n_p:n_p + n]")
    assert re.search(
        r"Case B=2, n_p=3, n=4, D=8: x: first difference at \(b=0, t=3, d=0\): expected -?[\d.]+, "
        r"got -?[\d.]+ \(\d+ of 112 entries differ\)",
        result.message,
    ), result.message
    assert "B=1, n_p=1, n=1, D=5" in "; ".join(result.tried)


def test_check_never_raises_on_odd_answers():
    assert "returned NoneType" in exercises.check("concat", lambda *a: None).message
    assert "must be a function" in exercises.check("concat", 42).message
    assert "returned str" in exercises.check("concat_backward", lambda dx, n_p: "dP").message
    assert "return (optimizer, losses)" in exercises.check("fix_snippet", lambda *a: 5).message
    assert not exercises.check("training_loop", lambda *a: None).passed
    assert not exercises.check("vocab_init", lambda *a: [1, 2]).passed
    assert not exercises.check("ensemble_vote", lambda p: p.argmax(0)).passed  # wrong axis: a shape error
    if triton is not None:
        assert not exercises.check("concat_kernel", lambda *a: None).passed
        assert not exercises.check("concat_launcher", lambda *a: None).passed
    with pytest.raises(ValueError, match="unknown exercise"):
        exercises.check("no_such_exercise", lambda: None)


def test_placeholder_reads_not_yet():
    def placeholder(*args):
        raise NotImplementedError("fill in the lines marked YOUR CODE HERE")

    for exercise_id in ("concat", "fix_snippet", "vocab_init"):
        assert "YOUR CODE HERE" in rejects(exercise_id, placeholder).message


def test_check_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    exercises.check("vocab_init", lambda wte, n_p, counts, top_k, gen: wte[torch.randperm(len(wte))[:n_p]])
    exercises.check("fix_snippet", lambda *a: None)
    assert torch.equal(torch.get_rng_state(), state)


# ---- wrong answers, 01_math -----------------------------------------------------------------------------


def test_concat_wrong_answers():
    rejects(
        "concat",
        lambda P, wte, idx, wpe: torch.cat([wte[idx], P.expand(len(idx), -1, -1)], 1) + wpe[: len(P) + idx.shape[1]],
        "the prompt is put after the tokens",
    )
    rejects(
        "concat",
        lambda P, wte, idx, wpe: torch.cat([P.expand(len(idx), -1, -1), wte[idx]], 1),
        "the position embeddings are forgotten",
    )
    rejects(
        "concat",
        lambda P, wte, idx, wpe: torch.cat(
            [P.expand(len(idx), -1, -1), wte[idx] + wpe[len(P) : len(P) + idx.shape[1]]], 1
        ),
        "only the token rows get positions",
    )
    rejects(
        "concat",
        lambda P, wte, idx, wpe: torch.cat([P[None], wte[idx]], 1) + wpe[: len(P) + idx.shape[1]],
        "raised RuntimeError",
        "passes every case with B = 1 and fails when B > 1",
    )  # right for B = 1 only
    rejects(
        "concat",
        lambda P, wte, idx, wpe: torch.cat([P.expand(len(idx), -1, -1), wte[idx]], 1) + wpe,
        "raised RuntimeError",
    )  # all of wpe, not its first n_p + n rows

    def float32_always(P, wte, idx, wpe):
        x = torch.zeros(idx.shape[0], len(P) + idx.shape[1], wte.shape[1])
        x[:, : len(P)] = P
        x[:, len(P) :] = wte[idx]
        return x + wpe[: x.shape[1]].float()

    rejects("concat", float32_always, "(fp64)", "dtype: expected float64, got float32")


def test_concat_backward_wrong_answers():
    rejects("concat_backward", lambda dx, n_p: dx[:, :n_p].mean(0), "a mean over b")
    rejects("concat_backward", lambda dx, n_p: dx[:, -n_p:].sum(0), "the last n_p rows are taken")
    rejects(
        "concat_backward", lambda dx, n_p: dx[0, :n_p], "only the first example is used", "passes every case with B = 1"
    )
    rejects(
        "concat_backward",
        lambda dx, n_p: dx[:, :n_p].sum(1),
        "shape: expected (n_p, D) = (3, 8), got (2, 8)",
        "over the positions (dim=1)",
    )

    rejects("concat_backward", lambda dx, n_p: dx.sum(0), "got (7, 8)", "every position is kept")

    def in_place(dx, n_p):
        dx[:, n_p:] = 0  # "the token rows do not matter"
        return dx.sum(0)[:n_p]

    rejects("concat_backward", in_place, "wrote into its input `dx`")


def test_frozen_head_backward_wrong_answers():
    onehot = lambda y, W, h: F.one_hot(y, len(W)).to(h.dtype)  # noqa: E731
    rejects("frozen_head_backward", lambda h, W, y: (h @ W.T).softmax(-1) @ W / len(h), "the onehot is forgotten")
    rejects(
        "frozen_head_backward",
        lambda h, W, y: ((h @ W.T).softmax(-1) - onehot(y, W, h)) @ W,
        "the 1/N of the mean is forgotten",
    )

    def naive_softmax(h, W, y):
        z = (h @ W.T).exp()
        return (z / z.sum(-1, keepdim=True) - onehot(y, W, h)) @ W / len(h)

    rejects("frozen_head_backward", naive_softmax, "logits up to", "without subtracting max(z)")
    rejects(
        "frozen_head_backward",
        lambda h, W, y: (onehot(y, W, h) - (h @ W.T).softmax(-1)) @ W / len(h),
        "the sign is flipped",
    )
    rejects(
        "frozen_head_backward",
        lambda h, W, y: ((h @ W.T).softmax(0) - onehot(y, W, h)) @ W / len(h),
        "over the rows (dim=0)",
    )


def attention(q, k, v, mask, scale):
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_causal_attention_wrong_answers():
    tril = lambda q: torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()  # noqa: E731
    rejects(
        "causal_attention",
        lambda q, k, v: (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v,
        "there is no causal mask",
    )
    rejects(
        "causal_attention",
        lambda q, k, v: attention(q, k, v, tril(q).T, 1 / math.sqrt(q.shape[-1])),
        "the mask is transposed",
        "dL/dP would be exactly zero",
    )
    rejects("causal_attention", lambda q, k, v: attention(q, k, v, tril(q), 1.0), "not divided by sqrt(hd)")
    rejects(
        "causal_attention",
        lambda q, k, v: attention(q, k, v, tril(q).tril(-1), 1 / math.sqrt(q.shape[-1])),
        "the diagonal is masked too",
    )
    rejects("causal_attention", lambda q, k, v: attention(q, k, v, tril(q), 1 / q.shape[-1]), "divided by hd instead")
    rejects(
        "causal_attention",
        lambda q, k, v: (
            (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~tril(q), float("-inf")).softmax(-2) @ v
        ),
        "over the queries (dim=-2)",
    )


# ---- wrong answers, 02_kernel ---------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def concat_unmasked(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        t = tl.program_id(1)
        offs = tl.arange(0, BLOCK_D)
        if t < n_p:
            row = tl.load(P + t * D + offs)
        else:
            row = tl.load(WTE + tl.load(IDX + b * n + (t - n_p)) * D + offs)
        row += tl.load(WPE + t * D + offs)
        tl.store(X + (b * (n_p + n) + t) * D + offs, row)

    @triton.jit
    def concat_loads_unmasked(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        t = tl.program_id(1)
        offs = tl.arange(0, BLOCK_D)
        if t < n_p:
            row = tl.load(P + t * D + offs)
        else:
            row = tl.load(WTE + tl.load(IDX + b * n + (t - n_p)) * D + offs)
        row += tl.load(WPE + t * D + offs)
        tl.store(X + (b * (n_p + n) + t) * D + offs, row, mask=offs < D)

    @triton.jit
    def concat_positions_restart(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        t = tl.program_id(1)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        if t < n_p:
            row = tl.load(P + t * D + offs, mask=mask) + tl.load(WPE + t * D + offs, mask=mask)
        else:
            token = tl.load(IDX + b * n + (t - n_p))
            row = tl.load(WTE + token * D + offs, mask=mask) + tl.load(WPE + (t - n_p) * D + offs, mask=mask)
        tl.store(X + (b * (n_p + n) + t) * D + offs, row, mask=mask)

    @triton.jit
    def concat_token_index(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        t = tl.program_id(1)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        if t < n_p:
            row = tl.load(P + t * D + offs, mask=mask)
        else:
            row = tl.load(WTE + tl.load(IDX + b * n + t) * D + offs, mask=mask)  # forgot the - n_p
        row += tl.load(WPE + t * D + offs, mask=mask)
        tl.store(X + (b * (n_p + n) + t) * D + offs, row, mask=mask)

    @triton.jit
    def concat_prompt_rows_only(X, P, WTE, WPE, IDX, n_p, n, D, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        t = tl.program_id(1)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        if t < n_p:
            row = tl.load(P + t * D + offs, mask=mask) + tl.load(WPE + t * D + offs, mask=mask)
            tl.store(X + (b * (n_p + n) + t) * D + offs, row, mask=mask)

    @triton.jit
    def sum_atomic(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK_D)
        for b in range(B):
            tl.atomic_add(DP + t * D + offs, tl.load(DX + (b * T + t) * D + offs, mask=offs < D), mask=offs < D)

    @triton.jit
    def sum_mean(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for b in range(B):
            acc += tl.load(DX + (b * T + t) * D + offs, mask=offs < D)
        tl.store(DP + t * D + offs, acc / B, mask=offs < D)

    @triton.jit
    def sum_first_example(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK_D)
        tl.store(DP + t * D + offs, tl.load(DX + t * D + offs, mask=offs < D), mask=offs < D)

    @triton.jit
    def sum_wrong_stride(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        n_p = tl.num_programs(0)
        offs = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for b in range(B):
            acc += tl.load(DX + (b * n_p + t) * D + offs, mask=offs < D)
        tl.store(DP + t * D + offs, acc, mask=offs < D)

    @triton.jit
    def sum_unmasked_store(DX, DP, B, T, D, BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for b in range(B):
            acc += tl.load(DX + (b * T + t) * D + offs, mask=offs < D)
        tl.store(DP + t * D + offs, acc)


def launcher(
    check_ids=True, upper=lambda V: V, check_negative=True, check_length=True, block=None, grid=None, error=ValueError
):
    """A launcher with one of its parts left out or wrong."""

    def launch(kernel, prompt, wte, idx, wpe):
        B, n = idx.shape
        n_p, D = prompt.shape
        if check_ids and (int(idx.max()) >= upper(len(wte)) or (check_negative and int(idx.min()) < 0)):
            raise error("token id out of range")
        if check_length and n_p + n > len(wpe):
            raise error("sequence too long")
        if wte.shape[1] != D or wpe.shape[1] != D:
            raise error("widths differ")
        x = torch.empty(B, n_p + n, D, dtype=wte.dtype)
        kernel[grid(B, n_p, n) if grid else (B, n_p + n)](
            x, prompt, wte, wpe, idx, n_p, n, D, BLOCK_D=block(D) if block else triton.next_power_of_2(D)
        )
        return x

    return launch


@needs_triton
def test_concat_kernel_wrong_answers():
    rejects(
        "concat_kernel",
        concat_unmasked,
        "a tl.store at lane 5 reached 1 element(s) past the end of x",
        "mask every tl.store",
    )
    rejects("concat_kernel", concat_loads_unmasked, "a tl.load", "past the end of", "an out-of-bounds read")
    rejects(
        "concat_kernel",
        concat_positions_restart,
        "first difference at (b=0, t=2, d=0)",
        "wpe[0:n] instead of wpe[n_p:n_p + n]",
    )
    rejects("concat_kernel", concat_token_index, "past the end of idx (2, 3)", "idx[b, t - n_p]")
    rejects("concat_kernel", concat_prompt_rows_only, "x[b=0, t=2, d=0] was never written")


@needs_triton
def test_batch_sum_kernel_wrong_answers():
    rejects("batch_sum_kernel", sum_atomic, "atomic operations", "loop over b")
    rejects("batch_sum_kernel", sum_mean, "divided by B (a mean over the batch)")
    rejects("batch_sum_kernel", sum_first_example, "only example b = 0 is read", "passes every case with B = 1")
    rejects("batch_sum_kernel", sum_wrong_stride, "row b * n_p instead of b * T")
    rejects("batch_sum_kernel", sum_unmasked_store, "a tl.store", "past the end of dP")


@needs_triton
def test_concat_launcher_wrong_answers():
    rejects(
        "concat_launcher",
        launcher(check_ids=False),
        "token id equal to V = 7",
        "launched with token id 7, outside [0, V) = [0, 7)",
    )
    rejects("concat_launcher", launcher(upper=lambda V: V + 1), "launched with token id 7")  # idx.max() > V
    rejects("concat_launcher", launcher(check_negative=False), "a token id of -1", "launched with token id -1")
    rejects("concat_launcher", launcher(check_length=False), "wpe has only n_ctx = 4 rows")
    rejects("concat_launcher", launcher(block=lambda D: D), "BLOCK_D=5 is not a power of two")
    rejects("concat_launcher", launcher(grid=lambda B, n_p, n: (B, n)), "grid (2, 3) launches 6 programs")
    rejects("concat_launcher", launcher(error=IndexError), "raised IndexError; it must raise ValueError")


def test_kernel_checks_without_triton(monkeypatch):
    from minipt.exercises import kernel

    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(kernel, "import_triton", no_triton)
    for exercise_id in KERNEL_EXERCISES:
        rejects(exercise_id, lambda *a: None, "Triton is not installed")
    stub_triton, stub_tl = kernel.triton_stub()  # the student notebook's kernel cells still define
    nb = nbformat.read(FOLDER / "02_kernel.ipynb", as_version=4)
    namespace = {"torch": torch, "triton": stub_triton, "tl": stub_tl}
    for cell in nb.cells:
        if cell.cell_type == "code" and "YOUR CODE HERE" in cell.source:
            exec(cell.source, namespace)
    rejects("concat_kernel", namespace["concat_kernel"], "Triton is not installed")


# ---- wrong answers, 03_training -------------------------------------------------------------------------


def tuner(lr=0.1, optimizer_over="prompt", unfreeze=False):
    def tune(model, idx, targets, steps):
        pt = PromptTuning(model, n_prompt=4, init="uniform", seed=0, backend="reference")
        if unfreeze:
            model.requires_grad_(True)
        params = {
            "prompt": [pt.prompt],
            "model": model.parameters(),
            "pt": pt.parameters(),
            "copy": [pt.prompt.detach().clone().requires_grad_()],
        }[optimizer_over]
        optimizer = torch.optim.Adam(params, lr=lr)
        losses = []
        for _ in range(steps):
            _, loss = pt(idx, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return optimizer, losses

    return tune


def test_fix_snippet_wrong_answers():
    rejects(
        "fix_snippet",
        tuner(lr=5e-5, optimizer_over="model", unfreeze=True),  # the snippet as it circulates
        "the base model changed",
        "full fine-tuning",
    )
    rejects("fix_snippet", tuner(optimizer_over="pt"), "the optimizer holds 29 tensors", "pass [pt.prompt]")
    rejects("fix_snippet", tuner(lr=5e-5), "a far larger learning rate")
    rejects("fix_snippet", tuner(optimizer_over="copy"), "the loss never changed", "not the prompt the model uses")
    rejects("fix_snippet", tuner(unfreeze=True), "received gradients", "leave the model frozen")


def test_training_loop_wrong_answers():
    from minipt.exercises.training import reference_loop

    def with_slip(**slip):
        return lambda pt, get_batch, steps, lr, warmup, max_norm: reference_loop(
            pt, get_batch, steps, lr, warmup, max_norm, **slip
        )

    rejects("training_loop", with_slip(zero_grad=False), "as step 2 starts", "zero_grad() is never called")
    rejects("training_loop", with_slip(warmup_from=0), "as step 1 starts", "the warmup starts at 0")
    rejects("training_loop", with_slip(clip="after"), "not clipped before optimizer.step()")
    rejects("training_loop", with_slip(clip="never"), "not clipped before optimizer.step()")
    rejects("training_loop", with_slip(weight_decay=0.01), "default weight_decay=0.01")
    rejects("training_loop", with_slip(same_batch=True), "get_batch(0) is used at every step")
    rejects(
        "training_loop",
        lambda pt, get_batch, steps, *a: reference_loop(pt, get_batch, steps - 1, *a),
        "7 losses for 8 steps",
    )


def test_vocab_init_wrong_answers():
    def top(counts, top_k):
        return torch.argsort(counts, descending=True, stable=True)[:top_k]

    rejects(
        "vocab_init",
        lambda wte, n_p, counts, top_k, g: wte[
            top(counts, top_k)[torch.randint(0, top_k, (n_p,), generator=g)]
        ].clone(),
        "was picked twice",
        "without replacement",
    )
    rejects(
        "vocab_init",
        lambda wte, n_p, counts, top_k, g: wte[torch.randperm(len(wte), generator=g)[:n_p]].clone(),
        "Sample among the top_k most frequent tokens that occur at all",
    )  # the counts ignored
    rejects(
        "vocab_init",
        lambda wte, n_p, counts, top_k, g: wte[
            torch.argsort(counts)[:top_k][torch.randperm(top_k, generator=g)[:n_p]]
        ].clone(),
        "never occurs in the corpus",
    )  # least frequent first
    rejects(
        "vocab_init",
        lambda wte, n_p, counts, top_k, g: wte[top(counts, top_k)[:n_p]].clone(),
        "every seed picks the same tokens",
    )
    rejects(
        "vocab_init",
        lambda wte, n_p, counts, top_k, g: wte[top(counts, top_k)[torch.randperm(min(top_k, 8))[:n_p]]].clone(),
        "not the global random state",
    )  # the generator ignored
    rejects("vocab_init", lambda wte, n_p, counts, top_k, g: wte[:n_p], "shares memory with wte")


def test_label_init_wrong_answers():
    rejects(
        "label_init",
        lambda wte, labels: torch.stack([wte[torch.tensor(ids)].sum(0) for ids in labels]),
        "summed instead of averaged",
    )
    rejects(
        "label_init",
        lambda wte, labels: torch.stack([wte[ids[0]] for ids in labels]),
        "only the first token of each label",
    )
    rejects(
        "label_init",
        lambda wte, labels: wte[torch.tensor(sum(labels, []))].mean(0).expand(len(labels), -1),
        "pooled into one mean",
    )
    rejects("label_init", lambda wte, labels: torch.stack([wte[ids[-1]] for ids in labels]), "only the last token")


def test_ensemble_vote_wrong_answers():
    votes = lambda p: F.one_hot(p.argmax(-1), p.shape[-1]).sum(0)  # noqa: E731
    rejects(
        "ensemble_vote",
        lambda p: p.mean(0).argmax(-1),
        "a majority against the mean",
        "the mean probability decides alone",
    )
    rejects("ensemble_vote", lambda p: votes(p).argmax(-1), "a tie goes to the lowest class id")
    rejects(
        "ensemble_vote",
        lambda p: p.amax(0).masked_fill(votes(p) != votes(p).amax(-1, keepdim=True), -1).argmax(-1),
        "the largest single probability",
    )
    rejects("ensemble_vote", lambda p: (votes(p) + p.sum(0)).argmax(-1), "not only the tied ones")
    rejects("ensemble_vote", lambda p: p[0].argmax(-1), "only the first prompt's prediction")  # the first prompt only


# ---- student notebooks: generated, fresh, without solutions ---------------------------------------------


def test_strip_solutions():
    source = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    assert strip_solutions(source) == (
        "def f(x):\n    y = 1\n    # YOUR CODE HERE\n"
        '    raise NotImplementedError("fill in the lines marked YOUR CODE HERE")\n'
    )
    for broken in (f"{BEGIN}\nx = 1\n", f"x = 1\n{END}\n", f"{BEGIN}\n{BEGIN}\n{END}\n"):
        with pytest.raises(ValueError):
            strip_solutions(broken)


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_student_notebook_is_the_solution_stripped(stem):
    solution = nbformat.read(FOLDER / "solutions" / f"{stem}.ipynb", as_version=4)
    student = nbformat.read(FOLDER / f"{stem}.ipynb", as_version=4)
    assert len(student.cells) == len(solution.cells)
    blocks = 0
    for s_cell, cell in zip(solution.cells, student.cells):
        assert BEGIN not in cell.source and END not in cell.source
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            if BEGIN in s_cell.source:
                blocks += 1
                hidden = s_cell.source.split(BEGIN)[1].split(END)[0].strip().splitlines()
                assert not any(line.strip() in cell.source for line in hidden if len(line.strip()) > 12)
                assert "YOUR CODE HERE" in cell.source
    assert blocks == sum(ex.notebook == stem for ex in EXERCISES.values())


def test_student_notebooks_are_fresh():
    assert build(check=True) == [], "stale student notebooks: run `python -m minipt.exercises build`"


def test_stale_student_notebook_is_detected(tmp_path, capsys):
    shutil.copytree(FOLDER, tmp_path / "exercises")
    folder = tmp_path / "exercises"
    assert main(["build", "--check", "--folder", str(folder)]) == 0
    path = folder / "solutions" / "01_math.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and BEGIN in c.source)
    cell.source = cell.source.replace('"""x = [P', '"""The input: x = [P')  # an edit outside the solution
    nbformat.write(nb, path)
    assert [p.name for p in build(folder, check=True)] == ["01_math.ipynb"]
    assert main(["build", "--check", "--folder", str(folder)]) == 1
    assert "stale: 01_math.ipynb" in capsys.readouterr().out
    assert main(["build", "--folder", str(folder)]) == 0
    assert build(folder, check=True) == []
    assert "The input: x = [P" in (folder / "01_math.ipynb").read_text()


def test_list_command(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(ex_id in out for ex_id in EXERCISES) and f"{len(EXERCISES)} exercises" in out


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_committed_solution_notebook(stem):
    path = FOLDER / "solutions" / f"{stem}.ipynb"
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in cells), f"{stem}: commit the solutions executed"
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    printed = "\n".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream")
    for ex in EXERCISES.values():
        if ex.notebook == stem:
            assert f"{ex.id}: passed." in printed
    assert f"{sum(ex.notebook == stem for ex in EXERCISES.values())} passed" in printed  # the summary cell
    for cell in nb.cells:
        assert not ABSOLUTE_PATH.search(cell.source + printed)


# ---- the notebooks run: solutions pass, student versions report "not yet" -------------------------------


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_notebooks_run_and_grade(stem, monkeypatch, capsys):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    if stem in ("02_kernel", "05_kernel_track") and triton is None:
        pytest.skip("Triton is not installed: the kernel checks would all say so")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # several notebooks at once under pytest -n: one thread each
    from minipt.exercises.grade import grade

    solution = grade(FOLDER / "solutions" / f"{stem}.ipynb")
    assert solution.all_passed, solution.report()
    assert solution.seconds < 120
    committed = nbformat.read(FOLDER / "solutions" / f"{stem}.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in committed.cells if c.cell_type == "code" for o in c.outputs)
    for result in solution.results.values():  # the committed outputs are those of a fresh run: not stale
        assert str(result).splitlines()[0] in printed, f"{stem}: stale output, run the solution notebook again"

    assert main(["check", str(FOLDER / f"{stem}.ipynb")]) == 1  # the student version, nothing filled in
    out = capsys.readouterr().out
    student = [line for line in out.splitlines() if line.startswith("  ")]
    ids = [ex.id for ex in EXERCISES.values() if ex.notebook == stem]
    assert len(student) == len(ids) and "error in" not in out, out
    for ex_id, line in zip(ids, student):
        assert line.split()[0] == ex_id and "not yet. The answer raises NotImplementedError" in line, line
    assert f"0 of {len(ids)} exercises passed" in out
    seconds = float(re.search(r"ran in ([\d.]+) s", out).group(1))
    assert seconds < 120
    print(f"{stem}: solutions {solution.seconds:.1f} s, student version {seconds:.1f} s", file=sys.stderr)
