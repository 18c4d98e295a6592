"""The kernel track (notebook 05_kernel_track): correct kernels written differently from the solutions pass,
plausible wrong ones fail with a message that names the problem, the checks draw who touched what, and the
verdicts do not depend on TRITON_INTERPRET being set before Triton was imported."""

import json
import os
import subprocess
import sys

import pytest

from minipt import exercises

pytest.importorskip("triton", reason="Triton is not installed (Linux only)")

KERNELS = """
import triton
import triton.language as tl


@triton.jit
def ce_one_pass(H, W, Y, LOSS, DH, V, D, n_sup, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # one pass: running max m, running sum s and running sum of e^(z - m) W, all rescaled when m grows
    i = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    y = tl.load(Y + i)
    if y < 0:
        tl.store(LOSS + i, 0.0)
        tl.store(DH + i * D + offs_d, tl.zeros((BLOCK_D,), dtype=tl.float32), mask=d_mask)
    else:
        h = tl.load(H + i * D + offs_d, mask=d_mask, other=0.0)
        m = -float("inf")
        s = 0.0
        pw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            w = tl.load(W + offs_v[:, None] * D + offs_d[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0)
            z = tl.where(v_mask, tl.sum(w * h[None, :], axis=1), -float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            e = tl.exp(z - m_new)
            alpha = tl.exp(m - m_new)
            s = s * alpha + tl.sum(e, axis=0)
            pw = pw * alpha + tl.sum(e[:, None] * w, axis=0)
            m = m_new
        w_y = tl.load(W + y * D + offs_d, mask=d_mask, other=0.0)
        z_y = tl.sum(w_y * h, axis=0)
        tl.store(LOSS + i, (m + tl.log(s) - z_y) / n_sup)
        tl.store(DH + i * D + offs_d, (pw / s - w_y) / n_sup, mask=d_mask)


@triton.jit
def ce_two_pass_row_y(H, W, Y, LOSS, DH, V, D, n_sup, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    y = tl.load(Y + i)
    keep = y >= 0
    h = tl.load(H + i * D + offs_d, mask=d_mask & keep, other=0.0)
    m = -float("inf")
    s = 0.0
    n_v = tl.where(keep, V, 0)  # a row without a target loops over nothing
    for v0 in range(0, n_v, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        w = tl.load(W + offs_v[:, None] * D + offs_d[None, :], mask=(offs_v < V)[:, None] & d_mask[None, :], other=0.0)
        z = tl.where(offs_v < V, tl.sum(w * h[None, :], axis=1), -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for v0 in range(0, n_v, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        w = tl.load(W + offs_v[:, None] * D + offs_d[None, :], mask=(offs_v < V)[:, None] & d_mask[None, :], other=0.0)
        p = tl.where(offs_v < V, tl.exp(tl.sum(w * h[None, :], axis=1) - m) / s, 0.0)
        acc += tl.sum(p[:, None] * w, axis=0)
    w_y = tl.load(W + y * D + offs_d, mask=d_mask & keep, other=0.0)
    loss = tl.where(keep, (m + tl.log(s) - tl.sum(w_y * h, axis=0)) / n_sup, 0.0)
    tl.store(LOSS + i, loss)
    tl.store(DH + i * D + offs_d, tl.where(keep, (acc - w_y) / n_sup, 0.0), mask=d_mask)


@triton.jit
def ce_variant(H, W, Y, LOSS, DH, V, D, n_sup, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
               DIVIDE_BY_N: tl.constexpr = False, NO_MAX: tl.constexpr = False, FIRST_CHUNK: tl.constexpr = False,
               NO_SKIP: tl.constexpr = False, NO_TAIL_MASK: tl.constexpr = False, NO_ONEHOT: tl.constexpr = False):
    i = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    y = tl.load(Y + i)
    div = tl.num_programs(0) if DIVIDE_BY_N else n_sup
    if y < 0 and not NO_SKIP:
        tl.store(LOSS + i, 0.0)
        tl.store(DH + i * D + offs_d, tl.zeros((BLOCK_D,), dtype=tl.float32), mask=d_mask)
    else:
        h = tl.load(H + i * D + offs_d, mask=d_mask, other=0.0)
        m = -float("inf")
        s = 0.0
        stop = BLOCK_V if FIRST_CHUNK else V
        for v0 in range(0, stop, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            w_mask = d_mask[None, :] if NO_TAIL_MASK else v_mask[:, None] & d_mask[None, :]
            w = tl.load(W + offs_v[:, None] * D + offs_d[None, :], mask=w_mask, other=0.0)
            z = tl.where(v_mask, tl.sum(w * h[None, :], axis=1), -float("inf"))
            if NO_MAX:
                s += tl.sum(tl.exp(z), axis=0)
                m = 0.0
            else:
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
        lse = m + tl.log(s)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        z_y = 0.0
        for v0 in range(0, stop, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            w_mask = d_mask[None, :] if NO_TAIL_MASK else v_mask[:, None] & d_mask[None, :]
            w = tl.load(W + offs_v[:, None] * D + offs_d[None, :], mask=w_mask, other=0.0)
            z = tl.sum(w * h[None, :], axis=1)
            hot = offs_v == y
            p = tl.where(v_mask, tl.exp(z - lse), 0.0)
            if not NO_ONEHOT:
                p = p - tl.where(hot, 1.0, 0.0)
            acc += tl.sum(p[:, None] * w, axis=0)
            z_y += tl.sum(tl.where(hot, z, 0.0), axis=0)
        tl.store(LOSS + i, (lse - z_y) / div)
        tl.store(DH + i * D + offs_d, acc / div, mask=d_mask)


@triton.jit
def decode_two_pass(Q, K, V, O, LENS, T, hd, scale, BLOCK_T: tl.constexpr, BLOCK_HD: tl.constexpr):
    r = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_HD)
    e_mask = offs_e < hd
    n = tl.load(LENS + r)
    q = tl.load(Q + r * hd + offs_e, mask=e_mask, other=0.0) * scale  # the scale folded into q
    m = -float("inf")
    for t0 in range(0, n, BLOCK_T):  # pass 1: the max, over the row's own positions only
        offs_t = t0 + tl.arange(0, BLOCK_T)
        rows = (r * T + offs_t)[:, None] * hd + offs_e[None, :]
        k = tl.load(K + rows, mask=(offs_t < n)[:, None] & e_mask[None, :], other=0.0)
        m = tl.maximum(m, tl.max(tl.where(offs_t < n, tl.sum(k * q[None, :], axis=1), -float("inf")), axis=0))
    s = 0.0
    acc = tl.zeros((BLOCK_HD,), dtype=tl.float32)
    for t0 in range(0, n, BLOCK_T):  # pass 2: the weights and the weighted sum
        offs_t = t0 + tl.arange(0, BLOCK_T)
        rows = (r * T + offs_t)[:, None] * hd + offs_e[None, :]
        mask = (offs_t < n)[:, None] & e_mask[None, :]
        k = tl.load(K + rows, mask=mask, other=0.0)
        p = tl.where(offs_t < n, tl.exp(tl.sum(k * q[None, :], axis=1) - m), 0.0)
        acc += tl.sum(p[:, None] * tl.load(V + rows, mask=mask, other=0.0), axis=0)
        s += tl.sum(p, axis=0)
    tl.store(O + r * hd + offs_e, acc / s, mask=e_mask)


@triton.jit
def decode_variant(Q, K, V, O, LENS, T, hd, scale, BLOCK_T: tl.constexpr, BLOCK_HD: tl.constexpr,
                   NO_LENGTH: tl.constexpr = False, ONE_MORE: tl.constexpr = False, NO_SCALE: tl.constexpr = False,
                   FIRST_CHUNK: tl.constexpr = False, NO_RESCALE: tl.constexpr = False,
                   ROW_STRIDE: tl.constexpr = False):
    r = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_HD)
    e_mask = offs_e < hd
    n = T if NO_LENGTH else tl.load(LENS + r)
    q = tl.load(Q + r * hd + offs_e, mask=e_mask, other=0.0)
    m = -float("inf")
    s = 0.0
    acc = tl.zeros((BLOCK_HD,), dtype=tl.float32)
    stop = BLOCK_T if FIRST_CHUNK else T
    for t0 in range(0, stop, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = (offs_t <= n) & (offs_t < T) if ONE_MORE else offs_t < n
        base = r * hd if ROW_STRIDE else r * T * hd
        rows = base + offs_t[:, None] * hd + offs_e[None, :]
        k = tl.load(K + rows, mask=t_mask[:, None] & e_mask[None, :], other=0.0)
        score = tl.sum(k * q[None, :], axis=1) * (1.0 if NO_SCALE else scale)
        score = tl.where(t_mask, score, -float("inf"))
        m_new = tl.maximum(m, tl.max(score, axis=0))
        alpha = 1.0 if NO_RESCALE else tl.exp(m - m_new)
        p = tl.exp(score - m_new)
        v = tl.load(V + rows, mask=t_mask[:, None] & e_mask[None, :], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        s = s * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(O + r * hd + offs_e, acc / s, mask=e_mask)
"""


@pytest.fixture(scope="module")
def k(tmp_path_factory):
    path = tmp_path_factory.mktemp("track") / "track_kernels.py"
    path.write_text(KERNELS)
    namespace = {"__file__": str(path)}
    exec(compile(KERNELS, str(path), "exec"), namespace)
    for value in list(namespace.values()):
        if hasattr(value, "fn"):  # the kernels: remember where their source is
            value.__path__ = path
    namespace["__path__"] = path
    return namespace


def accepts(exercise_id, kernel):
    result = exercises.check(exercise_id, kernel)
    assert result.passed, str(result)
    return result


def rejects(exercise_id, kernel, *phrases):
    result = exercises.check(exercise_id, kernel)
    assert not result.passed, f"{exercise_id} accepted a wrong kernel"
    for phrase in phrases:
        assert phrase in result.message, f"{phrase!r} not in:\n{result}"
    return result


def _with_flags(kernel, flags):
    """The kernel with some of its constexpr flags defaulting to True: a new @triton.jit function from edited
    source, in a file of its own (the interpreter reads a kernel's source, so defaults set at run time would
    not count)."""
    import triton  # noqa: F401 - the source imports it

    path, name = kernel.__path__, kernel.__name__
    source = KERNELS
    head = source.index(f"def {name}(")
    end = source.index("\n\n\n@triton.jit", head) if "\n\n\n@triton.jit" in source[head:] else len(source)
    body = source[head:end]
    for flag in flags:
        body = body.replace(f"{flag}: tl.constexpr = False", f"{flag}: tl.constexpr = True")
    tag = "_".join(sorted(flags)).lower()
    variant_path = path.with_name(f"{name}_{tag}.py")
    variant_path.write_text("import triton\nimport triton.language as tl\n\n\n@triton.jit\n" + body)
    namespace = {}
    exec(compile(variant_path.read_text(), str(variant_path), "exec"), namespace)
    return namespace[name]


def test_head_ce_kernel_answers(k):
    result = accepts("head_ce_kernel", k["ce_one_pass"])
    assert "W rows x programs 0..3" in result.message and "dh rows x programs" in result.message
    picture = result.message.split("W rows x programs")[1].split("dh rows")[0]
    assert "R" in picture and any(
        line.split()[1:] and all(c == "." for c in line.split()[1:]) is False for line in picture.splitlines()[1:]
    )
    accepts("head_ce_kernel", k["ce_two_pass_row_y"])
    ce = k["ce_variant"]
    accepts("head_ce_kernel", ce)  # all flags off: the solution's algorithm
    rejects("head_ce_kernel", _with_flags(ce, {"DIVIDE_BY_N": True}), "divides by N, the rows, instead of N_sup")
    rejects("head_ce_kernel", _with_flags(ce, {"NO_MAX": True}), "without subtracting the running max")
    rejects("head_ce_kernel", _with_flags(ce, {"FIRST_CHUNK": True}), "only the first chunk of the vocabulary")
    rejects("head_ce_kernel", _with_flags(ce, {"NO_SKIP": True}), "target -100 are not skipped")
    rejects(
        "head_ce_kernel", _with_flags(ce, {"NO_TAIL_MASK": True}), "a tl.load", "past the end of W", "mask those >= V"
    )
    rejects("head_ce_kernel", _with_flags(ce, {"NO_ONEHOT": True}), "the onehot is forgotten")


def test_decode_attention_kernel_answers(k):
    result = accepts("decode_attention_kernel", k["decode_two_pass"])
    assert "k rows x programs 0..2" in result.message and "o rows x programs 0..2" in result.message
    dv = k["decode_variant"]
    accepts("decode_attention_kernel", dv)
    rejects("decode_attention_kernel", _with_flags(dv, {"NO_LENGTH": True}), "the padding past a row's length")
    rejects("decode_attention_kernel", _with_flags(dv, {"ONE_MORE": True}), "one position too many")
    rejects("decode_attention_kernel", _with_flags(dv, {"NO_SCALE": True}), "not multiplied by scale")
    rejects("decode_attention_kernel", _with_flags(dv, {"FIRST_CHUNK": True}), "only the first chunk of the cache")
    rejects("decode_attention_kernel", _with_flags(dv, {"NO_RESCALE": True}), "o: first difference")
    rejects("decode_attention_kernel", _with_flags(dv, {"ROW_STRIDE": True}), "o")


VERDICTS = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("track_kernels", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from minipt import exercises
rows = []
for exercise_id, name in [("head_ce_kernel", "ce_one_pass"), ("head_ce_kernel", "ce_variant"),
                          ("decode_attention_kernel", "decode_two_pass")]:
    result = exercises.check(exercise_id, getattr(module, name))
    rows.append([exercise_id, name, result.passed, result.message])
print(json.dumps(rows))
"""


def test_track_verdicts_do_not_depend_on_triton_interpret(k):
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", VERDICTS, str(k["__path__"])], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for exercise_id, name, passed, message in json.loads(out.stdout.strip().splitlines()[-1]):
        here = exercises.check(exercise_id, k[name])
        assert (here.passed, here.message) == (passed, message) and passed, name
