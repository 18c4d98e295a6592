"""Speed of the prompt-concat op: eager PyTorch, torch.compile, minipt's Triton kernel, and a copy as the roof.

    python benchmarks/bench_prompt_concat.py                    # GPU: the reduced grid, fp32 and bf16
    python benchmarks/bench_prompt_concat.py --grid full        # GPU: the whole grid of the issue (long)
    python benchmarks/bench_prompt_concat.py --grid small       # GPU: 3 shapes (what gpu_check.sh runs)
    python benchmarks/bench_prompt_concat.py --device cpu       # CPU: a tiny grid, torch.utils.benchmark
    python benchmarks/bench_prompt_concat.py --smoke            # seconds: the CI setting (CPU, no compile)
    python benchmarks/bench_prompt_concat.py --sweep-configs --grid small   # GPU: every autotune config's GB/s
    python benchmarks/bench_prompt_concat.py ARGS --parse-only  # check ARGS and exit (no device, no files)

The op (Lester et al. 2021): x[b, t] = (P[t] if t < n_p else wte[idx[b, t - n_p]]) + wpe[t], x (B, T, D),
T = n_p + n, with P (n_p, D) fp32 and trainable (as PromptTuning keeps it), wte (V, D) and wpe (T, D) frozen in
the benchmark dtype, ids uniform over V = 50257 (GPT-2's vocabulary). Backward: dP = sum_b dx[b, :n_p].

Providers (every one computes the same x and dP; checked before timing):
    eager            torch.cat([P.to(dtype).expand(B, n_p, D), F.embedding(idx, wte)], 1) + wpe[:T], autograd
    compiled         the same function under torch.compile (skipped with --no-compile)
    reference        minipt.kernels.prompt_concat(..., backend="reference"): the eager chain behind the op's
                     input validation and custom-op dispatch (CPU only: on a GPU it is eager plus the checks)
    triton           minipt's kernels through their launchers (forward kernel; batch-sum kernel for dP), each
                     with the config the autotuner picks: the kernel's own cost (GPU only)
    triton op        prompt_concat(..., backend="triton"), the public op: adds the id-range check (a reduction
                     of the ids and a device-side assert, no host sync) and autograd (GPU only)
    copy             the roof: x.clone() for the forward, g.clone() for the backward with g as large as the
                     gradient rows backward reads (B, n_p, D), both for forward+backward

Bytes model (the least the op must move; the same for every provider, so GB/s ratios are speed ratios;
s = bytes per element of the dtype, 4 for the fp32 prompt, 8 per int64 id):
    forward   B*n*D*s (gathered wte rows) + B*T*D*s (x written) + n_p*D*4 (P) + T*D*s (wpe) + B*n*8 (ids)
    backward  B*n_p*D*s (prompt rows of dx read) + n_p*D*4 (dP written)
    fwd+bwd   the sum of the two
    copy      2 * nbytes of the tensor cloned (read once, written once)
The eager chain moves more than this (it writes and re-reads the gathered rows, the expanded prompt and the
concatenation: about 4n + 3n_p (+ 3T with wpe) rows of D per example against 2n + n_p for the fused kernel).

Timing. GPU: triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]) (warm-up, an L2 flush before every run,
CUDA events) for every provider. For small work (a mode's bytes model under --cudagraph-below MiB), where launch
overhead hides the kernel, the providers that a CUDA graph can capture (copy and the Triton launchers in every
mode, eager and compiled forward; not autograd's backward, and not the op, which is timed only as a user calls
it) are timed
again with triton.testing.do_bench_cudagraph and reported as extra rows, "<provider> (graph)", whose fraction
of the roof and speedup are taken against "copy (graph)" and "eager (graph)": a ratio never mixes timers.
Backward alone: the forward runs once and y.backward(dy, retain_graph=True) is timed, with P.grad reset to None
before every run. CPU: torch.utils.benchmark.Timer.blocked_autorange, providers taken in
turn for --rounds rounds, quantiles over all blocks. Triton figures need a GPU (the interpreter's timing says
nothing about the compiled kernel), so there are none on the CPU.

Columns: GB/s (bytes model / median time), the fraction of the copy's GB/s at the same shape, mode and timer,
and the speedup over eager (eager's median time / this provider's). The CSV carries the device name, the torch
and triton versions and the date on every row; a PNG of GB/s per shape is written beside it.

Config sweep (--sweep-configs, GPU): the Triton launchers with every config of the autotuner's lists passed
explicitly (forward: BLOCK_T rows x BLOCK_D columns per program, num_warps; backward: BLOCK_B x BLOCK_D, num_warps),
each timed with do_bench at every shape and dtype of the grid (small by default), with the same bytes model and
the copy as the roof. One row per config; `autotuned` marks the config the autotuner picks for that shape.
Written to benchmarks/results/prompt_concat_configs-<gpu>.csv. On the CPU (under TRITON_INTERPRET=1) the sweep
checks every config against the eager chain on one tiny shape instead, and times nothing.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
V = 50257  # GPT-2's vocabulary
QUANTILES = [0.5, 0.2, 0.8]
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("eager", "compiled", "reference", "triton", "triton op", "copy")
# (provider, mode) pairs a CUDA graph can capture: no host sync, no autograd backward issued on another stream
CAPTURABLE = {(p, m) for p in ("copy", "triton") for m in ("fwd", "bwd", "fwd+bwd")} | {
    ("eager", "fwd"),
    ("compiled", "fwd"),
}
GPU_PROVIDERS = ("eager", "compiled", "triton", "triton op", "copy")
CPU_PROVIDERS = ("eager", "compiled", "reference", "copy")
# (B, n, n_p, D). The grid: D in {768, 1024, 1600, 4096}, n_p in {1, 20, 100}, n in {128, 512, 2048},
# B in {1, 8, 32}. The default grid varies one size at a time around GPT-2 small at B=8, n=512, n_p=20, and
# ends with the largest shape.
FULL_GRID = list(itertools.product((1, 8, 32), (128, 512, 2048), (1, 20, 100), (768, 1024, 1600, 4096)))
DEFAULT_GRID = [
    (8, 512, 20, 768),
    (8, 512, 20, 1024),
    (8, 512, 20, 1600),
    (8, 512, 20, 4096),
    (8, 512, 1, 768),
    (8, 512, 100, 768),
    (8, 128, 20, 768),
    (8, 2048, 20, 768),
    (1, 512, 20, 768),
    (32, 512, 20, 768),
    (32, 2048, 20, 768),
    (32, 2048, 100, 1600),
    (32, 2048, 100, 4096),
]
SMALL_GRID = [(8, 512, 20, 768), (32, 2048, 20, 768), (32, 2048, 100, 4096)]
CPU_GRID = [(4, 128, 20, 768), (8, 512, 20, 768)]
SMOKE_GRID = [(2, 16, 4, 64)]
GRIDS = {"full": FULL_GRID, "default": DEFAULT_GRID, "small": SMALL_GRID, "cpu": CPU_GRID, "smoke": SMOKE_GRID}
DTYPES = ("float32", "float16", "bfloat16")
COLUMNS = (
    "device_name",
    "device",
    "mode",
    "dtype",
    "D",
    "n_p",
    "n",
    "B",
    "provider",
    "timer",
    "ms",
    "ms_q20",
    "ms_q80",
    "gbps",
    "bytes",
    "copy_gbps",
    "frac_of_copy",
    "speedup_vs_eager",
    "torch",
    "triton",
    "date",
)


SWEEP_COLUMNS = (
    "device_name",
    "device",
    "mode",
    "dtype",
    "D",
    "n_p",
    "n",
    "B",
    "config",
    "autotuned",
    "timer",
    "ms",
    "ms_q20",
    "ms_q80",
    "gbps",
    "bytes",
    "copy_gbps",
    "frac_of_copy",
    "torch",
    "triton",
    "date",
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    ap.add_argument(
        "--grid",
        default=None,
        choices=sorted(GRIDS),
        help="shapes (B, n, n_p, D): default on a GPU, cpu on the CPU (small, smoke for the sweep)",
    )
    ap.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated subset of {','.join(DTYPES)}")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument(
        "--cudagraph-below",
        type=float,
        default=16.0,
        help="GPU: also time capturable providers with do_bench_cudagraph when a mode's bytes "
        "model is under this many MiB (0: never)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="CPU: rounds over the providers, taken in turn")
    ap.add_argument("--min-run-time", type=float, default=0.2, help="CPU: seconds per provider per round")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="CPU, one tiny shape, fp32, no compile, one short round")
    ap.add_argument(
        "--sweep-configs",
        action="store_true",
        help="time every autotune config of the forward and backward kernels (GPU; a check on the CPU)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="CSV path (default benchmarks/results/prompt_concat-<device>.csv, "
        "prompt_concat_configs-<gpu>.csv with --sweep-configs)",
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--parse-only",
        action="store_true",
        help="check the other arguments, print what would run and exit 0 (no device, no files)",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.grid, args.dtypes, args.no_compile = "cpu", "smoke", "float32", True
        args.rounds, args.min_run_time = 1, 0.02
    for flag, value, allowed in (
        ("--dtypes", args.dtypes, DTYPES),
        ("--modes", args.modes, MODES),
        ("--providers", args.providers, PROVIDERS),
    ):
        unknown = [v.strip() for v in (value or "").split(",") if value is not None and v.strip() not in allowed]
        if unknown:
            ap.error(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    if args.sweep_configs and not {m.strip() for m in args.modes.split(",")} & {"fwd", "bwd"}:
        ap.error("--sweep-configs times the fwd and bwd kernels: --modes must include fwd or bwd")
    for flag, value in (("--rounds", args.rounds), ("--min-run-time", args.min_run_time)):
        if value <= 0:
            ap.error(f"{flag} must be positive, got {value}")
    return args


# ---- environment --------------------------------------------------------------------------------------------


def resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch")
    return choice


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---- the providers ------------------------------------------------------------------------------------------


def eager_chain(P, wte, idx, wpe):
    """The op as one writes it in PyTorch: embedding, expand, cat, + wpe."""
    import torch
    import torch.nn.functional as F

    B, n = idx.shape
    n_p, D = P.shape
    p = P.to(wte.dtype).unsqueeze(0).expand(B, n_p, D)  # (B, n_p, D), a view
    x = torch.cat([p, F.embedding(idx, wte)], dim=1)  # (B, T, D)
    return x + wpe[: n_p + n]  # (B, T, D)


class Case:
    """The tensors of one (B, n, n_p, D, dtype) point, and each provider's three timed functions."""

    def __init__(self, B, n, n_p, D, dtype, device, compiled_fn):
        import torch

        torch.manual_seed(0)  # the tensors are drawn on the device itself (wte is 0.8 GB at D = 4096, fp32)
        T = n_p + n
        self.shape = (B, n, n_p, D)
        self.dtype, self.device = dtype, device
        self.wte = 0.02 * torch.randn(V, D, device=device, dtype=dtype)  # (V, D) frozen
        self.wpe = 0.02 * torch.randn(T, D, device=device, dtype=dtype)  # (T, D) frozen
        self.P = (torch.rand(n_p, D, device=device) - 0.5).requires_grad_(True)  # (n_p, D) fp32, trained
        self.idx = torch.randint(V, (B, n), device=device)  # (B, n) int64, uniform over V
        self.dy = torch.randn(B, T, D, device=device, dtype=dtype)  # (B, T, D) upstream gradient
        self.x_like = torch.empty(B, T, D, device=device, dtype=dtype)  # copy roof, forward
        self.g_like = torch.empty(B, n_p, D, device=device, dtype=dtype)  # copy roof, backward
        self.compiled_fn = compiled_fn
        s = torch.finfo(dtype).bits // 8
        self.bytes = {
            "fwd": B * n * D * s + B * T * D * s + n_p * D * 4 + T * D * s + B * n * 8,
            "bwd": B * n_p * D * s + n_p * D * 4,
        }
        self.bytes["fwd+bwd"] = self.bytes["fwd"] + self.bytes["bwd"]
        self.copy_bytes = {"fwd": 2 * self.x_like.nbytes, "bwd": 2 * self.g_like.nbytes}
        self.copy_bytes["fwd+bwd"] = self.copy_bytes["fwd"] + self.copy_bytes["bwd"]

    def forward_fn(self, provider):
        from minipt.kernels import prompt_concat

        P, wte, idx, wpe = self.P, self.wte, self.idx, self.wpe
        if provider == "eager":
            return lambda: eager_chain(P, wte, idx, wpe)
        if provider == "compiled":
            return lambda: self.compiled_fn(P, wte, idx, wpe)
        if provider == "reference":
            return lambda: prompt_concat(P, wte, idx, wpe=wpe, backend="reference")
        if provider == "triton op":
            return lambda: prompt_concat(P, wte, idx, wpe=wpe, backend="triton")
        raise ValueError(provider)

    def fns(self, provider):
        """{mode: (fn, grad_to_none)} for one provider."""
        if provider == "copy":
            x, g = self.x_like, self.g_like
            return {"fwd": (x.clone, None), "bwd": (g.clone, None), "fwd+bwd": (lambda: (x.clone(), g.clone()), None)}
        if provider == "triton":
            from minipt.kernels.prompt_concat import _batch_sum_triton, _forward_triton

            P, wte, idx, wpe, dy = self.P.detach(), self.wte, self.idx, self.wpe, self.dy
            n_p = P.shape[0]

            def fwd():
                return _forward_triton(P, wte, idx, wpe, None)  # (B, T, D)

            def bwd():
                return _batch_sum_triton(dy, None, 1, n_p, P.dtype)  # (1, n_p, D) = dP

            return {"fwd": (fwd, None), "bwd": (bwd, None), "fwd+bwd": (lambda: (fwd(), bwd()), None)}
        forward = self.forward_fn(provider)
        y = forward()  # kept, with its graph, for the backward-only timing
        dy = self.dy

        def bwd():
            y.backward(dy, retain_graph=True)

        def fwd_bwd():
            forward().backward(dy)

        return {"fwd": (forward, None), "bwd": (bwd, [self.P]), "fwd+bwd": (fwd_bwd, [self.P])}

    def check(self, provider):
        """Every provider computes the same x and dP as the eager chain (before anything is timed)."""
        import torch

        if provider == "copy":
            return
        ref_x = eager_chain(self.P, self.wte, self.idx, self.wpe)
        ref_dp = torch.autograd.grad(ref_x, self.P, self.dy)[0]
        if provider == "triton":
            from minipt.kernels.prompt_concat import _batch_sum_triton, _forward_triton

            x = _forward_triton(self.P.detach(), self.wte, self.idx, self.wpe, None)
            dp = _batch_sum_triton(self.dy, None, 1, self.P.shape[0], self.P.dtype)[0]
        else:
            x = self.forward_fn(provider)()
            dp = torch.autograd.grad(x, self.P, self.dy)[0]
        # x: the same rows and one rounding per element (exact for the reference and the kernels in practice)
        if provider == "compiled" and self.dtype in (torch.float16, torch.bfloat16):
            # Inductor on CUDA adds the fp32 P to wpe before it rounds (it skips the intermediate cast of
            # P.to(dtype)): round(P + wpe) against eager's round(round(P) + wpe). The two differ by at most the
            # skipped rounding, half an ulp of |P|, plus one ulp of |x|: eps * (max|P| + max|x|) bounds it.
            eps = torch.finfo(self.dtype).eps
            bound = eps * (self.P.detach().abs().max().item() + ref_x.abs().max().item())
            torch.testing.assert_close(x, ref_x, rtol=0, atol=bound)
        else:
            torch.testing.assert_close(x, ref_x)  # dtype tolerances
        # dP sums B rows of dy: eager sums in the activation dtype (one 16-bit rounding), the kernel in fp32
        tol = (2e-2 if self.dtype in (torch.float16, torch.bfloat16) else 1e-5) * max(1.0, self.shape[0] ** 0.5)
        torch.testing.assert_close(dp, ref_dp, rtol=tol, atol=tol)


# ---- timers -------------------------------------------------------------------------------------------------


def time_gpu(fn, grad_to_none, graph=False):
    """(median, q20, q80) in ms: do_bench, or do_bench_cudagraph with graph=True."""
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return tuple(do_bench_cudagraph(fn, rep=20, grad_to_none=grad_to_none, quantiles=QUANTILES))
    return tuple(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=QUANTILES))


def time_cpu_round(fn, grad_to_none, min_run_time, threads):
    """Seconds per call of each block of one blocked_autorange."""
    from torch.utils import benchmark

    def run():
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        fn()

    m = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time
    )
    return list(m.times)


def quantiles_ms(times_s):
    import numpy as np

    q50, q20, q80 = np.quantile(times_s, QUANTILES)
    return 1e3 * q50, 1e3 * q20, 1e3 * q80


# ---- the run ------------------------------------------------------------------------------------------------


def measure_case(case, providers, modes, args, device):
    """{(provider, mode): (median ms, q20, q80, timer)} for one shape and dtype."""
    import torch

    fns = {p: case.fns(p) for p in providers}
    results = {}
    if device == "cuda":
        for mode in modes:
            for p in providers:
                fn, gtn = fns[p][mode]
                results[(p, mode)] = (*time_gpu(fn, gtn), "do_bench")
            if case.bytes[mode] >= args.cudagraph_below * 2**20:
                continue
            for p in providers:
                if (p, mode) not in CAPTURABLE:
                    continue
                fn, gtn = fns[p][mode]
                try:
                    results[(p + " (graph)", mode)] = (*time_gpu(fn, gtn, graph=True), "do_bench_cudagraph")
                except Exception as e:  # a capture that fails is reported, and the do_bench row stands
                    torch.cuda.synchronize()
                    print(f"note: {p} {mode} not timed with a CUDA graph: {type(e).__name__}: {e}")
    else:
        times = {(p, m): [] for p in providers for m in modes}
        for r in range(args.rounds):
            order = providers[r % len(providers) :] + providers[: r % len(providers)]  # rotate who goes first
            for mode in modes:
                for p in order:
                    fn, gtn = fns[p][mode]
                    times[(p, mode)] += time_cpu_round(fn, gtn, args.min_run_time, args.threads)
        for key, ts in times.items():
            results[key] = (*quantiles_ms(ts), "torch.utils.benchmark")
    return results


def rows_for(case, results, modes, common):
    B, n, n_p, D = case.shape
    rows = []
    for mode in modes:
        for (p, m), (ms, q20, q80, timer) in results.items():
            if m != mode:
                continue
            graph = p.endswith(" (graph)")
            moved = case.copy_bytes[mode] if p.startswith("copy") else case.bytes[mode]
            gbps = moved / (ms * 1e-3) / 1e9
            roof = results.get(("copy (graph)" if graph else "copy", mode))  # the same timer
            eager = results.get(("eager (graph)" if graph else "eager", mode))
            copy_gbps = case.copy_bytes[mode] / (roof[0] * 1e-3) / 1e9 if roof else None
            rows.append(
                dict(
                    common,
                    mode=mode,
                    dtype=str(case.dtype).replace("torch.", ""),
                    D=D,
                    n_p=n_p,
                    n=n,
                    B=B,
                    provider=p,
                    timer=timer,
                    ms=f"{ms:.5f}",
                    ms_q20=f"{q20:.5f}",
                    ms_q80=f"{q80:.5f}",
                    gbps=f"{gbps:.5g}",
                    bytes=moved,
                    copy_gbps="" if copy_gbps is None else f"{copy_gbps:.5g}",
                    frac_of_copy="" if copy_gbps is None else f"{gbps / copy_gbps:.3f}",
                    speedup_vs_eager="" if eager is None else f"{eager[0] / ms:.3f}",
                )
            )
    return rows


def print_rows(rows):
    headers = (
        "mode",
        "dtype",
        "B",
        "n",
        "n_p",
        "D",
        "provider",
        "timer",
        "median ms [q20, q80]",
        "GB/s",
        "of copy",
        "vs eager",
    )
    lines = [headers]
    for r in rows:
        lines.append(
            (
                r["mode"],
                r["dtype"],
                r["B"],
                r["n"],
                r["n_p"],
                r["D"],
                r["provider"],
                r["timer"],
                f"{float(r['ms']):.4f} [{float(r['ms_q20']):.4f}, {float(r['ms_q80']):.4f}]",
                r["gbps"],
                r["frac_of_copy"],
                r["speedup_vs_eager"] and f"{r['speedup_vs_eager']}x",
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(headers))]
    for line in lines:
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))


def write_csv(path: Path, rows, command):
    from minipt.apps import benchio

    benchio.write_csv(
        path,
        [
            f"# bench_prompt_concat.py: {command}",
            "# bytes model: fwd B*n*D*s + B*T*D*s + n_p*D*4 + T*D*s + B*n*8; bwd B*n_p*D*s + n_p*D*4; "
            "copy 2*nbytes; gbps = bytes / median time",
        ],
        COLUMNS,
        rows,
    )


def plot(path: Path, rows, title):
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(5 * len(modes), 3.2 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            shapes = list(dict.fromkeys((r["B"], r["n"], r["n_p"], r["D"]) for r in sel))
            for provider in dict.fromkeys(r["provider"] for r in sel):
                pts = [
                    (shapes.index((r["B"], r["n"], r["n_p"], r["D"])), float(r["gbps"]))
                    for r in sel
                    if r["provider"] == provider
                ]
                ax.plot(*zip(*pts), marker="o", label=provider, ls="--" if provider.startswith("copy") else "-")
            ax.set_xticks(
                range(len(shapes)), [f"{B}x{n}+{p} D{D}" for B, n, p, D in shapes], rotation=60, ha="right", fontsize=7
            )
            ax.set(title=f"{mode}, {dtype}", ylabel="GB/s (bytes model / median)")
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.parse_only:
        what = "config sweep" if args.sweep_configs else "benchmark"
        print(
            f"parse-only: {what}, device {args.device}, grid {args.grid or '(per device)'}, dtypes {args.dtypes}, "
            f"modes {args.modes}, out {args.out or '(default)'}"
        )
        return []
    import torch

    from minipt.apps.benchio import device_name

    device = resolve_device(args.device)
    if args.sweep_configs:
        return sweep_configs(args, argv, device)
    if args.threads and device == "cpu":
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    grid = GRIDS[args.grid or ("default" if device == "cuda" else "cpu")]
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    wanted = [p.strip() for p in args.providers.split(",")] if args.providers else list(PROVIDERS)
    allowed = GPU_PROVIDERS if device == "cuda" else CPU_PROVIDERS
    providers = [p for p in wanted if p in allowed and not (p == "compiled" and args.no_compile)]
    name = device_name(device)
    command = "python benchmarks/bench_prompt_concat.py " + " ".join(argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = dict(device_name=name, device=device, torch=torch.__version__, triton=triton_version(), date=date)
    print(
        f"{command}\n{name} ({device}), torch {torch.__version__}, triton {triton_version()}, "
        f"{len(grid)} shapes x {len(dtypes)} dtypes, providers {', '.join(providers)}"
    )
    if device == "cpu":
        print(
            f"CPU: {args.threads} threads, torch.utils.benchmark, {args.rounds} rounds. Triton figures need a GPU: "
            "run this script with --device cuda (or benchmarks/gpu_check.sh) on one."
        )
    if "compiled" in providers and device == "cpu":
        print("torch.compile on the CPU builds C++ first: the first shape takes a while (--no-compile skips it)")

    rows = []
    for (B, n, n_p, D), dtype in itertools.product(grid, dtypes):
        compiled_fn = None
        if "compiled" in providers:
            # A fresh static-shape compile for every shape and dtype: no dynamic-shape kernels, and no silent
            # fall back to eager when dynamo's recompile limit is reached.
            torch._dynamo.reset()
            compiled_fn = torch.compile(eager_chain, dynamic=False)
        case = Case(B, n, n_p, D, dtype, device, compiled_fn)
        for p in providers:
            case.check(p)
        results = measure_case(case, providers, modes, args, device)
        new = rows_for(case, results, modes, common)
        print_rows(new)
        rows += new
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out) if args.out else RESULTS / f"prompt_concat-{'cpu' if device == 'cpu' else slug(name)}.csv"
    write_csv(out, rows, command)
    print(f"written to {out}")
    if not args.no_plot:
        png = out.with_suffix(".png")
        plot(png, rows, f"prompt concat on {name}, torch {torch.__version__}, triton {triton_version()}, {date}")
        print(f"plot: {png}")
    return rows


# ---- the config sweep ---------------------------------------------------------------------------------------


def sweep_configs(args, argv, device) -> list[dict]:
    """Every config of the autotuner's lists, timed on CUDA (one CSV row each); checked only, on the CPU."""
    import importlib

    import torch

    from minipt.apps import benchio
    from minipt.apps.benchio import device_name

    pc = importlib.import_module("minipt.kernels.prompt_concat")
    if not pc.HAS_TRITON:
        raise SystemExit("--sweep-configs needs Triton (Linux)")
    modes = [m for m in ("fwd", "bwd") if m in {m.strip() for m in args.modes.split(",")}]
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    if device == "cpu":
        if not pc.TRITON_INTERPRET:
            raise SystemExit(
                "--sweep-configs times the compiled kernels: run it with --device cuda on a GPU "
                "(on the CPU, TRITON_INTERPRET=1 checks every config under the interpreter instead)"
            )
        # The interpreter computes bf16 arithmetic wrongly (the + wpe): bf16 is checked on a GPU only.
        dtypes = [d for d in dtypes if d != torch.bfloat16] or [torch.float32]
        return check_configs_on_cpu(pc, dtypes, modes, GRIDS[args.grid or "smoke"])
    grid = GRIDS[args.grid or "small"]
    name = device_name(device)
    command = "python benchmarks/bench_prompt_concat.py " + " ".join(argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = dict(device_name=name, device=device, torch=torch.__version__, triton=triton_version(), date=date)
    counts = {"fwd": len(pc.FWD_CONFIGS), "bwd": len(pc.BWD_CONFIGS)}
    print(
        f"{command}\n{name}, torch {torch.__version__}, triton {triton_version()}: "
        f"{' + '.join(f'{counts[m]} {m}' for m in modes)} configs x {len(grid)} shapes x {len(dtypes)} dtypes"
    )
    rows = sweep_rows(pc, grid, dtypes, modes, device, common)
    out = Path(args.out) if args.out else RESULTS / f"prompt_concat_configs-{slug(name)}.csv"
    benchio.write_csv(
        out,
        [
            f"# bench_prompt_concat.py: {command}",
            "# one row per autotune config and one for the copy roof; bytes model as in "
            "prompt_concat-<gpu>.csv; autotuned: the config triton.autotune picks for the shape",
        ],
        SWEEP_COLUMNS,
        rows,
    )
    print(f"written to {out}")
    return rows


def picked_config(pc, mode):
    """The config a launch with config=None just ran: the autotuner's pick (its fixed one under the interpreter)."""
    if pc.TRITON_INTERPRET:
        return pc.FWD_CONFIGS[pc.FWD_INTERPRETER_CONFIG] if mode == "fwd" else pc.BWD_CONFIGS[pc.BWD_INTERPRETER_CONFIG]
    return (pc._prompt_concat_fwd_tuned if mode == "fwd" else pc._prompt_concat_bwd_tuned).best_config


def sweep_rows(pc, grid, dtypes, modes, device, common, timer=None) -> list[dict]:
    """One row per (shape, dtype, mode, config), plus the copy roof, each checked, then timed with `timer`."""
    import torch

    timer = timer or time_gpu
    rows = []
    for (B, n, n_p, D), dtype in itertools.product(grid, dtypes):
        case = Case(B, n, n_p, D, dtype, device, None)
        P, wte, idx, wpe, dy = case.P.detach(), case.wte, case.idx, case.wpe, case.dy
        ref = {"fwd": eager_chain(P, wte, idx, wpe), "bwd": dy[:, :n_p].float().sum(0, keepdim=True)}  # x, dP
        runs = {  # mode: (configs, tensor the copy roof clones, launch(config))
            "fwd": (pc.FWD_CONFIGS, case.x_like, lambda c: pc._forward_triton(P, wte, idx, wpe, None, config=c)),
            "bwd": (pc.BWD_CONFIGS, case.g_like, lambda c: pc._batch_sum_triton(dy, None, 1, n_p, P.dtype, config=c)),
        }
        for mode in modes:
            configs, roof_like, launch = runs[mode]
            launch(None)  # the autotuner's pick for this shape (tuned now if the key is new)
            chosen = pc.config_name(picked_config(pc, mode))
            timed = [("copy", None, timer(roof_like.clone, None))]
            for config in configs:
                out = launch(config)
                if mode == "fwd":  # the forward is exact; the batch sum agrees to rounding (fp32 sums)
                    torch.testing.assert_close(out, ref[mode], rtol=0, atol=0)
                else:
                    torch.testing.assert_close(out, ref[mode], rtol=1e-4, atol=1e-4 * max(1.0, B**0.5))
                timed.append((pc.config_name(config), config, timer(lambda c=config: launch(c), None)))
            copy_gbps = case.copy_bytes[mode] / (timed[0][2][0] * 1e-3) / 1e9
            for label, config, (ms, q20, q80) in timed:
                moved = case.copy_bytes[mode] if config is None else case.bytes[mode]
                gbps = moved / (ms * 1e-3) / 1e9
                rows.append(
                    dict(
                        common,
                        mode=mode,
                        dtype=str(dtype).replace("torch.", ""),
                        D=D,
                        n_p=n_p,
                        n=n,
                        B=B,
                        config=label,
                        autotuned="yes" if label == chosen else "",
                        timer="do_bench",
                        ms=f"{ms:.5f}",
                        ms_q20=f"{q20:.5f}",
                        ms_q80=f"{q80:.5f}",
                        gbps=f"{gbps:.5g}",
                        bytes=moved,
                        copy_gbps=f"{copy_gbps:.5g}",
                        frac_of_copy=f"{gbps / copy_gbps:.3f}",
                    )
                )
                print(
                    f"  {mode} {rows[-1]['dtype']:8s} B={B} n={n} n_p={n_p} D={D}  {label:36s} {ms:9.4f} ms "
                    f"{gbps:9.1f} GB/s {gbps / copy_gbps:6.1%} of copy{'  <- autotuned' if label == chosen else ''}"
                )
        del case, ref, runs
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_configs_on_cpu(pc, dtypes, modes, grid) -> list[dict]:
    """Every config under the interpreter on CPU tensors, against the eager chain: a check, no timing."""
    import torch

    print(
        f"CPU: every config under the Triton interpreter at (B, n, n_p, D) in {grid}, checked against the eager "
        "chain; nothing is timed (the interpreter's speed says nothing about the compiled kernel)."
    )
    for (B, n, n_p, D), dtype in itertools.product(grid, dtypes):
        case = Case(B, n, n_p, D, dtype, "cpu", None)
        P, wte, idx, wpe, dy = case.P.detach(), case.wte, case.idx, case.wpe, case.dy
        if "fwd" in modes:
            ref = eager_chain(P, wte, idx, wpe)
            for config in pc.FWD_CONFIGS:
                x = pc._forward_triton(P, wte, idx, wpe, None, config=config)
                torch.testing.assert_close(x, ref, rtol=0, atol=0)
                print(f"  fwd {str(dtype)[6:]:8s} {pc.config_name(config)}: bit-identical")
        if "bwd" in modes:
            ref = dy[:, :n_p].float().sum(0, keepdim=True)
            for config in pc.BWD_CONFIGS:
                dp = pc._batch_sum_triton(dy, None, 1, n_p, P.dtype, config=config)
                torch.testing.assert_close(dp, ref, rtol=1e-5, atol=1e-5)
                print(f"  bwd {str(dtype)[6:]:8s} {pc.config_name(config)}: equal to rounding")
    return []


if __name__ == "__main__":
    main()
