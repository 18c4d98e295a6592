"""One prompt-tuning training step (forward, backward, optimizer), minipt against HF GPT-2 + PEFT.

    python benchmarks/bench_train_step.py --preset tiny                # CPU, 2 threads, B=16, n=108, n_p=20
    python benchmarks/bench_train_step.py --preset gpt2                # CPU, 2 threads, B=2, n=64, n_p=20
    python benchmarks/bench_train_step.py --preset tiny --device cuda  # adds the fused Triton kernel row
    python benchmarks/bench_train_step.py --smoke                      # seconds: the CI setting

Rows (one model, random weights, fp32, dropout 0, AdamW lr 1e-3, the same batch for every row):
    minipt prompt tuning (reference concat)   PromptTuning(backend="reference"): frozen GPT, fused frozen head
    minipt prompt tuning (fused kernel)       PromptTuning(backend="triton"), CUDA only
    minipt full fine-tuning                   GPT(idx, targets), every weight trains (no prompt: n positions)
    HF GPT-2 + PEFT prompt tuning             transformers GPT2LMHeadModel with the same weights (Conv1D
                                              weights are nn.Linear's transposed), peft.get_peft_model with
                                              PromptTuningConfig(num_virtual_tokens=n_p), the same prompt
                                              values; only when transformers and peft are installed

Like with like: every prompt-tuning row sees the same (B, n) ids, the same n_p prompt rows (copied into PEFT's
prompt embedding) and scores the same B * (n - 1) positions: input position j predicts token j + 1. minipt
gets targets[:, j] = idx[:, j + 1] (the last position -100); PEFT gets labels = input_ids with labels[:, 0] =
-100, because with labels = input_ids PEFT (through HF's shift) would also score the first input token from the
last prompt slot, a position minipt does not score. With the same weights the first-step losses must then agree
to 1e-4 (checked, printed, written to the CSV: `loss`, `loss_diff`).

Timing: all rows live in one process and are stepped alternately, round after round (the order rotates each
round), so a busy machine slows them alike; the first step of each row is a warm-up and is not timed. Reported:
ms per step (median, with the 20th and 80th percentiles), tokens per second = B * n input tokens / median step
time (the prompt positions are not counted as tokens), and the ratio of each row to the PEFT row in tokens/s:
`ratio_to_peft` from the two medians, `paired_ratio_to_peft` the median over rounds of (PEFT's step time / this
row's step time in the same round), which a load that drifts during the run disturbs less.
Peak memory: each row again in a fresh subprocess (so that peaks do not mix), as in bench_memory.py: on CPU the
process's peak RSS (VmHWM, reset after a warm-up on a toy model) above its RSS before the model was built,
on CUDA torch.cuda.max_memory_allocated above what was allocated before (weights, optimizer state and the step's
activations, counted once per row).

Results are printed and written to benchmarks/results/train_step-<device>.csv (rows of other presets are kept).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from minipt.apps.benchio import device_name, write_preset_csv

RESULTS = Path(__file__).resolve().parent / "results"
PT_REF = "minipt prompt tuning (reference concat)"
PT_TRITON = "minipt prompt tuning (fused kernel)"
FULL = "minipt full fine-tuning"
PEFT = "HF GPT-2 + PEFT prompt tuning"
CONFIGS = (PT_REF, PT_TRITON, FULL, PEFT)
# Per preset: batch size, input tokens per example (the prompt comes on top). The gpt2 row is kept small
# enough for a 2-core CPU (about a second per step); pass --batch-size/--seq-len for others.
DEFAULT_SHAPES = {"gpt2": (2, 64), "tiny": (16, 108)}
COLUMNS = (
    "preset",
    "config",
    "device",
    "dtype",
    "threads",
    "batch_size",
    "seq_len",
    "n_prompt",
    "steps",
    "ms_per_step",
    "ms_q20",
    "ms_q80",
    "tokens_per_s",
    "ratio_to_peft",
    "paired_ratio_to_peft",
    "peak_bytes",
    "loss",
    "loss_diff",
    "torch",
    "transformers",
    "peft",
    "date",
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="a GPTConfig preset: tiny | gpt2 | nano | ...")
    ap.add_argument("--batch-size", type=int, default=None, help="default: per preset (tiny 16, gpt2 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="input tokens per example (tiny 108, gpt2 64)")
    ap.add_argument("--n-prompt", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row, after one warm-up step")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU), the same for every row")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument(
        "--hf-activation",
        default="gelu_new",
        help="HF GPT2Config.activation_function: gelu_new (as in the released GPT-2 configs) or "
        "gelu_pytorch_tanh (the fused tanh GELU minipt uses); both compute the same function",
    )
    ap.add_argument(
        "--recompute",
        action="store_true",
        help="minipt rows recompute the frozen blocks in backward (PromptTuning(recompute=True))",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-peft", action="store_true", help="skip the HF + PEFT row even when installed")
    ap.add_argument("--smoke", action="store_true", help="the smallest setting: nano, B=2, n=8, n_p=4, 2 steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/train_step-<device>.csv)")
    ap.add_argument(
        "--parse-only",
        action="store_true",
        help="check the arguments as a real run would, then exit (no device, no files)",
    )
    ap.add_argument("--worker", default=None, choices=CONFIGS, help=argparse.SUPPRESS)  # peak memory, one row
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.batch_size, args.seq_len, args.n_prompt, args.steps = "nano", 2, 8, 4, 2
    B, n = DEFAULT_SHAPES.get(args.preset, (4, 64))
    args.batch_size = args.batch_size or B
    args.seq_len = args.seq_len or n
    return args


def have_peft() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def configs_for(args) -> list[str]:
    rows = [PT_REF]
    if args.device == "cuda":
        rows.append(PT_TRITON)
    rows.append(FULL)
    if have_peft() and not args.no_peft:
        rows.append(PEFT)
    return rows


# ---- models -----------------------------------------------------------------------------------------------


def minipt_config(args):
    from minipt import GPTConfig

    base = GPTConfig.preset(args.preset)
    # the prompt needs n_prompt more positions; raise block_size where the preset is shorter (random weights)
    return GPTConfig.preset(args.preset, block_size=max(base.block_size, args.n_prompt + args.seq_len), dropout=0.0)


def build(config: str, base, prompt_init, args):
    """A step function for one row: it runs forward, backward and the optimizer, and returns the loss."""
    import torch

    from minipt import PromptTuning

    lr = 1e-3
    if config in (PT_REF, PT_TRITON):
        backend = "reference" if config == PT_REF else "triton"
        module = PromptTuning.from_tensor(
            copy.deepcopy(base), prompt_init, backend=backend, recompute=args.recompute
        ).train()
        params = [module.prompt]

        def forward(idx, targets, labels):
            return module.loss(idx, targets)
    elif config == FULL:
        module = copy.deepcopy(base).train()
        params = list(module.parameters())

        def forward(idx, targets, labels):
            return module.loss(idx, targets)
    elif config == PEFT:
        import warnings

        from peft import PromptTuningConfig, TaskType, get_peft_model

        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes

        from minipt.hf import to_hf

        hf = to_hf(base, args.hf_activation)
        module = get_peft_model(
            hf, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.n_prompt)
        ).train()
        emb = module.prompt_encoder["default"].embedding.weight  # (n_p, D), the only trainable tensor
        with torch.no_grad():
            emb.copy_(prompt_init)
        params = [p for p in module.parameters() if p.requires_grad]
        assert len(params) == 1 and params[0] is emb, "PEFT should train only its prompt embedding"

        def forward(idx, targets, labels):
            return module(input_ids=idx, labels=labels).loss
    else:
        raise ValueError(config)
    opt = torch.optim.AdamW(params, lr=lr)

    def step(idx, targets, labels):
        opt.zero_grad(set_to_none=True)
        loss = forward(idx, targets, labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, sum(p.numel() for p in params)


def make_inputs(cfg, args):
    """The batch, the same for every row: ids, minipt targets, PEFT labels (see the module docstring)."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randint(cfg.vocab_size, (args.batch_size, args.seq_len), generator=g)  # (B, n)
    targets = torch.full_like(idx, -100)
    targets[:, :-1] = idx[:, 1:]  # position j predicts token j + 1; the last position is not scored
    labels = idx.clone()
    labels[:, 0] = -100  # PEFT would otherwise score token 0 from the last prompt slot (HF shifts labels)
    prompt = torch.rand(args.n_prompt, cfg.n_embd, generator=g) - 0.5  # U(-0.5, 0.5), Lester et al.
    d = args.device
    return idx.to(d), targets.to(d), labels.to(d), prompt.to(d)


def setup(args):
    import torch

    from minipt import GPT

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = minipt_config(args)
    base = GPT(cfg).to(args.device)
    return cfg, base


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---- peak memory of one row, in its own process -------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:  # resident pages (Linux)
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux 4.0+); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The peak RSS since the last reset (VmHWM), else since the process started (getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_memory(config: str, args) -> dict:
    import gc

    import torch

    from minipt import GPT

    torch.set_num_threads(args.threads)
    cfg = minipt_config(args)
    # Warm up on a toy model of the same kind: library code, thread pools and (for PEFT) the transformers
    # modules page in here, which is not memory of this training step.
    toy_args = copy.copy(args)
    toy_args.seq_len = 8
    toy = GPT(type(cfg)(**{**cfg.to_dict(), "n_layer": 1, "n_embd": 8 * cfg.n_head})).to(args.device)
    idx, targets, labels, prompt = make_inputs(toy.config, toy_args)
    step, _ = build(config, toy, prompt, toy_args)
    step(idx, targets, labels)
    del step, toy
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()  # the warm-up's peak is not this row's
        before = rss_bytes()
    torch.manual_seed(args.seed)
    base = GPT(cfg).to(args.device)
    idx, targets, labels, prompt = make_inputs(cfg, args)
    step, _ = build(config, base, prompt, args)
    del base  # each row keeps only its own copy of the weights
    for _ in range(2):
        step(idx, targets, labels)
    sync(args.device)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = peak_rss_bytes() - before
    return dict(peak_bytes=peak)


def run_memory_row(config: str, argv: list[str]) -> int:
    cmd = [sys.executable, __file__, *argv, "--worker", config]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{config} (memory) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


# ---- timing, all rows alternately in this process -----------------------------------------------------------


def quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_times(configs, args):
    cfg, base = setup(args)
    idx, targets, labels, prompt = make_inputs(cfg, args)
    steps, losses, times, trainable = {}, {}, {c: [] for c in configs}, {}
    for c in configs:
        steps[c], trainable[c] = build(c, base, prompt, args)
    for c in configs:  # warm-up step, and the first-step loss (same weights, same prompt: same loss)
        losses[c] = float(steps[c](idx, targets, labels))
    for r in range(args.steps):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]  # rotate who goes first
        for c in order:
            sync(args.device)
            t0 = time.perf_counter()
            steps[c](idx, targets, labels)
            sync(args.device)
            times[c].append(time.perf_counter() - t0)
    return losses, times, trainable


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return ""


def write_csv(path: Path, preset: str, new_rows: list[dict], command: str) -> None:
    """Rows of this preset replace earlier ones; other presets' rows and commands are kept."""
    write_preset_csv(
        path,
        preset,
        new_rows,
        COLUMNS,
        command,
        "bench_train_step.py: one training step (forward, backward, AdamW), random weights, fp32; "
        "rows stepped alternately in one process",
    )


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.parse_only:
        from minipt import GPTConfig

        GPTConfig.preset(args.preset)  # an unknown preset is an error here too
        print(
            f"parse-only: preset {args.preset}, device {args.device}, B={args.batch_size}, n={args.seq_len}, "
            f"n_prompt={args.n_prompt}, {args.steps} steps{', recompute' if args.recompute else ''}"
        )
        return []
    if args.worker is not None:
        print(json.dumps(measure_memory(args.worker, args)))
        return []
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch")
    configs = configs_for(args)
    command = "python benchmarks/bench_train_step.py " + " ".join(argv)
    B, n, n_p = args.batch_size, args.seq_len, args.n_prompt
    print(
        f"{command}\npreset {args.preset}, B={B}, n={n}, n_prompt={n_p}, fp32, {args.device} "
        f"({device_name(args.device)}), {args.threads} threads, {args.steps} timed steps per row, alternating"
    )
    if PEFT not in configs:
        print("HF + PEFT row skipped: " + ("--no-peft" if args.no_peft else "transformers and peft are not installed"))
    if args.device == "cpu":
        print("fused-kernel row skipped: the Triton kernel needs a GPU (--device cuda)")

    losses, times, trainable = measure_times(configs, args)
    peaks = {} if args.no_memory else {c: run_memory_row(c, argv) for c in configs}

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    versions = dict(
        torch=torch.__version__,
        transformers=package_version("transformers") if PEFT in configs else "",
        peft=package_version("peft") if PEFT in configs else "",
    )
    tokens = B * n
    med = {c: statistics.median(times[c]) for c in configs}
    rows = []
    for c in configs:
        ratio = (tokens / med[c]) / (tokens / med[PEFT]) if PEFT in configs else None
        paired = statistics.median(tp / tc for tp, tc in zip(times[PEFT], times[c])) if PEFT in configs else None
        diff = abs(losses[c] - losses[PT_REF]) if c != FULL else None  # full FT has no prompt: another loss
        rows.append(
            dict(
                preset=args.preset,
                config=c,
                device=device_name(args.device),
                dtype="float32",
                threads=args.threads,
                batch_size=B,
                seq_len=n,
                n_prompt=n_p,
                steps=args.steps,
                ms_per_step=f"{1e3 * med[c]:.2f}",
                ms_q20=f"{1e3 * quantile(times[c], 0.2):.2f}",
                ms_q80=f"{1e3 * quantile(times[c], 0.8):.2f}",
                tokens_per_s=f"{tokens / med[c]:.1f}",
                ratio_to_peft="" if ratio is None else f"{ratio:.3f}",
                paired_ratio_to_peft="" if paired is None else f"{paired:.3f}",
                peak_bytes=peaks.get(c, ""),
                loss=f"{losses[c]:.6f}",
                loss_diff="" if diff is None else f"{diff:.2e}",
                date=date,
                **versions,
            )
        )

    headers = ("", "ms/step [q20, q80]", "tokens/s", "vs PEFT", "peak memory", "trainable", "first loss")
    lines = [headers]
    for r, c in zip(rows, configs):
        lines.append(
            (
                c,
                f"{r['ms_per_step']} [{r['ms_q20']}, {r['ms_q80']}]",
                r["tokens_per_s"],
                f"{r['ratio_to_peft']}x" if r["ratio_to_peft"] else "-",
                f"{int(r['peak_bytes']) / 2**20:,.1f} MiB" if r["peak_bytes"] != "" else "-",
                f"{trainable[c]:,}",
                r["loss"],
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(headers))]
    for line in lines:
        print(
            "  ".join(
                str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(line, widths))
            )
        )
    if PEFT in configs:
        d = abs(losses[PEFT] - losses[PT_REF])
        verdict = "ok" if d <= 1e-4 else "MISMATCH"
        print(
            f"first-step loss, minipt {losses[PT_REF]:.6f} vs PEFT {losses[PEFT]:.6f}: |diff| = {d:.2e} "
            f"({verdict}, tolerance 1e-4)"
        )
        ours = rows[configs.index(PT_REF)]
        print(
            f"minipt / PEFT tokens per second: {ours['ratio_to_peft']}x (medians), "
            f"{ours['paired_ratio_to_peft']}x (median of per-round ratios)"
        )
    out = Path(args.out) if args.out else RESULTS / f"train_step-{args.device}.csv"
    note = f"  (HF GPT-2 activation_function {args.hf_activation})" if PEFT in configs else ""
    write_csv(out, args.preset, rows, command + note)
    print(f"written to {out}")
    return rows


if __name__ == "__main__":
    main()
