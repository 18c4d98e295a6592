"""prompt_concat's input validation and backend dispatch.

Every bad input raises before any launch, with a message that names the argument, and the
checks are shared by both backends: the reference path gives the same errors as the kernels.
Id values out of range are the one exception by device: a ValueError on CPU tensors (here), a
device-side assert on CUDA tensors (test_prompt_concat.py, in a child process).
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from minipt.kernels import prompt_concat

pc = importlib.import_module("minipt.kernels.prompt_concat")

needs_triton = pytest.mark.skipif(not pc.HAS_TRITON, reason="Triton is not installed")
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V, D, B, n, n_p, K = 10, 6, 2, 3, 4, 3


def good(device=DEVICE, **overrides):
    """Valid inputs (a bank of K prompts, wpe with exactly n_p + n rows), with some replaced."""
    inputs = dict(
        prompt=torch.randn(K, n_p, D, device=device),
        wte=torch.randn(V, D, device=device),
        idx=torch.randint(0, V, (B, n), device=device),
        wpe=torch.randn(n_p + n, D, device=device),
        prompt_index=torch.tensor([0, K - 1], device=device),
    )
    inputs.update(overrides)
    return inputs


@pytest.fixture
def no_launch(monkeypatch):
    """Validation must fail before a kernel or the reference runs: make running them an error."""

    def launched(*args, **kwargs):
        raise AssertionError("launched despite a bad input")

    monkeypatch.setattr(pc, "_forward_triton", launched)
    monkeypatch.setattr(pc, "prompt_concat_reference", launched)


BAD_IDS = [  # id values out of range: checked on the data, so on CPU tensors here (see below)
    pytest.param(
        dict(idx=torch.tensor([[0, -1, 2], [1, 2, 3]])),
        ValueError,
        r"idx holds token ids in \[-1, 3\] but wte has V=10 rows",
        id="negative id",
    ),
    pytest.param(
        dict(idx=torch.tensor([[0, 1, 2], [1, 2, V]])),
        ValueError,
        r"idx holds token ids in \[0, 10\] .* must be in \[0, 10\)",
        id="id == V",
    ),
    pytest.param(
        dict(idx=torch.tensor([[0, 1, 2], [1, 2, 2**31 - 1]], dtype=torch.int32)),
        ValueError,
        r"idx holds token ids",
        id="huge int32 id",
    ),
    pytest.param(
        dict(prompt_index=torch.tensor([0, K])),
        ValueError,
        r"prompt_index holds values in \[0, 3\] but the bank has K=3 prompts",
        id="prompt_index >= K",
    ),
    pytest.param(
        dict(prompt_index=torch.tensor([-1, 0])),
        ValueError,
        r"prompt_index holds values in \[-1, 0\]",
        id="negative prompt_index",
    ),
]


BAD_INPUTS = [  # pytest.param(overrides of good(), exception, message pattern, id=...)
    pytest.param(
        dict(idx=torch.zeros(B, n)),
        TypeError,
        r"idx must hold integer ids .* got dtype torch.float32",
        id="float idx",
    ),
    pytest.param(
        dict(idx=torch.zeros(B, n, dtype=torch.int16)),
        TypeError,
        r"idx must hold integer ids",
        id="int16 idx",
    ),
    pytest.param(
        dict(idx=torch.zeros(n, dtype=torch.long)),
        ValueError,
        r"idx must be 2-D \(B, n\), got shape \(3,\)",
        id="1-D idx",
    ),
    pytest.param(
        dict(idx=torch.zeros(1, B, n, dtype=torch.long)),
        ValueError,
        r"idx must be 2-D",
        id="3-D idx",
    ),
    pytest.param(
        dict(idx=torch.zeros(0, n, dtype=torch.long), prompt_index=torch.zeros(0, dtype=torch.long)),
        ValueError,
        r"empty batch \(B == 0\)",
        id="empty batch",
    ),
    pytest.param(
        dict(prompt_index=None),
        ValueError,
        r"prompt_index \(B,\) must say which prompt",
        id="bank without prompt_index",
    ),
    pytest.param(
        dict(prompt=torch.randn(n_p, D)),
        ValueError,
        r"prompt_index is given but prompt is a single",
        id="prompt_index with one prompt",
    ),
    pytest.param(
        dict(prompt_index=torch.tensor([0, 1, 2])),
        ValueError,
        r"prompt_index must have shape \(B,\) = \(2,\), got \(3,\)",
        id="prompt_index wrong shape",
    ),
    pytest.param(
        dict(prompt_index=torch.tensor([0.0, 1.0])),
        TypeError,
        r"prompt_index must hold integer ids",
        id="float prompt_index",
    ),
    pytest.param(dict(prompt=torch.randn(0, n_p, D)), ValueError, r"empty bank \(K == 0\)", id="empty bank"),
    pytest.param(
        dict(prompt=torch.randn(D), prompt_index=None),
        ValueError,
        r"prompt must be \(n_p, D\) or a bank",
        id="1-D prompt",
    ),
    pytest.param(
        dict(prompt=torch.randn(1, K, n_p, D)),
        ValueError,
        r"prompt must be \(n_p, D\) or a bank",
        id="4-D prompt",
    ),
    pytest.param(
        dict(prompt=torch.randn(0, D), prompt_index=None),
        ValueError,
        r"prompt has no rows \(n_p == 0\)",
        id="empty prompt",
    ),
    pytest.param(
        dict(wte=torch.randn(V, D + 1)),
        ValueError,
        r"D mismatch: prompt has D=6 but wte has D=7",
        id="D mismatch prompt/wte",
    ),
    pytest.param(
        dict(wpe=torch.randn(n_p + n, D - 1)),
        ValueError,
        r"D mismatch: prompt has D=6 but wpe has D=5",
        id="D mismatch prompt/wpe",
    ),
    pytest.param(
        dict(wpe=torch.randn(n_p + n - 1, D)),
        ValueError,
        r"n_p \+ n = 4 \+ 3 = 7 positions exceed wpe's 6 rows",
        id="wpe too short",
    ),
    pytest.param(dict(wte=torch.randn(V * D)), ValueError, r"wte must be 2-D \(V, D\)", id="1-D wte"),
    pytest.param(dict(wpe=torch.randn(D)), ValueError, r"wpe must be 2-D \(n_ctx, D\)", id="1-D wpe"),
    pytest.param(
        dict(wte=torch.zeros(V, D, dtype=torch.int32)),
        TypeError,
        r"wte has unsupported dtype torch.int32; expected one of float32, float16, bfloat16, float64",
        id="int wte",
    ),
    pytest.param(
        dict(prompt=torch.zeros(K, n_p, D, dtype=torch.complex64)),
        TypeError,
        r"prompt has unsupported dtype torch.complex64",
        id="complex prompt",
    ),
    pytest.param(
        dict(wte=torch.zeros(V, D, dtype=torch.float8_e4m3fn)),
        TypeError,
        r"wte has unsupported dtype",
        id="fp8 wte",
    ),
    pytest.param(
        dict(wpe=torch.randn(n_p + n, D, dtype=torch.float64)),
        TypeError,
        r"wpe dtype torch.float64 must match wte dtype torch.float32",
        id="wpe dtype differs",
    ),
    pytest.param(
        dict(prompt=None, prompt_index=None),
        TypeError,
        r"prompt must be a torch.Tensor, got NoneType",
        id="prompt is None",
    ),
    pytest.param(
        dict(wte=[[0.0] * D] * V),
        TypeError,
        r"wte must be a torch.Tensor, got list",
        id="wte not a tensor",
    ),
    pytest.param(
        dict(wpe=torch.randn(n_p + n, D, device="meta")),
        ValueError,
        r"inputs must be on one device, got .*wpe on meta",
        id="devices differ",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS)
def test_bad_input_raises_before_launch(backend, overrides, error, message, no_launch):
    on_device = {
        k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v for k, v in overrides.items()
    }
    with pytest.raises(error, match=message):
        prompt_concat(**good(**on_device), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides, error, message", BAD_IDS)
def test_bad_ids_raise_before_launch_on_cpu(backend, overrides, error, message, no_launch):
    """On CPU tensors the id ranges are read on the host: a ValueError before any launch.

    On CUDA the same check is a device-side assert instead (no host sync), which would leave
    this process's CUDA context unusable: test_prompt_concat.py checks it in a child process.
    """
    with pytest.raises(error, match=message):
        prompt_concat(**good(device="cpu", **overrides), backend=backend)


@pytest.mark.parametrize("overrides, error, message", BAD_IDS)
def test_check_ids_false_skips_the_id_check(overrides, error, message, monkeypatch):
    """check_ids=False: the op raises no ValueError and goes on to launch (the caller vouched
    for the ids; the kernels mask bad ones, the reference fails or wraps in torch's indexing)."""

    def reference(*args, **kwargs):
        raise IndexError("reached the reference")

    monkeypatch.setattr(pc, "prompt_concat_reference", reference)
    with pytest.raises(IndexError, match="reached the reference"):
        prompt_concat(**good(device="cpu", **overrides), backend="reference", check_ids=False)


def test_unknown_backend(no_launch):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'reference'\), got 'cuda'"):
        prompt_concat(**good(), backend="cuda")


# ---------------------------------------------------------------------------------------------
# Dispatch: which implementation runs where
# ---------------------------------------------------------------------------------------------
def spy(monkeypatch):
    """Count calls to the Triton forward and to the reference forward."""
    calls = []
    triton_fwd, reference = pc._forward_triton, pc.prompt_concat_reference
    monkeypatch.setattr(pc, "_forward_triton", lambda *a: calls.append("triton") or triton_fwd(*a))
    monkeypatch.setattr(pc, "prompt_concat_reference", lambda *a, **k: calls.append("reference") or reference(*a, **k))
    return calls


def cpu_inputs():
    return dict(
        prompt=torch.randn(n_p, D),
        wte=torch.randn(V, D),
        idx=torch.randint(0, V, (B, n)),
    )


def test_reference_backend_never_runs_triton(monkeypatch):
    calls = spy(monkeypatch)
    prompt_concat(**cpu_inputs(), backend="reference")
    assert calls == ["reference"]


def test_auto_on_cpu_follows_the_interpreter(monkeypatch):
    calls = spy(monkeypatch)
    prompt_concat(**cpu_inputs())
    expected = "triton" if pc.HAS_TRITON and pc.TRITON_INTERPRET else "reference"
    assert calls == [expected]

    monkeypatch.setattr(pc, "TRITON_INTERPRET", False)  # as if TRITON_INTERPRET were unset
    calls.clear()
    prompt_concat(**cpu_inputs())
    assert calls == ["reference"]


def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(pc, "TRITON_INTERPRET", False)
    message = r"backend='triton' cannot run here: .*on the CPU and Triton's interpreter is off"
    if not pc.HAS_TRITON:
        message = r"backend='triton' cannot run here: Triton is not installed"
    with pytest.raises(RuntimeError, match=message):
        prompt_concat(**cpu_inputs(), backend="triton")


def test_without_triton_auto_falls_back_and_triton_is_an_error(monkeypatch):
    monkeypatch.setattr(pc, "HAS_TRITON", False)
    calls = spy(monkeypatch)
    prompt_concat(**cpu_inputs())
    assert calls == ["reference"]
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run here: Triton is not installed"):
        prompt_concat(**cpu_inputs(), backend="triton")


def test_module_imports_and_runs_without_triton():
    """As on macOS: with `import triton` failing, the module imports and the reference runs."""
    script = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
import importlib
pc = importlib.import_module("minipt.kernels.prompt_concat")
from minipt.kernels import prompt_concat, prompt_concat_reference
assert not pc.HAS_TRITON
P = torch.randn(2, 4, requires_grad=True); wte = torch.randn(5, 4); idx = torch.tensor([[1, 4]])
x = prompt_concat(P, wte, idx)
assert torch.equal(x, prompt_concat_reference(P, wte, idx))
x.sum().backward()
assert torch.equal(P.grad, torch.ones(2, 4))
try:
    prompt_concat(P, wte, idx, backend="triton")
except RuntimeError as e:
    assert "Triton is not installed" in str(e)
else:
    raise AssertionError("backend='triton' without triton did not raise")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
